using Akka.Actor;
using Distributed.Cluster.Config;
using Distributed.Comm;
using Distributed.Comm.Kernels;
using Distributed.Core;
using Distributed.Training;
using Distributed.Training.Checkpoints;
using Microsoft.Extensions.Logging;

namespace Distributed.Cluster;

/// <summary>
/// One worker process's actor: registers with the coordinator while it is free, and on AssignRank runs the training
/// loop of that generation on its own thread. The loop reports back by message (to this actor, which forwards), so
/// no Receive ever blocks. AbortGeneration cancels the loop; once it has stopped, the worker registers again for
/// the next generation. The process ends only on Shutdown (or when the launcher or the cluster is gone).
/// </summary>
public sealed class WorkerActor : ReceiveActor, IWithTimers
{
    readonly DataPlaneNode _node;
    readonly IActorRef _coordinator;
    readonly ILoggerFactory _loggerFactory;
    readonly TaskCompletionSource<int> _exitCode;
    readonly PreemptionSignal _preemption;
    readonly int? _rankHint;
    readonly Microsoft.Extensions.Logging.ILogger _log;
    long _generation = -1;
    CancellationTokenSource? _training;   // set while a training thread runs
    Task? _cancelling;                     // the callbacks of _training's cancellation, while they run
    AssignRank? _next;                     // an assignment waiting for the previous thread to stop
    WorkerFaults? _faults;
    CommitNotices? _commits;
    // What this worker tells a restarted coordinator about its generation (see AdoptGeneration).
    (long Generation, int Rank)? _member;
    readonly List<ShardWritten> _uncommitted = [];
    long? _finishedStep;
    RankStarted? _started;

    sealed record TryRegister;
    sealed record PreemptionRequested;
    sealed record TrainingStopped(long Generation);
    /// <summary>The callbacks of a cancelled generation's token have all run (<paramref name="Error"/>: one of them threw).</summary>
    sealed record CancellationFinished(long Generation, CancellationTokenSource Source, string? Error);

    public ITimerScheduler Timers { get; set; } = null!;

    public WorkerActor(DataPlaneNode node, IActorRef coordinator, ILoggerFactory loggerFactory, TaskCompletionSource<int> exitCode,
        PreemptionSignal preemption, int? rankHint)
    {
        _node = node;
        _coordinator = coordinator;
        _loggerFactory = loggerFactory;
        _exitCode = exitCode;
        _preemption = preemption;
        _rankHint = rankHint;
        _log = loggerFactory.CreateLogger("worker");

        Receive<TryRegister>(_ => _coordinator.Tell(new RegisterWorker(Self, _node.Endpoint, _node.Host, Environment.ProcessId, _rankHint)));
        // Without a generation there is nothing to save; with one, the training thread stops at the next step (PreemptionGuard).
        Receive<PreemptionRequested>(_ =>
        {
            _log.LogWarning("Asked to stop (SIGTERM){What}", _training is null ? "; not training, exiting" : "; stopping after a checkpoint of the current step");
            if (_training is null) _exitCode.TrySetResult(ExitCodes.Preempted);
        });
        Receive<AssignRank>(OnAssignRank);
        Receive<AbortGeneration>(m =>
        {
            if (m.Generation == _member?.Generation) _member = null;
            if (m.Generation < _generation || _training is null) return;
            _log.LogInformation("Generation {Generation} aborted: {Reason}", m.Generation, m.Reason);
            CancelTraining();
        });
        Receive<TrainingStopped>(OnTrainingStopped);
        Receive<CancellationFinished>(m =>
        {
            if (m.Error is not null) _log.LogError("Cancelling generation {Generation} failed in a callback: {Error}", m.Generation, m.Error);
            // Disposed here once its thread has stopped too (else OnTrainingStopped disposes it): never while callbacks still run.
            if (m.Source != _training) m.Source.Dispose();
        });
        Receive<CheckpointCommittedNotice>(m =>
        {
            if (m.Generation != _generation) return;
            _uncommitted.RemoveAll(s => s.Step <= m.Step);   // commits go in step order: an older pending one was superseded
            _faults?.Committed(m.Step, m.Directory);
            _commits?.Committed(m.Step);
        });
        Receive<RankStarted>(m => { _started = m; _coordinator.Tell(m); });
        Receive<StepDone>(m => _coordinator.Tell(m));
        Receive<EvalDone>(m => _coordinator.Tell(m));
        Receive<ShardWritten>(m => { _uncommitted.Add(m); _coordinator.Tell(m); });
        Receive<WorkerFinished>(m => { _finishedStep = m.Step; _coordinator.Tell(m); });
        Receive<WorkerFailed>(m =>
        {
            if (m.Generation == _member?.Generation) _member = null;
            _coordinator.Tell(m);
        });
        Receive<AdoptGeneration>(m =>
        {
            if (_member is { } member && member.Generation == m.Generation)
                Sender.Tell(new GenerationMember(m.Generation, member.Rank, new RegisterWorker(Self, _node.Endpoint, _node.Host, Environment.ProcessId, _rankHint),
                    [.. _uncommitted], _finishedStep, _started));
            else Sender.Tell(new NotInGeneration(m.Generation, Environment.ProcessId));
        });
        Receive<Shutdown>(m =>
        {
            _log.LogInformation("Shutting down: {Reason}", m.Reason);
            CancelTraining();
            _exitCode.TrySetResult(m.JobCompleted ? ExitCodes.Completed : ExitCodes.JobFailed);
        });
    }

