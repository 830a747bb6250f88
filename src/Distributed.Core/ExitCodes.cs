namespace Distributed.Core;

/// <summary>
/// What a dtrain process's exit code tells whoever restarts it (the simulation's launcher, a Kubernetes Job's
/// podFailurePolicy in k8s/base): retry, do not retry, or do not count the attempt. The manifests name these numbers;
/// a test checks that they agree.
/// </summary>
public static class ExitCodes
{
    public const int Completed = 0;

    /// <summary>A peer, the coordinator or the cluster was lost: a new attempt can succeed.</summary>
    public const int Retry = 1;

    /// <summary>Bad input (a config key, a file, a checkpoint that does not fit): every retry would fail the same way.</summary>
    public const int ConfigurationError = 2;

    /// <summary>The journal cannot be replayed: restarting would fail the same way.</summary>
    public const int Unrecoverable = 3;

    /// <summary>Asked to stop (SIGTERM: an eviction, a deleted pod) and did so cleanly: not the job's failure.</summary>
    public const int Preempted = 4;

    /// <summary>The coordinator ended the job as failed (out of restarts, a fatal worker error): retrying cannot help.</summary>
    public const int JobFailed = 5;

    /// <summary>The codes on which a Job must fail at once instead of retrying.</summary>
    public static readonly IReadOnlyList<int> DoNotRetry = [ConfigurationError, Unrecoverable, JobFailed];
}
