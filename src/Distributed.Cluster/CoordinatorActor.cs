using Akka.Actor;
using Akka.Event;

namespace Distributed.Cluster;

/// <summary>
/// The job's authority (a cluster singleton on the coordinator node): waits for the configured number of workers,
/// assigns ranks and peer endpoints for a generation, relays progress to subscribers, and ends the job.
/// States: WaitingForWorkers -> Running -> Completed | Failed. Recovery (a new generation) comes with persistence.
/// </summary>
public sealed class CoordinatorActor : ReceiveActor
{
    readonly string _jobHocon;
    readonly int _expectedWorkers;
    readonly string? _resumeFrom;
    readonly List<RegisterWorker> _workers = [];
    readonly HashSet<IActorRef> _subscribers = [];
    readonly HashSet<int> _finished = [];
    readonly ILoggingAdapter _log = Context.GetLogger();
    long _generation;
    bool _ended;

    public CoordinatorActor(string jobHocon, int expectedWorkers, string? resumeFrom)
    {
        _jobHocon = jobHocon;
        _expectedWorkers = expectedWorkers;
        _resumeFrom = resumeFrom;
        Receive<SubscribeToJob>(m => _subscribers.Add(m.Subscriber));
        Become(WaitingForWorkers);
    }

    public static Props Props(string jobHocon, int expectedWorkers, string? resumeFrom) =>
        Akka.Actor.Props.Create(() => new CoordinatorActor(jobHocon, expectedWorkers, resumeFrom));

    void WaitingForWorkers()
    {
        Receive<SubscribeToJob>(m => _subscribers.Add(m.Subscriber));
        Receive<RegisterWorker>(m =>
        {
            if (_workers.Any(w => w.Worker.Equals(m.Worker))) return;
            _workers.Add(m);
            Context.Watch(m.Worker);
            _log.Info("Worker {0} registered ({1}/{2}), data plane {3}", m.Worker.Path.Address, _workers.Count, _expectedWorkers, m.DataPlaneEndpoint);
            if (_workers.Count == _expectedWorkers) StartGeneration();
        });
        Receive<Terminated>(t => _workers.RemoveAll(w => w.Worker.Equals(t.ActorRef)));
    }

    void StartGeneration()
    {
        _generation++;
        var endpoints = _workers.Select(w => w.DataPlaneEndpoint).ToList();
        for (int rank = 0; rank < _workers.Count; rank++)
            _workers[rank].Worker.Tell(new AssignRank(_generation, rank, endpoints, _jobHocon, _resumeFrom));
        _log.Info("Generation {0} started with {1} workers", _generation, _workers.Count);
        Become(Running);
    }

    void Running()
    {
        Receive<SubscribeToJob>(m => _subscribers.Add(m.Subscriber));
        Receive<RegisterWorker>(m => { });   // late retries of a registration already counted
        Receive<RankStarted>(m => m.Generation == _generation && m.Rank == 0,
            m => Publish(new JobStarted(_generation, _workers.Count, m.FirstStep, m.LastStep)));
        Receive<StepDone>(m => m.Generation == _generation && m.Rank == 0, m => Publish(new JobStepReport(m.Metrics, _workers.Count)));
        Receive<EvalDone>(m => m.Generation == _generation && m.Rank == 0, m => Publish(new JobEvalReport(m.Result)));
        Receive<WorkerFinished>(m => m.Generation == _generation, m =>
        {
            _finished.Add(m.Rank);
            _lastCheckpoint = m.FinalCheckpoint ?? _lastCheckpoint;   // rank 0 writes checkpoints
            if (_finished.Count == _workers.Count) End(new JobCompleted(m.Step, _lastCheckpoint));
        });
        Receive<WorkerFailed>(m => m.Generation == _generation, m => End(new JobFailed(m.FailedPeer is int lost && lost >= 0 && lost < _workers.Count
            ? $"rank {lost} ({Describe(lost)}) was lost: {m.Reason} (reported by rank {m.Rank})"
            : $"rank {m.Rank} ({Describe(m.Rank)}) failed: {m.Reason}")));
        Receive<Terminated>(t =>
        {
            int rank = _workers.FindIndex(w => w.Worker.Equals(t.ActorRef));
            if (rank >= 0 && !_finished.Contains(rank))
                End(new JobFailed($"rank {rank} ({Describe(rank)}) left the cluster"));
        });
        ReceiveAny(_ => { });   // reports of an older generation
    }

    string? _lastCheckpoint;

    string Describe(int rank) => $"worker pid {_workers[rank].ProcessId} on {_workers[rank].Host}";

    void End(JobEvent outcome)
    {
        string reason = outcome is JobFailed failed ? failed.Reason : "job completed";
        if (_ended) return;
        _ended = true;
        Publish(outcome);
        foreach (var w in _workers) w.Worker.Tell(new Shutdown(outcome is JobCompleted, reason));
        Become(() =>
        {
            Receive<SubscribeToJob>(m => { _subscribers.Add(m.Subscriber); m.Subscriber.Tell(outcome); });
            ReceiveAny(_ => { });
        });
    }

    void Publish(JobEvent e)
    {
        foreach (var s in _subscribers) s.Tell(e);
    }
}
