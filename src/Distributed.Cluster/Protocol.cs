using Akka.Actor;
using Distributed.Training;

namespace Distributed.Cluster;

// The messages between coordinator, workers and whoever watches the job. Control only: tensors go over gRPC.

/// <summary>Worker -> coordinator: I am here; my data plane listens at <paramref name="DataPlaneEndpoint"/>.</summary>
public sealed record RegisterWorker(IActorRef Worker, string DataPlaneEndpoint, string Host, int ProcessId);

/// <summary>Coordinator -> worker: your rank in generation <paramref name="Generation"/>, your peers, and the job.</summary>
public sealed record AssignRank(long Generation, int Rank, IReadOnlyList<string> Endpoints, string JobHocon, string? ResumeFrom);

/// <summary>Worker -> coordinator, every step.</summary>
public sealed record StepDone(long Generation, int Rank, StepMetrics Metrics);

/// <summary>Worker -> coordinator, after each evaluation.</summary>
public sealed record EvalDone(long Generation, int Rank, EvalResult Result);

/// <summary>Worker -> coordinator: training finished on this rank.</summary>
public sealed record WorkerFinished(long Generation, int Rank, long Step, string? FinalCheckpoint);

/// <summary>Worker -> coordinator: training failed on this rank; <paramref name="FailedPeer"/> when a collective named one.</summary>
public sealed record WorkerFailed(long Generation, int Rank, string Reason, int? FailedPeer);

/// <summary>Coordinator -> workers: the job is over; stop.</summary>
public sealed record Shutdown(bool JobCompleted, string Reason);

/// <summary>Anyone -> coordinator: send me the job's events (<see cref="JobEvent"/>s).</summary>
public sealed record SubscribeToJob(IActorRef Subscriber);

public abstract record JobEvent;
public sealed record JobStarted(long Generation, int WorldSize, long FirstStep, long LastStep) : JobEvent;
public sealed record JobStepReport(StepMetrics Metrics, int WorldSize) : JobEvent;
public sealed record JobEvalReport(EvalResult Result) : JobEvent;
public sealed record JobCompleted(long Step, string? FinalCheckpoint) : JobEvent;
public sealed record JobFailed(string Reason) : JobEvent;

/// <summary>Worker -> coordinator: this rank's training loop started at <paramref name="FirstStep"/> and runs to <paramref name="LastStep"/>.</summary>
public sealed record RankStarted(long Generation, int Rank, long FirstStep, long LastStep);
