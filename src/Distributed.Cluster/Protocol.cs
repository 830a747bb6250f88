using Akka.Actor;
using Distributed.Core;
using Distributed.Training;
using Distributed.Training.Checkpoints;

namespace Distributed.Cluster;

// The messages between coordinator, workers, the launcher and whoever watches the job. Control only: tensors go
// over the data plane.

/// <summary>
/// Worker -> coordinator: I am here and free; my data plane listens at <paramref name="DataPlaneEndpoint"/>.
/// <paramref name="RankHint"/>: the rank this worker would like (a Kubernetes Job's completion index), so ranks stay
/// with pods across generations; placing tensor-parallel groups on one host comes first.
/// </summary>
public sealed record RegisterWorker(IActorRef Worker, string DataPlaneEndpoint, string Host, int ProcessId, int? RankHint = null);

/// <summary>
/// Coordinator -> worker: your rank in generation <paramref name="Generation"/>, your peers, the job, the committed
/// checkpoint to start from (null: from scratch), and the faults this rank is to inject.
/// </summary>
public sealed record AssignRank(long Generation, int Rank, IReadOnlyList<string> Endpoints, string JobHocon, string? ResumeFrom, Fault[] Faults);

/// <summary>Worker -> coordinator: this rank built its model (loading the checkpoint took <paramref name="LoadMs"/>) and trains from <paramref name="FirstStep"/>.</summary>
public sealed record RankStarted(long Generation, int Rank, long FirstStep, long LastStep, double LoadMs);

/// <summary>
/// Worker -> coordinator, after a step: rank 0 at most every 200 ms (the display), and every rank with a
/// <paramref name="Sample"/> every cluster.report-interval when the job is watched.
/// </summary>
public sealed record StepDone(long Generation, int Rank, StepMetrics Metrics, WorkerSample? Sample = null);

/// <summary>Worker -> coordinator, after each evaluation.</summary>
public sealed record EvalDone(long Generation, int Rank, EvalResult Result);

/// <summary>Worker -> coordinator: this rank's shard of the checkpoint at <paramref name="Step"/> is durable (phase one of the commit).</summary>
public sealed record ShardWritten(long Generation, int Rank, long Step, string Directory, ShardRecord Shard);

/// <summary>Coordinator -> workers: the checkpoint at <paramref name="Step"/> is committed (phase two).</summary>
public sealed record CheckpointCommittedNotice(long Generation, long Step, string Directory);

/// <summary>Worker -> coordinator: training finished on this rank (its final shard was reported before).</summary>
public sealed record WorkerFinished(long Generation, int Rank, long Step);

/// <summary>
/// Worker -> coordinator: training failed on this rank; <paramref name="FailedPeer"/> when a collective named one.
/// <paramref name="Fatal"/> when retrying cannot help (a <see cref="DeterministicException"/>: bad config, data or vocabulary, a
/// checkpoint of another model, a full disk): the coordinator then ends the job with the reason instead of restarting.
/// </summary>
public sealed record WorkerFailed(long Generation, int Rank, string Reason, int? FailedPeer, bool Fatal);

/// <summary>Worker or coordinator -> coordinator: an injected fault is about to happen (journaled, so it fires once).</summary>
public sealed record FaultFired(string Fault, DateTime At);

/// <summary>Coordinator -> workers: generation <paramref name="Generation"/> is over; stop training and register again.</summary>
public sealed record AbortGeneration(long Generation, string Reason);

/// <summary>
/// A restarted coordinator -> worker nodes: who of you is in generation <paramref name="Generation"/>? Each answers
/// with <see cref="GenerationMember"/> or <see cref="NotInGeneration"/>; when every rank answers, the coordinator
/// adopts the generation as it runs instead of aborting it.
/// </summary>
public sealed record AdoptGeneration(long Generation);

/// <summary>
/// Worker -> coordinator: I am <paramref name="Rank"/> of generation <paramref name="Generation"/>, still training or
/// finished (<paramref name="FinishedStep"/>); the shards I reported that I have no commit notice for (the old
/// coordinator may have died holding them); my start report.
/// </summary>
public sealed record GenerationMember(long Generation, int Rank, RegisterWorker Worker, ShardWritten[] UncommittedShards, long? FinishedStep, RankStarted? Started);

/// <summary>Worker -> coordinator: this worker is not (or no longer) in generation <paramref name="Generation"/>.</summary>
public sealed record NotInGeneration(long Generation, int ProcessId);

/// <summary>Launcher -> coordinator: a process of the job died (the launcher saw it exit), so its node is down.</summary>
public sealed record ProcessExited(int ProcessId, string Description);

/// <summary>Coordinator -> workers: the job is over; stop.</summary>
public sealed record Shutdown(bool JobCompleted, string Reason);

/// <summary>Anyone -> coordinator: how is the job? Answered with <see cref="JobStatus"/> once the journal is replayed (a readiness probe).</summary>
public sealed record JobStatusRequest;

/// <summary>Coordinator -> asker: the current generation, the newest committed step (0: none), whether the job has ended.</summary>
public sealed record JobStatus(long Generation, long CommittedStep, bool Ended);

/// <summary>Anyone -> coordinator: send me the job's events (<see cref="JobEvent"/>s).</summary>
public sealed record SubscribeToJob(IActorRef Subscriber);

public abstract record JobEvent;
public sealed record JobStarted(long Generation, int WorldSize, long FirstStep, long LastStep) : JobEvent;
public sealed record JobStepReport(StepMetrics Metrics, int WorldSize) : JobEvent;
public sealed record JobEvalReport(EvalResult Result) : JobEvent;
/// <param name="LatencySeconds">from the first shard's report to the commit being durable in the journal</param>
public sealed record JobCheckpointCommitted(long Step, string Directory, long Bytes = 0, double LatencySeconds = 0) : JobEvent;
public sealed record JobRecovering(long AbortedGeneration, string Reason, int Restarts, int MaxRestarts) : JobEvent;
public sealed record JobCompleted(long Step, string? FinalCheckpoint) : JobEvent;
public sealed record JobFailed(string Reason) : JobEvent;

// For watchers (metrics, the status page): where the ranks are, what each reports, what the journal holds.
public sealed record WorkerPlacement(int Rank, string Host, int ProcessId, int Tp, int Dp, int Pp);
public sealed record JobGenerationStarted(long Generation, string Layout, WorkerPlacement[] Workers, long ResumeStep, DateTime At) : JobEvent;
public sealed record JobWorkerReport(long Generation, int Rank, StepMetrics Metrics, WorkerSample Sample) : JobEvent;
public sealed record JobFaultInjected(string Fault, DateTime At) : JobEvent;

/// <summary>Sent to a new subscriber: the job as the journal knows it (commits, faults, generation, restarts).</summary>
public sealed record JobHistory(string Name, int ExpectedWorkers, JobState State) : JobEvent;
