using Akka.Actor;
using Distributed.Training.Checkpoints;

namespace Distributed.Cluster;

/// <summary>Where the status actor puts the latest view; HTTP handlers read it without locks or messages.</summary>
public sealed class StatusBoard(JobStatusView initial)
{
    volatile JobStatusView _current = initial;

    public JobStatusView Current { get => _current; internal set => _current = value; }
}

/// <summary>
/// Watches the job for /metrics and the status page: subscribes to the coordinator's job events (renewed, as a
/// restarted coordinator forgets its subscribers), folds them into a <see cref="JobStatusView"/> on the
/// <see cref="StatusBoard"/>, and verifies each committed checkpoint off the actor. The coordinator only publishes;
/// nothing here can hold it up.
/// </summary>
public sealed class JobStatusActor : ReceiveActor, IWithTimers
{
    const int MaxCurvePoints = 2000, MaxEvents = 50;

    sealed record Renew;
    sealed record Verified(long Step, bool Ok, string? Problem);

    readonly StatusBoard _board;
    readonly JobMetrics _metrics;
    readonly string _checkpoints;
    readonly List<LossPoint> _curve = [];
    readonly List<EvalView> _evals = [];
    readonly List<EventView> _events = [];
    readonly Dictionary<int, WorkerView> _workers = [];
    JobStatusView _view;
    int _curveStride = 1;
    long _curveSkipped;

    public ITimerScheduler Timers { get; set; } = null!;

    public JobStatusActor(IActorRef coordinator, StatusBoard board, JobMetrics metrics, string runDir)
    {
        _board = board;
        _metrics = metrics;
        _view = board.Current;
        _checkpoints = Path.Combine(runDir, "checkpoints");
        Receive<Renew>(_ => coordinator.Tell(new SubscribeToJob(Self)));
        Receive<JobHistory>(OnHistory);
        Receive<JobGenerationStarted>(g =>
        {
            _workers.Clear();
            foreach (var w in g.Workers) _workers[w.Rank] = new WorkerView(w.Rank, w.Tp, w.Dp, w.Pp, w.Host, w.ProcessId, "starting", g.ResumeStep, null, null);
            Event(g.At, "generation", $"generation {g.Generation} started: {g.Layout}, {g.Workers.Length} workers, from step {g.ResumeStep}");
            Publish(_view with { State = "starting", Generation = g.Generation, Layout = g.Layout, Step = g.ResumeStep, Reason = null });
        });
        Receive<JobStarted>(s =>
        {
            foreach (var (rank, w) in _workers.ToList()) _workers[rank] = w with { State = "training" };
            Publish(_view with { State = "running", Generation = s.Generation, LastStep = s.LastStep });
        });
        Receive<JobStepReport>(r =>
        {
            var m = r.Metrics;
            AddToCurve(new LossPoint(m.Step, m.Loss, m.LearningRate, m.TokensPerSecond, (DateTime.UtcNow - DateTime.UnixEpoch).TotalSeconds));
            Publish(_view with { Step = m.Step, Loss = m.Loss, LearningRate = m.LearningRate, GradNorm = m.GradNorm, TokensPerSecond = m.TokensPerSecond });
        });
        Receive<JobWorkerReport>(r =>
        {
            if (!_workers.TryGetValue(r.Rank, out var w) || r.Generation != _view.Generation) return;
            _workers[r.Rank] = w with { State = "training", Step = r.Metrics.Step, Sample = r.Sample, LastReport = r.Sample.At, Host = r.Sample.Host, ProcessId = r.Sample.ProcessId };
            Publish(_view);
        });
        Receive<JobEvalReport>(e =>
        {
            var eval = new EvalView(e.Result.Step, e.Result.TrainLoss, e.Result.ValLoss, e.Result.ValPerplexity);
            _evals.RemoveAll(x => x.Step == eval.Step);
            _evals.Add(eval);
            Publish(_view with { LastEval = eval });
        });
        Receive<JobCheckpointCommitted>(c =>
        {
            _metrics.CommitLatency.Observe(c.LatencySeconds);
            Event(DateTime.UtcNow, "checkpoint", $"checkpoint at step {c.Step} committed ({c.Bytes:N0} bytes, {c.LatencySeconds * 1000:F0} ms after the first shard)");
            Publish(_view with { LastCheckpoint = new CheckpointView(c.Step, c.Directory, c.Bytes, c.LatencySeconds, DateTime.UtcNow, null, null), Commits = _view.Commits + 1 });
            Verify(c.Step, c.Directory);
        });
        Receive<Verified>(v =>
        {
            if (_view.LastCheckpoint is { } last && last.Step == v.Step) Publish(_view with { LastCheckpoint = last with { Verified = v.Ok, Problem = v.Problem } });
        });
        Receive<JobFaultInjected>(f => { Event(f.At, "fault", $"fault injected: {f.Fault}"); Publish(_view); });
        Receive<JobRecovering>(r =>
        {
            foreach (var (rank, w) in _workers.ToList()) _workers[rank] = w with { State = "lost generation" };
            Event(DateTime.UtcNow, "recovery", $"generation {r.AbortedGeneration} lost: {r.Reason}; restart {r.Restarts} of {r.MaxRestarts}");
            Publish(_view with { State = "recovering", Restarts = r.Restarts, Reason = r.Reason });
        });
        Receive<JobCompleted>(c =>
        {
            if (_view.State == "completed") return;
            foreach (var (rank, w) in _workers.ToList()) _workers[rank] = w with { State = "finished" };
            Event(DateTime.UtcNow, "end", $"job completed at step {c.Step}");
            Publish(_view with { State = "completed", Step = c.Step });
        });
        Receive<JobFailed>(f =>
        {
            if (_view.State == "failed") return;
            Event(DateTime.UtcNow, "end", $"job failed: {f.Reason}");
            Publish(_view with { State = "failed", Reason = f.Reason });
        });
    }

