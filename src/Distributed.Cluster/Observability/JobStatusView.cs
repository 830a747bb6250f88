namespace Distributed.Cluster;

// The job as a watcher sees it: what /api/status returns, what the status page draws, what `dtrain status` prints and
// what /metrics is made from. Immutable: the status actor replaces the whole view, readers never lock.

public sealed record JobStatusView(
    string Job, string State, long Generation, string? Layout, int ExpectedWorkers, long Step, long LastStep,
    double? Loss, double? LearningRate, double? GradNorm, double? TokensPerSecond, EvalView? LastEval, int Restarts,
    CheckpointView? LastCheckpoint, int Commits, WorkerView[] Workers, LossPoint[] LossCurve, EvalView[] Evals, EventView[] Events,
    string? Reason, DateTime UpdatedAt)
{
    public static JobStatusView Empty(string job, int workers) =>
        new(job, "waiting", 0, null, workers, 0, 0, null, null, null, null, null, 0, null, 0, [], [], [], [], null, DateTime.UtcNow);
}

public sealed record WorkerView(int Rank, int Tp, int Dp, int Pp, string Host, int ProcessId, string State, long Step, WorkerSample? Sample, DateTime? LastReport);

public sealed record CheckpointView(long Step, string Directory, long Bytes, double LatencySeconds, DateTime At, bool? Verified, string? Problem);

public sealed record LossPoint(long Step, double Loss, double LearningRate, double TokensPerSecond, double WallTime);

public sealed record EvalView(long Step, double TrainLoss, double ValLoss, double ValPerplexity);

/// <param name="Kind">generation, fault, recovery, checkpoint, end</param>
public sealed record EventView(DateTime At, string Kind, string Text);
