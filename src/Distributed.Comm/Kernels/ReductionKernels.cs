namespace Distributed.Comm.Kernels;

public static class ReductionKernels
{
    public static readonly IReadOnlyList<string> Names = ["scalar", "simd", "ilgpu"];

    // SIMD: KernelBenchmark on the 2-core build machine (CPU only), Accumulate GB/s at 1/4/16/64 MiB:
    // simd PLACEHOLDER, scalar PLACEHOLDER, ilgpu (CPU accelerator) PLACEHOLDER.
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
