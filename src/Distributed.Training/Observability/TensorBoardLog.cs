using System.Collections.Concurrent;
using Distributed.Core;
using Distributed.Training.Checkpoints;
using TorchSharp.Modules;
using static TorchSharp.torch.utils.tensorboard;

namespace Distributed.Training.Observability;

/// <summary>
/// The run's TensorBoard curves, written through TorchSharp's own SummaryWriter into run.dir/tensorboard by the rank
/// that owns the loss (global rank 0). Every writer (each start or resume) adds a new event file to that one
/// directory, and TensorBoard reads a directory as one run, so a resumed run continues the same curves.
/// SummaryWriter opens, appends and closes its file for every scalar: that happens on a thread of this log's own,
/// so the training thread only queues a few numbers per step.
/// </summary>
public sealed class TensorBoardLog : ITrainingObserver, IDisposable
{
    // Tag names: one place (the README lists them).
    public const string TrainLoss = "loss/train", ValLoss = "loss/val", EvalTrainLoss = "loss/train_eval", ValPerplexity = "perplexity/val",
        LearningRate = "optimizer/learning_rate", GradNorm = "optimizer/grad_norm", TokensPerSecond = "throughput/tokens_per_s",
        Step = "progress/step", StepMs = "time/step_ms", ComputeMs = "time/compute_ms", CommunicationMs = "time/communication_ms",
        AllReduceWaitMs = "time/allreduce_wait_ms", TensorParallelMs = "time/tp_allreduce_ms",
        CheckpointCopyMs = "checkpoint/copy_ms", CheckpointWriteMs = "checkpoint/write_ms", CheckpointMegabytes = "checkpoint/mb";

    readonly record struct Scalar(string Tag, float Value, int Step, long WallTime);

    readonly SummaryWriter _writer;
    readonly BlockingCollection<Scalar[]> _queue = new(boundedCapacity: 10_000);
    readonly Thread _thread;
    readonly ShardWriter? _checkpoints;

    /// <param name="checkpoints">whose shard timings become checkpoint scalars</param>
    public TensorBoardLog(string directory, ShardWriter? checkpoints = null)
    {
        Directory = directory;
        _writer = SummaryWriter(directory);
        _checkpoints = checkpoints;
        if (checkpoints is not null) checkpoints.Written += OnShardWritten;
        _thread = new Thread(Drain) { IsBackground = true, Name = "tensorboard" };
        _thread.Start();
    }

    public string Directory { get; }

    /// <summary>The log of a run when this rank writes one (the leader, with run.tensorboard on); null otherwise.</summary>
    public static TensorBoardLog? ForRun(JobSpec spec, bool isLeader, ShardWriter checkpoints) =>
        isLeader && spec.Observability.TensorBoard ? new TensorBoardLog(RunFiles.In(spec.RunDir, RunFiles.TensorBoard), checkpoints) : null;

    public void OnStep(StepMetrics m) => Add((int)m.Step,
        (TrainLoss, m.Loss), (LearningRate, m.LearningRate), (GradNorm, m.GradNorm), (TokensPerSecond, m.TokensPerSecond), (Step, m.Step),
        (StepMs, m.StepMs), (ComputeMs, m.ComputeMs - m.TensorParallelMs), (CommunicationMs, m.TensorParallelMs + m.AllReduceMs),
        (AllReduceWaitMs, m.AllReduceMs), (TensorParallelMs, m.TensorParallelMs));

    public void OnEval(EvalResult r) => Add((int)r.Step, (ValLoss, r.ValLoss), (EvalTrainLoss, r.TrainLoss), (ValPerplexity, r.ValPerplexity));

    void OnShardWritten(ShardTiming t) =>
        Add((int)t.Step, (CheckpointCopyMs, t.CopyMs), (CheckpointWriteMs, t.WriteMs), (CheckpointMegabytes, t.Bytes / 1e6));

    void Add(int step, params (string Tag, double Value)[] values)
    {
        // When the value was logged, not when the thread wrote it; SummaryWriter takes whole seconds since 1970.
        long wall = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        var batch = values.Select(v => new Scalar(v.Tag, (float)v.Value, step, wall)).ToArray();
        // Never blocks training: a full queue (a stalled disk) drops the step's scalars; metrics.jsonl keeps them.
        try { _queue.TryAdd(batch); }
        catch (InvalidOperationException) { }   // disposed: the run is over
    }

    void Drain()
    {
        foreach (var batch in _queue.GetConsumingEnumerable())
            foreach (var s in batch)
            {
                try { _writer.add_scalar(s.Tag, s.Value, s.Step, s.WallTime); }
                catch (IOException) { }   // a full or vanished disk costs curves, not the run
            }
    }

    /// <summary>Writes everything queued, then stops.</summary>
    public void Dispose()
    {
        if (_checkpoints is not null) _checkpoints.Written -= OnShardWritten;
        _queue.CompleteAdding();
        _thread.Join();
        _queue.Dispose();
    }
}

/// <summary>Hands each event to several observers in turn.</summary>
public sealed class TrainingObservers(params ITrainingObserver[] observers) : ITrainingObserver
{
    /// <summary><paramref name="first"/> alone when there is no second.</summary>
    public static ITrainingObserver Combine(ITrainingObserver first, ITrainingObserver? second) =>
        second is null ? first : new TrainingObservers(first, second);

    public void OnStart(long firstStep, long lastStep) { foreach (var o in observers) o.OnStart(firstStep, lastStep); }
    public void OnStep(StepMetrics metrics) { foreach (var o in observers) o.OnStep(metrics); }
    public void OnEval(EvalResult result) { foreach (var o in observers) o.OnEval(result); }
    public void OnCheckpoint(long step, string path) { foreach (var o in observers) o.OnCheckpoint(step, path); }
}
