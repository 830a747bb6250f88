namespace Distributed.Training;

/// <summary>One optimizer step, as written to metrics.jsonl.</summary>
public sealed record StepMetrics(long Step, double Loss, double LearningRate, double GradNorm, double TokensPerSecond, double StepMs);

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