    public static Props Props(DataPlaneNode node, IActorRef coordinator, ILoggerFactory loggerFactory, TaskCompletionSource<int> exitCode,
        PreemptionSignal preemption, int? rankHint) =>
        Akka.Actor.Props.Create(() => new WorkerActor(node, coordinator, loggerFactory, exitCode, preemption, rankHint));

    // Registration is repeated until a rank arrives: the singleton may not be up yet, or may be restarting.
    protected override void PreStart()
    {
        var self = Self;
        _preemption.Requested.Register(() => self.Tell(new PreemptionRequested()));
        StartRegistering();
    }

    void StartRegistering() => Timers.StartPeriodicTimer("register", new TryRegister(), TimeSpan.Zero, TimeSpan.FromSeconds(1));

    void OnAssignRank(AssignRank m)
    {
        if (m.Generation <= _generation || _preemption.IsRequested) return;
        Timers.Cancel("register");
        if (_training is not null)
        {
            // Still winding down an older generation: this one starts when that thread has stopped.
            _next = m;
            CancelTraining();
            return;
        }
        _generation = m.Generation;
        (_member, _finishedStep, _started) = ((m.Generation, m.Rank), null, null);
        _uncommitted.Clear();
        _training = new CancellationTokenSource();
        var logger = _loggerFactory.CreateLogger($"worker.rank{m.Rank}");
        _faults = new WorkerFaults(m.Faults, m.Rank, m.Endpoints.Count, _coordinator, logger);
        _commits = new CommitNotices();
        var (self, token, faults, commits) = (Self, _training.Token, _faults, _commits);
        var thread = new Thread(() => TrainingLoop(m, self, faults, commits, logger, token)) { IsBackground = true, Name = $"training-rank-{m.Rank}" };
        thread.Start();
    }

    /// <summary>
    /// Cancels the running generation without running its token's callbacks on this actor's thread: Cancel() would run
    /// every one of them here, and every continuation they complete inline (a slow one would stall this actor, and with
    /// it registration and shutdown). CancelAsync flips the token at once and runs them on the thread pool; their
    /// outcome comes back as <see cref="CancellationFinished"/>.
    /// </summary>
    void CancelTraining()
    {
        if (_training is not { IsCancellationRequested: false } training) return;
        long generation = _generation;
        _cancelling = training.CancelAsync();
        _cancelling.PipeTo(Self, success: () => new CancellationFinished(generation, training, null),
            failure: e => new CancellationFinished(generation, training, e.GetBaseException().Message));
    }

    void OnTrainingStopped(TrainingStopped m)
    {
        if (m.Generation != _generation) return;
        if (_finishedStep is null) _member = null;   // stopped without finishing: no longer in the generation
        // Callbacks still running on the thread pool: CancellationFinished disposes the source once they are done.
        if (_cancelling is not { IsCompleted: false }) _training?.Dispose();
        _training = null;
        _cancelling = null;
        if (_exitCode.Task.IsCompleted) return;
        if (_preemption.IsRequested) { _exitCode.TrySetResult(ExitCodes.Preempted); return; }
        if (_next is { } next) { _next = null; OnAssignRank(next); }
        else StartRegistering();
    }

