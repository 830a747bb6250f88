namespace Distributed.Comm.Kernels;

public static class ReductionKernels
{
    public static readonly IReadOnlyList<string> Names = ["scalar", "simd", "ilgpu"];

    // SIMD: KernelBenchmark Accumulate GB/s at 1/4/16/64 MiB, 2-core build VM: simd 53/60/55/35, scalar 41/41/35/28, ilgpu(CPU) 3.6/4.8/4.0/4.1.
    /// <summary>The fastest kernels on CPU; shared and stateless, so disposing it does nothing.</summary>
    public static IReductionKernels Default { get; } = new SimdReductionKernels();

    /// <summary>A new instance of the named kernels: "scalar", "simd" or "ilgpu" (case-insensitive).</summary>
    public static IReductionKernels Create(string name) => name.ToLowerInvariant() switch
    {
        "scalar" => new ScalarReductionKernels(),
        "simd" => new SimdReductionKernels(),
        "ilgpu" => new IlgpuReductionKernels(),
        _ => throw new ArgumentException($"Unknown reduction kernels '{name}'; expected one of: {string.Join(", ", Names)}.", nameof(name)),
    };

    /// <summary>The spellings of the config key cluster.kernels.</summary>
    public static readonly IReadOnlyList<string> JobSettings = ["auto", "simd", "ilgpu"];

    /// <summary>
    /// The kernels a job's cluster.kernels names: "auto" is ILGPU on a CUDA GPU where there is one, SIMD otherwise
    /// (ILGPU's CPU accelerator is slower than SIMD); "simd"; "ilgpu" is ILGPU on CUDA where there is a GPU, else on
    /// ILGPU's CPU accelerator. The caller disposes the result: ILGPU's holds a context and an accelerator.
    /// </summary>
    public static IReductionKernels ForJob(string setting) => setting switch
    {
        "auto" => (IReductionKernels?)IlgpuReductionKernels.TryCreateOnCuda() ?? new SimdReductionKernels(),
        "simd" => new SimdReductionKernels(),
        "ilgpu" => new IlgpuReductionKernels(),
        _ => throw new ArgumentException($"cluster.kernels must be one of {string.Join(", ", JobSettings)}, got '{setting}'", nameof(setting)),
    };

    internal static void CheckSameLength(int accumulator, int chunk)
    {
        if (accumulator != chunk)
            throw new ArgumentException($"The chunk has {chunk} elements, the accumulator {accumulator}.", "chunk");
    }

    internal static void CheckDestination(int source, int destination)
    {
        if (destination < source)
            throw new ArgumentException($"The destination has {destination} elements, fewer than the source's {source}.", "destination");
    }
}
