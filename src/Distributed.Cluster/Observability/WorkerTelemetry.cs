using System.Diagnostics;
using Distributed.Comm;
using Distributed.Core;
using Distributed.Training;

namespace Distributed.Cluster;

/// <summary>
/// One rank's <see cref="WorkerSample"/>s, made on the training thread from what it already has (the step's
/// metrics, the data plane's and process groups' counters, the process's CPU time and memory): a few additions per
/// step and a sample every cluster.report-interval. Only when the coordinator serves metrics or a status page.
/// </summary>
public sealed class WorkerTelemetry : IDisposable
{
    readonly TimeSpan _interval;
    readonly DataPlaneCounters _traffic;
    readonly ProcessGroup? _gradients, _tensor;
    readonly string _host;
    readonly RankCoordinates _at;
    readonly double _linkCapacity;
    readonly GpuSampler? _gpu;
    readonly Stopwatch _window = new();
    int _steps;
    double _stepMs, _computeMs, _communicationMs, _waitingMs;
    (long AllReduces, long Bytes, TimeSpan Busy) _lastGradients, _lastTensor;
    TimeSpan _lastCpu;

    WorkerTelemetry(JobSpec spec, DataPlaneNode node, TrainerGroups groups, double linkCapacity, bool gpuUsed)
    {
        _interval = TimeSpan.FromSeconds(spec.Observability.ReportIntervalSeconds);
        _traffic = node.Counters;
        _gradients = groups.Gradients as ProcessGroup;
        _tensor = groups.Tensor as ProcessGroup;
        _host = node.Host;
        _at = groups.Coordinates;
        _linkCapacity = linkCapacity;
        _gpu = GpuSampler.Start(gpuUsed, TimeSpan.FromSeconds(Math.Max(2, spec.Observability.ReportIntervalSeconds)));
        (_lastGradients, _lastTensor, _lastCpu) = (Read(_gradients), Read(_tensor), Environment.CpuUsage.TotalTime);
    }

    /// <summary>
    /// Telemetry for this rank when the job is watched (null otherwise), after measuring the links: every rank of
    /// the generation calls this at the same point, since the probe is a collective of them all.
    /// </summary>
    public static WorkerTelemetry? Start(JobSpec spec, DataPlaneNode node, PeerLinks links, TrainerGroups groups, CollectiveOptions options,
        bool gpuUsed, CancellationToken cancellationToken)
    {
        if (!spec.Observability.Serves) return null;
        double capacity = LinkProbe.MeasureAsync(groups.World, cancellationToken: cancellationToken).GetAwaiter().GetResult();
        return new WorkerTelemetry(spec, node, groups, capacity, gpuUsed);
    }

    /// <summary>Bytes of the tensors this rank keeps for training (weights, gradients, optimizer moments).</summary>
    public long TensorBytes { get; set; }

    /// <summary>Adds a step; returns a sample on the first step and whenever report-interval has passed since the last one.</summary>
    public WorkerSample? OnStep(StepMetrics m)
    {
        _steps++;
        _stepMs += m.StepMs;
        _computeMs += m.ComputeMs - m.TensorParallelMs;
        _communicationMs += m.TensorParallelMs;
        _waitingMs += m.AllReduceMs;
        if (_window.IsRunning && _window.Elapsed < _interval) return null;
        double seconds = _window.IsRunning ? _window.Elapsed.TotalSeconds : 0;
        _window.Restart();

        var cpu = Environment.CpuUsage.TotalTime;
        double cpuCores = seconds > 0 ? (cpu - _lastCpu).TotalSeconds / seconds : 0;
        _lastCpu = cpu;
        double dataBus = BusBandwidth(_gradients, ref _lastGradients), tensorBus = BusBandwidth(_tensor, ref _lastTensor);
        int n = _steps;
        var sample = new WorkerSample(_host, Environment.ProcessId, _at.Tp, _at.Dp, _at.Pp,
            n, _stepMs / n, _computeMs / n, _communicationMs / n, _waitingMs / n, Math.Max(0, (_stepMs - _computeMs - _communicationMs - _waitingMs) / n),
            _traffic.BytesSent, _traffic.BytesReceived, dataBus, tensorBus, _linkCapacity,
            Environment.WorkingSet, TensorBytes, cpuCores, _gpu?.Latest?.Utilisation, _gpu?.Latest?.MemoryBytes, DateTime.UtcNow);
        (_steps, _stepMs, _computeMs, _communicationMs, _waitingMs) = (0, 0, 0, 0, 0);
        return sample;
    }

    static (long, long, TimeSpan) Read(ProcessGroup? group) => group?.Counters.Read() ?? (0, 0, TimeSpan.Zero);

    /// <summary>NCCL's bus bandwidth of the group's all-reduces since the last call: bytes x 2(n-1)/n over the time any was in flight.</summary>
    static double BusBandwidth(ProcessGroup? group, ref (long AllReduces, long Bytes, TimeSpan Busy) last)
    {
        if (group is not { Size: > 1 }) return 0;
        var now = group.Counters.Read();
        double bytes = now.Bytes - last.Bytes, busy = (now.Busy - last.Busy).TotalSeconds;
        last = now;
        return busy > 0 ? bytes * 2 * (group.Size - 1) / group.Size / busy : 0;
    }

    public void Dispose() => _gpu?.Dispose();
}
