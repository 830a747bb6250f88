using Distributed.Core;
using Distributed.Training.Checkpoints;

namespace Distributed.Cluster;

// What the coordinator journals (Akka.Persistence.Sql): enough to resume the job after any process, the
// coordinator's own included, is lost. Replaying these events rebuilds JobState.

/// <summary>
/// A `dtrain train` (or --resume) started the job: <paramref name="Submission"/> identifies that invocation, so a
/// coordinator restarted within it continues, while a new one (a resume, possibly with more steps or another
/// worker count) starts a new attempt on the same journal and commits.
/// </summary>
public sealed record JobSubmitted(string Submission, string JobHocon, int Workers, DateTime At);
public sealed record GenerationStarted(long Generation, int WorldSize, long ResumeStep, DateTime At);
public sealed record GenerationAborted(long Generation, string Reason, DateTime At);
/// <summary>A restarted coordinator took over generation <paramref name="Generation"/> as it ran: no step was redone.</summary>
public sealed record GenerationAdopted(long Generation, DateTime At);
public sealed record CheckpointCommitted(long Step, long Generation, ShardRecord[] Shards, DateTime At);
/// <summary>Retention is about to delete these commits' files: from now on the job's state no longer offers them to resume from.</summary>
public sealed record CheckpointsRetired(long[] Steps, DateTime At);
public sealed record FaultInjected(string Fault, DateTime At);
public sealed record JobEnded(bool Completed, long Step, string Reason, DateTime At);

/// <summary>The job as the journal knows it; also the snapshot's payload.</summary>
public sealed record JobState(
    string? Submission, string? JobHocon, long Generation, int Restarts, CheckpointCommitted[] Commits, FaultInjected[] FiredFaults, JobEnded? End)
{
    public static readonly JobState Empty = new(null, null, 0, 0, [], [], null);

    /// <summary>Whether <see cref="Generation"/> was started and neither aborted nor ended: a restarted coordinator may adopt it.</summary>
    public bool GenerationRunning { get; init; }

    public JobState Apply(object e) => e switch
    {
        JobSubmitted s => this with { Submission = s.Submission, JobHocon = s.JobHocon, Restarts = 0, End = null, GenerationRunning = false },
        // A generation resumes from the newest commit that verifies: newer ones failed verification and leave the state
        // (else retention would count them and delete the new generation's commits as older).
        GenerationStarted g => this with { Generation = g.Generation, Commits = [.. Commits.Where(c => c.Step <= g.ResumeStep)], GenerationRunning = true },
        GenerationAborted => this with { Restarts = Restarts + 1, GenerationRunning = false },
        CheckpointCommitted c => this with { Commits = [.. Commits.Where(x => x.Step != c.Step), c] },
        CheckpointsRetired r => this with { Commits = [.. Commits.Where(x => !r.Steps.Contains(x.Step))] },
        FaultInjected f => this with { FiredFaults = [.. FiredFaults, f] },
        JobEnded end => this with { End = end, GenerationRunning = false },
        _ => this,
    };

    public bool HasFired(Fault fault) => FiredFaults.Any(f => f.Fault == fault.Text);

    // Methods, not properties: the state is a snapshot, serialized member by member.
    public IEnumerable<CheckpointCommitted> CommitsNewestFirst() => Commits.OrderByDescending(c => c.Step);
}
