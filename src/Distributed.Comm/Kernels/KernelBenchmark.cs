using System.Diagnostics;

namespace Distributed.Comm.Kernels;

/// <summary>Accumulate throughput of each kernel set against the machine's copy bandwidth.</summary>
public static class KernelBenchmark
{
    /// <summary>Measures Accumulate on buffers of 1, 4, 16, ... MiB up to <paramref name="megabytes"/>. Accumulate
    /// moves 3 x bytes (read both, write one), the reference Span.CopyTo 2 x bytes; each figure is the median of
    /// several timed repetitions after warm-up. With write-allocate caches a copy really moves 3 x bytes as well, so a
    /// ratio near 1.5 on buffers larger than the caches means the kernel runs at the copy's memory bandwidth.</summary>
    public static void Run(TextWriter output, int megabytes = 64)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(megabytes, 1);
        var sizes = new List<int>();
        for (var mib = 1; mib <= megabytes; mib *= 4) sizes.Add(mib);
        var maxLength = sizes[^1] * (1 << 20) / sizeof(float);
        var accumulator = new float[maxLength];
        var chunk = new float[maxLength];
        var random = new Random(1);
        for (var i = 0; i < maxLength; i++)
            (accumulator[i], chunk[i]) = (random.NextSingle() - 0.5f, random.NextSingle() - 0.5f);

        var copyGBps = new Dictionary<int, double>();
        foreach (var mib in sizes)
        {
            var length = mib * (1 << 20) / sizeof(float);
            var seconds = MedianSeconds(() => chunk.AsSpan(0, length).CopyTo(accumulator.AsSpan(0, length)));
            copyGBps[mib] = 2.0 * length * sizeof(float) / seconds / 1e9;
        }

        output.WriteLine($"Accumulate (3 x bytes moved) vs Span.CopyTo (2 x bytes), medians; {Environment.ProcessorCount} cores");
        output.WriteLine($"{"kernel",-12} {"size",7} {"GB/s",8} {"copy GB/s",10} {"ratio",6}");
        foreach (var name in ReductionKernels.Names)
        {
            using var kernels = ReductionKernels.Create(name);
            var label = kernels is IlgpuReductionKernels ilgpu ? $"ilgpu({ilgpu.AcceleratorKind})" : kernels.Name;
            foreach (var mib in sizes)
            {
                var length = mib * (1 << 20) / sizeof(float);
                var seconds = MedianSeconds(() => kernels.Accumulate(accumulator.AsSpan(0, length), chunk.AsSpan(0, length)));
                var gbps = 3.0 * length * sizeof(float) / seconds / 1e9;
                output.WriteLine($"{label,-12} {mib,3} MiB {gbps,8:F2} {copyGBps[mib],10:F2} {gbps / copyGBps[mib],6:F2}");
            }
        }
    }

    // Warm-up: at least 2 calls and 0.5 s (after 0.2 s tiered JIT was not done yet: simd ran at half speed on 1 MiB).
    // Then at least 5 timed calls: up to 50, or until about half a second has been spent.
    private static double MedianSeconds(Action action)
    {
        var warmUp = Stopwatch.StartNew();
        for (var calls = 0; calls < 2 || warmUp.Elapsed.TotalSeconds < 0.5; calls++) action();
        var times = new List<double>();
        var total = Stopwatch.StartNew();
        while (times.Count < 5 || (times.Count < 50 && total.Elapsed.TotalSeconds < 0.5))
        {
            var start = Stopwatch.GetTimestamp();
            action();
            times.Add(Stopwatch.GetElapsedTime(start).TotalSeconds);
        }
        times.Sort();
        return times[times.Count / 2];
    }
}
