namespace Distributed.Core;

/// <summary>
/// The files of a run directory that watching a job reads and writes (the metrics the Trainer writes, what the
/// coordinator records, what the observability parts add), named in one place.
/// </summary>
public static class RunFiles
{
    public const string Metrics = "metrics.jsonl";
    public const string Evals = "eval.jsonl";
    public const string Recoveries = "recovery.jsonl";
    /// <summary>Generations a restarted coordinator took over as they ran (nothing redone), with how long it was missing.</summary>
    public const string Adoptions = "adoption.jsonl";
    public const string Commits = "commits.jsonl";
    public const string Endpoints = "endpoints.json";
    public const string TensorBoard = "tensorboard";
    public const string LossPlot = "loss.png";
    public const string Job = "job.conf";

    public static string In(string runDir, string file) => Path.Combine(runDir, file);
}