    public static Props Props(IActorRef coordinator, StatusBoard board, JobMetrics metrics, string runDir) =>
        Akka.Actor.Props.Create(() => new JobStatusActor(coordinator, board, metrics, runDir));

    protected override void PreStart() => Timers.StartPeriodicTimer("renew", new Renew(), TimeSpan.Zero, TimeSpan.FromSeconds(2));

    void OnHistory(JobHistory h)
    {
        var state = h.State;
        foreach (var f in state.FiredFaults) Event(f.At, "fault", $"fault injected: {f.Fault}");
        foreach (var c in state.Commits.OrderBy(c => c.Step).TakeLast(5))
            Event(c.At, "checkpoint", $"checkpoint at step {c.Step} committed (generation {c.Generation})");
        var newest = state.CommitsNewestFirst().FirstOrDefault();
        var last = newest is null ? _view.LastCheckpoint
            : new CheckpointView(newest.Step, CheckpointFiles.DirectoryFor(_checkpoints, newest.Step), newest.Shards.Sum(s => s.Bytes), 0, newest.At, null, null);
        Publish(_view with
        {
            Job = h.Name, ExpectedWorkers = h.ExpectedWorkers, Generation = Math.Max(_view.Generation, state.Generation), Restarts = state.Restarts,
            Commits = Math.Max(_view.Commits, state.Commits.Length), LastCheckpoint = _view.LastCheckpoint ?? last,
        });
        if (_view.LastCheckpoint is { Verified: null } unverified) Verify(unverified.Step, unverified.Directory);
    }

    /// <summary>Hashes the shards against the manifest (the coordinator writes it just after the commit, so this waits for it a little).</summary>
    void Verify(long step, string directory)
    {
        Task.Run(async () =>
        {
            for (int attempt = 0; attempt < 50 && !File.Exists(Path.Combine(directory, CheckpointFiles.ManifestName)); attempt++) await Task.Delay(100);
            var problems = CheckpointFiles.Verify(directory);
            return new Verified(step, problems.Count == 0, problems.Count == 0 ? null : string.Join("; ", problems));
        }).PipeTo(Self, failure: e => new Verified(step, false, e.Message));
    }

    /// <summary>The whole run's shape in at most MaxCurvePoints points: past that, every other point goes and the stride doubles.</summary>
    void AddToCurve(LossPoint point)
    {
        if (_curve.Count > 0 && point.Step <= _curve[^1].Step) _curve.RemoveAll(p => p.Step >= point.Step);   // a replay after a recovery
        if (_curveSkipped++ % _curveStride != 0) return;
        _curve.Add(point);
        if (_curve.Count <= MaxCurvePoints) return;
        for (int i = _curve.Count - 2; i > 0; i -= 2) _curve.RemoveAt(i);   // keeps the first and the newest
        _curveStride *= 2;
    }

    void Event(DateTime at, string kind, string text)
    {
        _events.Add(new EventView(at, kind, text));
        if (_events.Count > MaxEvents) _events.RemoveAt(0);
    }

    void Publish(JobStatusView view)
    {
        _view = view with
        {
            Workers = [.. _workers.Values.OrderBy(w => w.Rank)], LossCurve = [.. _curve], Evals = [.. _evals], Events = [.. _events.OrderBy(e => e.At)],
            UpdatedAt = DateTime.UtcNow,
        };
        _board.Current = _view;
    }
}
