using Akka.Actor;
using Akka.Event;
using Distributed.Cluster.Config;
using Distributed.Comm;
using Distributed.Training;
using Microsoft.Extensions.Logging;

namespace Distributed.Cluster;

/// <summary>
/// One worker process's actor: registers with the coordinator, and on AssignRank starts the training loop on its
/// own thread. The loop reports back by message (to this actor, which forwards), so no Receive ever blocks.
/// </summary>
public sealed class WorkerActor : ReceiveActor, IWithTimers
{
    readonly DataPlaneNode _node;
    readonly IActorRef _coordinator;
    readonly ILoggerFactory _loggerFactory;
    readonly TaskCompletionSource<int> _exitCode;
    readonly ILoggingAdapter _log = Context.GetLogger();
    long _generation = -1;

    sealed record TryRegister;

    public ITimerScheduler Timers { get; set; } = null!;

    public WorkerActor(DataPlaneNode node, IActorRef coordinator, ILoggerFactory loggerFactory, TaskCompletionSource<int> exitCode)
    {
        _node = node;
        _coordinator = coordinator;
        _loggerFactory = loggerFactory;
        _exitCode = exitCode;

        Receive<TryRegister>(_ => _coordinator.Tell(new RegisterWorker(Self, _node.Endpoint, _node.Host, Environment.ProcessId)));
        Receive<AssignRank>(OnAssignRank);
        Receive<RankStarted>(m => _coordinator.Tell(m));
        Receive<StepDone>(m => _coordinator.Tell(m));
        Receive<EvalDone>(m => _coordinator.Tell(m));
        // Report first: completing the exit code starts this process's shutdown.
        Receive<WorkerFinished>(m => { _coordinator.Tell(m); _exitCode.TrySetResult(0); });
        Receive<WorkerFailed>(m => { _coordinator.Tell(m); _exitCode.TrySetResult(1); });
        Receive<Shutdown>(m =>
        {
            _log.Info("Shutting down: {0}", m.Reason);
            _exitCode.TrySetResult(m.JobCompleted ? 0 : 1);
        });
    }

    public static Props Props(DataPlaneNode node, IActorRef coordinator, ILoggerFactory loggerFactory, TaskCompletionSource<int> exitCode) =>
        Akka.Actor.Props.Create(() => new WorkerActor(node, coordinator, loggerFactory, exitCode));

    protected override void PreStart() =>
        // Registration is repeated until a rank arrives: the singleton may not be up yet.
        Timers.StartPeriodicTimer("register", new TryRegister(), TimeSpan.Zero, TimeSpan.FromSeconds(1));

    void OnAssignRank(AssignRank m)
    {
        if (m.Generation <= _generation) return;
        _generation = m.Generation;
        Timers.Cancel("register");
        var self = Self;
        var logger = _loggerFactory.CreateLogger($"worker.rank{m.Rank}");
        var thread = new Thread(() => TrainingLoop(m, self, logger)) { IsBackground = true, Name = $"training-rank-{m.Rank}" };
        thread.Start();
    }

    /// <summary>Runs on the training thread; talks to the actor only by message.</summary>
    void TrainingLoop(AssignRank assignment, IActorRef self, Microsoft.Extensions.Logging.ILogger logger)
    {
        long generation = assignment.Generation;
        int rank = assignment.Rank;
        try
        {
            var spec = JobConfigLoader.Parse(assignment.JobHocon, origin: "the coordinator's job");
            _node.BeginGeneration(generation, rank);
            var transport = TransportKinds.Parse(spec.Cluster.Transport);
            var links = new PeerLinks(_node, generation, assignment.Endpoints, transport);
            try
            {
                var members = Enumerable.Range(0, assignment.Endpoints.Count).ToArray();
                var options = new CollectiveOptions { Timeout = TimeSpan.FromSeconds(spec.Cluster.CollectiveTimeoutSeconds) };
                var dataParallel = new ProcessGroup(links, groupId: 0, members, options);
                // Compressed gradients get a group of their own, so weights, losses and evaluations stay exact.
                var gradients = spec.Cluster.Compression == "bf16"
                    ? new ProcessGroup(links, groupId: 1, members, options with { Compression = Compression.BFloat16 })
                    : dataParallel;
                using var trainer = new Trainer(spec, logger, assignment.ResumeFrom, dataParallel, gradients);
                string? lastCheckpoint = null;
                trainer.Run(new Reporter(self, generation, rank, path => lastCheckpoint = path));
                self.Tell(new WorkerFinished(generation, rank, trainer.Step, lastCheckpoint));
            }
            finally
            {
                links.DisposeAsync().AsTask().GetAwaiter().GetResult();
            }
        }
        catch (Exception e)
        {
            int? peer = (e as PeerFailedException)?.Rank ?? (e.InnerException as PeerFailedException)?.Rank;
            logger.LogError("Training failed on rank {Rank}: {Error}", rank, e.Message);
            self.Tell(new WorkerFailed(generation, rank, e.Message, peer));
        }
    }

    /// <summary>
    /// Step reports go out from rank 0 only (the coordinator shows rank 0) and at most every 200 ms: a display needs no
    /// more, and on a small machine every message costs the training loop CPU. metrics.jsonl keeps every step.
    /// </summary>
    sealed class Reporter(IActorRef self, long generation, int rank, Action<string> onCheckpoint) : ITrainingObserver
    {
        static readonly TimeSpan ReportInterval = TimeSpan.FromMilliseconds(200);
        readonly System.Diagnostics.Stopwatch _sinceReport = System.Diagnostics.Stopwatch.StartNew();
        long _lastStep;

        public void OnStart(long firstStep, long lastStep)
        {
            _lastStep = lastStep;
            self.Tell(new RankStarted(generation, rank, firstStep, lastStep));
        }

        public void OnStep(StepMetrics metrics)
        {
            if (rank != 0 || (_sinceReport.Elapsed < ReportInterval && metrics.Step != _lastStep)) return;
            _sinceReport.Restart();
            self.Tell(new StepDone(generation, rank, metrics));
        }

        public void OnEval(EvalResult result) => self.Tell(new EvalDone(generation, rank, result));
        public void OnCheckpoint(long step, string path) => onCheckpoint(path);
    }
}