    /// <summary>Runs on the training thread; talks to the actor only by message.</summary>
    void TrainingLoop(AssignRank assignment, IActorRef self, WorkerFaults faults, CommitNotices commits, Microsoft.Extensions.Logging.ILogger logger,
        CancellationToken cancellation)
    {
        long generation = assignment.Generation;
        int rank = assignment.Rank;
        try
        {
            var loading = System.Diagnostics.Stopwatch.StartNew();
            var spec = JobConfigLoader.Parse(assignment.JobHocon, origin: "the coordinator's job");
            _node.BeginGeneration(generation, rank, assignment.Endpoints.Count);
            var transport = TransportKinds.Parse(spec.Cluster.Transport);
            // Disposed after the links below: no collective of this generation runs on the kernels any more.
            using var kernels = ReductionKernels.ForJob(spec.Cluster.Kernels);
            logger.LogInformation("Rank {Rank} reduces with {Kernels} kernels (cluster.kernels = {Setting})", rank, kernels.Description, spec.Cluster.Kernels);
            var links = new PeerLinks(_node, generation, assignment.Endpoints, transport);
            try
            {
                faults.Attach(links, cancellation);
                var layout = ParallelLayout.For(spec, assignment.Endpoints.Count);
                var options = new CollectiveOptions { Timeout = TimeSpan.FromSeconds(spec.Cluster.CollectiveTimeoutSeconds), Kernels = kernels };
                var groups = TrainerGroups.Create(links, layout, rank, options, compressGradients: spec.Cluster.Compression == "bf16");
                logger.LogInformation("Rank {Rank} is at {Coordinates} of {Layout}, {Stage}: TP group [{Tensor}], DP group [{Data}], pipeline [{Pipeline}]",
                    rank, groups.Coordinates, layout, layout.StageOf(rank, spec.Model.Layers), string.Join(", ", layout.Group(ParallelAxis.Tensor, rank)),
                    string.Join(", ", layout.Group(ParallelAxis.Data, rank)), string.Join(", ", layout.Group(ParallelAxis.Pipeline, rank)));
                var writer = new ShardWriter(new ClusterCommit(self, generation)) { BeforeRename = faults.BeforeRename, Logger = logger };
                using var telemetry = WorkerTelemetry.Start(spec, _node, links, groups, options, gpuUsed: kernels.Description.Contains("Cuda", StringComparison.OrdinalIgnoreCase), cancellation);
                faults.BeforeStateBroadcast(cancellation);
                // The constructor's state broadcast waits on peers: an aborted generation cancels it too.
                using var trainer = new Trainer(spec, logger, assignment.ResumeFrom, groups, writer, cancellation);
                // What this rank holds: its weights and moments (a share of them under ZeRO-1), and gradients the size of the weights.
                if (telemetry is not null)
                    telemetry.TensorBytes = trainer.StateTensors().Sum(s => s.Tensor.NumberOfElements * s.Tensor.ElementSize)
                        + trainer.Model.Parameters.Sum(p => p.Tensor.NumberOfElements * p.Tensor.ElementSize);
                var preemption = new PreemptionGuard(_preemption, groups.World, trainer, commits, spec.Train.MaxIters,
                    reason => self.Tell(new WorkerFailed(generation, rank, reason, null, Fatal: false)), logger, cancellation);
                trainer.Run(new Reporter(self, generation, rank, trainer.IsLeader, loading.Elapsed.TotalMilliseconds, faults, telemetry, preemption), cancellationToken: cancellation);
                self.Tell(new WorkerFinished(generation, rank, trainer.Step));
            }
            finally
            {
                links.DisposeAsync().AsTask().GetAwaiter().GetResult();
            }
        }
        catch (Exception) when (cancellation.IsCancellationRequested)
        {
            logger.LogInformation("Rank {Rank} stopped generation {Generation}", rank, generation);
        }
        catch (PreemptionStop stop)
        {
            logger.LogInformation("Rank {Rank} stopped generation {Generation} after step {Step} for a preemption", rank, generation, stop.Step);
        }
        catch (Exception e)
        {
            int? peer = (e as PeerFailedException)?.Rank ?? (e.InnerException as PeerFailedException)?.Rank;
            logger.LogError("Training failed on rank {Rank}: {Error}", rank, e.Message);
            self.Tell(new WorkerFailed(generation, rank, e.Message, peer, Fatal: e is DeterministicException));
        }
        finally
        {
            self.Tell(new TrainingStopped(generation));
        }
    }

    /// <summary>Phase one of a checkpoint commit: this rank's shard is durable; the coordinator commits when all are.</summary>
    sealed class ClusterCommit(IActorRef self, long generation) : ICheckpointCommit
    {
        public void ShardWritten(long step, string directory, ShardRecord shard) =>
            self.Tell(new ShardWritten(generation, shard.Rank, step, directory, shard));
    }

    /// <summary>
    /// Step reports go out from the reporting rank only (the last stage's, which has the loss) at most every 200 ms: a
    /// display needs no more, and on a small machine every message costs the training loop CPU. metrics.jsonl keeps
    /// every step. When the job is watched, every rank also reports a sample every cluster.report-interval.
    /// </summary>
    sealed class Reporter(IActorRef self, long generation, int rank, bool reports, double loadMs, WorkerFaults faults, WorkerTelemetry? telemetry, PreemptionGuard preemption) : ITrainingObserver
    {
        static readonly TimeSpan ReportInterval = TimeSpan.FromMilliseconds(200);
        readonly System.Diagnostics.Stopwatch _sinceReport = new();
        long _lastStep;

        public void OnStart(long firstStep, long lastStep)
        {
            _lastStep = lastStep;
            self.Tell(new RankStarted(generation, rank, firstStep, lastStep, loadMs));
        }

        public void OnStep(StepMetrics metrics)
        {
            faults.AfterStep(metrics.Step);
            var sample = telemetry?.OnStep(metrics);
            bool display = reports && (!_sinceReport.IsRunning || _sinceReport.Elapsed >= ReportInterval || metrics.Step == _lastStep);
            if (display || sample is not null)
            {
                if (display) _sinceReport.Restart();
                self.Tell(new StepDone(generation, rank, metrics, sample));
            }
            preemption.AfterStep(metrics.Step);   // a collective: every rank, every step
        }

        public void OnEval(EvalResult result)
        {
            if (reports) self.Tell(new EvalDone(generation, rank, result));
        }
    }
}
