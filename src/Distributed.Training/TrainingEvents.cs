namespace Distributed.Training;

/// <summary>
/// One optimizer step, as written to metrics.jsonl. Loss is the mean over the global batch; ComputeMs is forward and
/// backward; AllReduceMs and AllReduceBytes are the gradient all-reduce (0 in a single process).
/// </summary>
public sealed record StepMetrics(long Step, double Loss, double LearningRate, double GradNorm, double TokensPerSecond, double StepMs,
    double ComputeMs = 0, double AllReduceMs = 0, long AllReduceBytes = 0,
    double TensorParallelMs = 0, long TensorParallelBytes = 0, long TensorParallelAllReduces = 0);

/// <summary>Mean losses over eval-iters batches of each split.</summary>
public sealed record EvalResult(long Step, double TrainLoss, double ValLoss)
{
    public double ValPerplexity => Math.Exp(ValLoss);
}

/// <summary>What a training loop tells its display (a progress bar, log lines, a worker actor).</summary>
public interface ITrainingObserver
{
    void OnStart(long firstStep, long lastStep) { }
    void OnStep(StepMetrics metrics) { }
    void OnEval(EvalResult result) { }
    void OnCheckpoint(long step, string path) { }
}
