using Distributed.Cluster;
using Distributed.Comm;

namespace Distributed.Tests;

/// <summary>The pieces of a worker's sample that need no cluster: nvidia-smi's answer, and all-reduce busy time.</summary>
public class WorkerTelemetryTests
{
    [Fact]
    public void NvidiaSmiAnswerIsParsed()
    {
        // nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits, one line per device.
        Assert.Equal((0.87, 1234L * 1024 * 1024), GpuSampler.Parse("87, 1234\n3, 1\n"));
        Assert.Equal((0.0, 0L), GpuSampler.Parse("0, 0"));
        Assert.Null(GpuSampler.Parse("[N/A], [N/A]"));
        Assert.Null(GpuSampler.Parse(""));
    }

    [Fact]
    public async Task OverlappingAllReducesCountTheirTimeOnce()
    {
        var counters = new CollectiveCounters();
        var started = typeof(CollectiveCounters).GetMethod("Started", System.Reflection.BindingFlags.NonPublic | System.Reflection.BindingFlags.Instance)!;
        var finished = typeof(CollectiveCounters).GetMethod("Finished", System.Reflection.BindingFlags.NonPublic | System.Reflection.BindingFlags.Instance)!;
        var window = System.Diagnostics.Stopwatch.StartNew();
        started.Invoke(counters, [1000L]);
        started.Invoke(counters, [500L]);   // a second bucket while the first is in flight
        await Task.Delay(100);
        finished.Invoke(counters, null);
        finished.Invoke(counters, null);
        window.Stop();
        var (count, bytes, busy) = counters.Read();
        Assert.Equal((2L, 1500L), (count, bytes));
        // Once, not twice: the busy time is at most the window both were in flight (a loaded machine stretches the
        // delay, so the bound is the measured window, not 2 x 100 ms).
        Assert.InRange(busy.TotalMilliseconds, 90, window.Elapsed.TotalMilliseconds);
    }
}
