using System.Diagnostics;
using Akka.Actor;
using Akka.Persistence;
using Distributed.Cluster.Config;
using Distributed.Core;
using Distributed.Training;
using Distributed.Training.Checkpoints;
using Microsoft.Extensions.Logging;

namespace Distributed.Cluster;

/// <summary>
/// What a coordinator serves: the job, how many workers it waits for, the faults to inject, a checkpoint to start
/// from when the journal has none (--resume of another run), the submission (see <see cref="JobSubmitted"/>) and the
/// journal's persistence id.
/// </summary>
public sealed record CoordinatorOptions(JobSpec Spec, int Workers, IReadOnlyList<Fault> Faults, string? ResumeFrom, string Submission, string PersistenceId);

/// <summary>
/// The job's authority (a cluster singleton on the coordinator node), journaled through Akka.Persistence so that a
/// restarted coordinator resumes the job. Per generation: wait for the workers, pick the newest checkpoint whose
/// shards verify, assign ranks; commit a checkpoint once every rank's shard is durable (two-phase); on the loss of
/// a worker or link, abort the generation and start the next one from the last commit, up to recovery.max-restarts.
/// States: WaitingForWorkers -> Starting -> Running -> (WaitingForWorkers ...) -> Ended. Every wait has a deadline
/// from the job (recovery.worker-wait-timeout, recovery.generation-start-timeout), a named timer that ends in a loud
/// failure naming what was awaited; asynchronous work comes back as a message, success or failure.
/// </summary>
public sealed class CoordinatorActor : ReceivePersistentActor, IWithTimers
{
    const string WorkerWaitTimer = "worker-wait", GenerationStartTimer = "generation-start";
    static readonly TimeSpan AdoptionAskInterval = TimeSpan.FromMilliseconds(250);

    readonly JobSpec _spec;
    readonly string _jobHocon;
    readonly int _expectedWorkers;
    readonly IReadOnlyList<Fault> _faults;
    readonly string? _resumeFrom;
    readonly string _submission;
    readonly Action<string> _onUnrecoverable;
    readonly List<RegisterWorker> _workers = [];
    readonly HashSet<IActorRef> _subscribers = [];
    readonly HashSet<int> _finished = [];
    readonly HashSet<int> _started = [];   // ranks of the running generation that built their model (RankStarted)
    readonly Dictionary<long, Dictionary<int, ShardRecord>> _pendingShards = [];
    readonly Dictionary<long, DateTime> _firstShardAt = [];
    readonly ILogger _log;
    readonly RecoveryTimeline _timeline;
    JobState _state = JobState.Empty;
    Task _fileWork = Task.CompletedTask;

    sealed record ResumePointChosen(string? Directory, long Step, string? Error);
    sealed record AskForMembers;
    /// <summary>The deadline for the expected workers to register has passed.</summary>
    sealed record WorkerWaitExpired;
    /// <summary>Generation <paramref name="Generation"/> was not under way (every rank started) by its deadline.</summary>
    sealed record GenerationStartExpired(long Generation);
    /// <summary>A piece of file work (manifest, retention, timing record) failed off the actor.</summary>
    sealed record FileWorkFailed(string What, string Error);

    public ITimerScheduler Timers { get; set; } = null!;

    public CoordinatorActor(CoordinatorOptions options, ILogger logger, Action<string> onUnrecoverable)
    {
        (_spec, _expectedWorkers, _faults, _resumeFrom, _submission) = (options.Spec, options.Workers, options.Faults, options.ResumeFrom, options.Submission);
        _jobHocon = JobConfigLoader.ToHocon(_spec);
        PersistenceId = options.PersistenceId;
        _log = logger;
        _onUnrecoverable = onUnrecoverable;
        _timeline = new RecoveryTimeline(RunFiles.In(_spec.RunDir, RunFiles.Recoveries));
        Recover<SnapshotOffer>(offer => _state = (JobState)offer.Snapshot);
        Recover<RecoveryCompleted>(_ => OnRecovered());
        RecoverAny(e => _state = _state.Apply(e));   // commands wait (Akka stashes them) until recovery completes
    }

    public override string PersistenceId { get; }

    protected override void OnRecoveryFailure(Exception reason, object? message = null)
    {
        string what = $"the journal of this job ({_spec.Persistence.Provider}, persistence id {PersistenceId}) cannot be replayed: {reason.Message}";
        _log.LogCritical("{What}", what);
        _onUnrecoverable(what);
        base.OnRecoveryFailure(reason, message);
    }

    /// <param name="onUnrecoverable">called with a reason when the journal cannot be replayed: restarting would fail the same way</param>
    public static Props Props(CoordinatorOptions options, ILogger logger, Action<string> onUnrecoverable) =>
        Akka.Actor.Props.Create(() => new CoordinatorActor(options, logger, onUnrecoverable));

    string CheckpointsDirectory => Path.Combine(_spec.RunDir, "checkpoints");

    void OnRecovered()
    {
        if (_state.Submission != _submission)
        {
            // A new submission: a fresh attempt (restart budget, outcome) over the journal's commits.
            if (_state.Generation > 0) TellWorkerNodes(new AbortGeneration(_state.Generation, "the job was submitted again"));
            Record(new JobSubmitted(_submission, _jobHocon, _expectedWorkers, DateTime.UtcNow), _ => { });
        }
        else if (_state.End is { } ended)
        {
            Become(() => Ended(ended.Completed ? new JobCompleted(ended.Step, LatestCommitDirectory()) : new JobFailed(ended.Reason)));
            return;
        }
        else
        {
            _log.LogInformation("Coordinator recovered the journal: generation {Generation}, {Commits} commits (newest step {Step}), {Restarts} restarts",
                _state.Generation, _state.Commits.Length, _state.CommitsNewestFirst().FirstOrDefault()?.Step ?? 0, _state.Restarts);
            if (_state.FiredFaults.LastOrDefault() is { } fired) _timeline.FaultFired(fired.Fault, fired.At);
            // The generation that ran when the coordinator was lost goes on without it: take it over as it runs.
            if (_state.GenerationRunning) { BecomeAdopting(_state.Generation); return; }
            // Workers still training an older generation are told to stop and register again.
            if (_state.Generation > 0)
            {
                TellWorkerNodes(new AbortGeneration(_state.Generation, "the coordinator restarted"));
                _timeline.Detected(_state.Generation, "the coordinator restarted");
            }
        }
        BecomeWaitingForWorkers();
    }

    /// <summary>
    /// A restarted coordinator asks the worker nodes who is in <paramref name="generation"/> (the workers trained on
    /// without it; their reports waited in the singleton proxy). When every rank answers, it takes the generation over
    /// as it runs: their workers, the ranks that finished, the shards it has no commit for. A worker that is no longer
    /// in it, or silence past recovery.adopt-timeout, aborts the generation instead, as before.
    /// Everything else waits in the stash until then.
    /// </summary>
    void BecomeAdopting(long generation)
    {
        var members = new Dictionary<int, GenerationMember>();
        var recoveredAt = DateTime.UtcNow;
        var timeout = TimeSpan.FromSeconds(_spec.Recovery.AdoptSeconds);
        int asks = 0, maxAsks = (int)Math.Ceiling(timeout / AdoptionAskInterval);
        Timers.StartPeriodicTimer("adopt", new AskForMembers(), TimeSpan.Zero, AdoptionAskInterval);
        _log.LogInformation("Coordinator restarted during generation {Generation}: asking its {Workers} ranks to carry on under it", generation, _expectedWorkers);
        Become(() =>
        {
            Common();
            Command<AskForMembers>(_ =>
            {
                if (++asks <= maxAsks) { TellWorkerNodes(new AdoptGeneration(generation)); return; }
                var missing = Enumerable.Range(0, _expectedWorkers).Where(r => !members.ContainsKey(r));
                GiveUpAdopting(generation, $"ranks {string.Join(", ", missing)} did not answer within {timeout.TotalSeconds:0.#} s (recovery.adopt-timeout)");
            });
            Command<GenerationMember>(m => m.Generation == generation && m.Rank >= 0 && m.Rank < _expectedWorkers, m =>
            {
                members[m.Rank] = m;
                if (members.Count == _expectedWorkers) Adopt(generation, members, recoveredAt);
            });
            Command<NotInGeneration>(m => m.Generation == generation,
                m => GiveUpAdopting(generation, $"worker pid {m.ProcessId} is no longer in generation {generation}"));
            Command<RegisterWorker>(_ => { });   // repeated every second: counted again once waiting for workers
            Command<GenerationMember>(_ => { });
            Command<NotInGeneration>(_ => { });
            CommandAny(_ => Stash.Stash());
        });
    }

    void Adopt(long generation, Dictionary<int, GenerationMember> members, DateTime recoveredAt)
    {
        Timers.Cancel("adopt");
        Record(new GenerationAdopted(generation, DateTime.UtcNow), adopted =>
        {
            _workers.Clear();   // empty after a restart: nothing was watched yet
            _workers.AddRange(members.OrderBy(m => m.Key).Select(m => m.Value.Worker));
            foreach (var w in _workers) Context.Watch(w.Worker);
            _finished.Clear();
            _pendingShards.Clear();
            _firstShardAt.Clear();
            foreach (var m in members.Values.Where(m => m.FinishedStep is not null)) _finished.Add(m.Rank);
            _started.Clear();
            foreach (var m in members.Values.Where(m => m.Started is not null)) _started.Add(m.Rank);
            // Adopted while ranks were still starting: their deadline runs again from here.
            if (_started.Count < _workers.Count)
                Timers.StartSingleTimer(GenerationStartTimer, new GenerationStartExpired(generation), TimeSpan.FromSeconds(_spec.Recovery.GenerationStartSeconds));
            string record = _timeline.Adopted(generation, recoveredAt, adopted.At), adoptions = RunFiles.In(_spec.RunDir, RunFiles.Adoptions);
            QueueFileWork($"appending to {adoptions}", () => File.AppendAllText(adoptions, record));
            _log.LogInformation("Adopted generation {Generation} as it runs: every rank answered {Ms:F0} ms after the journal was replayed; nothing is redone",
                generation, (adopted.At - recoveredAt).TotalMilliseconds);
            Become(() => Running(generation));
            if (members[0].Started is { } started) Publish(new JobStarted(generation, _workers.Count, started.FirstStep, started.LastStep));
            // Shards the old coordinator held uncommitted come again; what came during the outage waits in the stash.
            foreach (var shard in members.Values.SelectMany(m => m.UncommittedShards)) OnShardWritten(generation, shard);
            Stash.UnstashAll();
            TryComplete();
        });
    }

    void GiveUpAdopting(long generation, string why)
    {
        Timers.Cancel("adopt");
        string reason = $"the coordinator restarted and cannot adopt generation {generation}: {why}";
        _log.LogWarning("{Reason}; aborting it", reason);
        TellWorkerNodes(new AbortGeneration(generation, reason));
        _timeline.Detected(generation, reason);
        Stash.UnstashAll();
        BecomeWaitingForWorkers();
    }

    void BecomeWaitingForWorkers()
    {
        Timers.Cancel(GenerationStartTimer);
        if (_workers.Count == _expectedWorkers) { BecomeStarting(); return; }
        var waitingSince = DateTime.UtcNow;
        Timers.StartSingleTimer(WorkerWaitTimer, new WorkerWaitExpired(), TimeSpan.FromSeconds(_spec.Recovery.WorkerWaitSeconds));
        Become(() =>
        {
            Common();
            Command<WorkerWaitExpired>(_ => End(new JobFailed(
                $"waited {(DateTime.UtcNow - waitingSince).TotalSeconds:0.#} s (recovery.worker-wait-timeout = {_spec.Recovery.WorkerWaitSeconds} s) for {_expectedWorkers} workers " +
                $"to register: {_workers.Count} did ({(_workers.Count == 0 ? "none" : string.Join(", ", _workers.Select(w => $"pid {w.ProcessId} on {w.Host}")))})")));
            Command<RegisterWorker>(m =>
            {
                if (_workers.Any(w => w.Worker.Equals(m.Worker))) return;
                _workers.Add(m);
                Context.Watch(m.Worker);
                _log.LogInformation("Worker pid {Pid} registered ({Count}/{Expected}), data plane {Endpoint}", m.ProcessId, _workers.Count, _expectedWorkers, m.DataPlaneEndpoint);
                if (_workers.Count == _expectedWorkers) BecomeStarting();
            });
            Command<Terminated>(t => _workers.RemoveAll(w => w.Worker.Equals(t.ActorRef)));
            Command<ProcessExited>(m => ForgetDeadWorker(m.ProcessId));
            EndOnADeterministicErrorOfTheAbortedGeneration();
            CommandAny(_ => { });   // reports of an aborted generation
        });
    }

    /// <summary>
    /// The launcher saw a worker's process die: its node is down for sure, and downing it now lets a replacement
    /// join without waiting for the failure detector. Returns the rank it had, or -1.
    /// </summary>
    int DropDeadWorker(int processId)
    {
        int rank = _workers.FindIndex(w => w.ProcessId == processId);
        if (rank < 0) return -1;
        Akka.Cluster.Cluster.Get(Context.System).Down(_workers[rank].Worker.Path.Address);
        return rank;
    }

    /// <summary>Between generations: a registered worker died; wait for its replacement.</summary>
    void ForgetDeadWorker(int processId)
    {
        int rank = DropDeadWorker(processId);
        if (rank >= 0) _workers.RemoveAt(rank);
    }

    /// <summary>
    /// Verifying shards reads files: done off the actor, and the result comes back as a message, success or failure.
    /// The generation-start deadline runs from here until every rank has built its model.
    /// </summary>
    void BecomeStarting()
    {
        Timers.Cancel(WorkerWaitTimer);
        var commits = _state.CommitsNewestFirst().ToList();
        string checkpoints = CheckpointsDirectory;
        long next = _state.Generation + 1;
        Timers.StartSingleTimer(GenerationStartTimer, new GenerationStartExpired(next), TimeSpan.FromSeconds(_spec.Recovery.GenerationStartSeconds));
        // Queued behind the file work: a manifest or retention still being written must not race the choice (or its manifest).
        var choice = _fileWork.ContinueWith(_ => ChooseResumePoint(commits, checkpoints), TaskScheduler.Default);
        _fileWork = choice;
        choice.PipeTo(Self, failure: e => new ResumePointChosen(null, 0,
            $"choosing the checkpoint to resume from (in {checkpoints}) failed: {e.GetBaseException().GetType().Name}: {e.GetBaseException().Message}"));
        Become(() =>
        {
            Common();
            Command<GenerationStartExpired>(m => m.Generation == next, _ => End(new JobFailed(
                $"choosing the checkpoint to resume from (in {checkpoints}) did not finish within {_spec.Recovery.GenerationStartSeconds} s (recovery.generation-start-timeout)")));
            Command<ResumePointChosen>(chosen =>
            {
                if (_workers.Count < _expectedWorkers) { BecomeWaitingForWorkers(); return; }
                if (chosen.Error is not null) { End(new JobFailed(chosen.Error)); return; }
                long generation = _state.Generation + 1;
                Record(new GenerationStarted(generation, _workers.Count, chosen.Step, DateTime.UtcNow), started =>
                {
                    StartGeneration(generation, chosen.Directory);
                    PublishPlacement(started);
                });
            });
            // A worker lost before the generation started: the choice is dropped, and the coordinator waits for a replacement.
            Command<Terminated>(t => _workers.RemoveAll(w => w.Worker.Equals(t.ActorRef)));
            Command<ProcessExited>(m => ForgetDeadWorker(m.ProcessId));
            EndOnADeterministicErrorOfTheAbortedGeneration();
            CommandAny(_ => { });
        });
    }

    /// <summary>
    /// A peer that lost its link to the failing rank may report first and abort the generation; the failing rank's own
    /// report of a deterministic error still ends the job. It always arrives before the next generation starts: that
    /// rank registers again only after reporting.
    /// </summary>
    void EndOnADeterministicErrorOfTheAbortedGeneration() =>
        Command<WorkerFailed>(m => m.Fatal && m.Generation == _state.Generation, m => End(new JobFailed(NotRetried($"rank {m.Rank} failed: {m.Reason}"))));

    static string NotRetried(string failure) => $"{failure} (an error that a restart cannot fix: not retried)";

    /// <summary>
    /// The newest checkpoint whose shards verify: among the journal's commits; when the journal has none, the given
    /// checkpoint (--resume of another run) or those committed in the run directory without a journal (a
    /// single-process run continued by a cluster). A corrupt one is named, with both hashes, and skipped.
    /// </summary>
    ResumePointChosen ChooseResumePoint(IReadOnlyList<CheckpointCommitted> commits, string checkpoints)
    {
        try
        {
            var candidates = commits.Count > 0
                ? commits.Select(c => (c.Step, CheckpointFiles.DirectoryFor(checkpoints, c.Step), (IReadOnlyList<ShardRecord>)c.Shards))
                : (_resumeFrom is null ? CheckpointFiles.List(checkpoints).Select(c => c.Path) : [_resumeFrom])
                    .Select(dir => CheckpointFiles.ReadManifest(dir))
                    .Select(m => (m.Step, _resumeFrom ?? CheckpointFiles.DirectoryFor(checkpoints, m.Step), (IReadOnlyList<ShardRecord>)m.Shards));
            if (CheckpointFiles.FirstValid(candidates, _log) is var (step, directory))
            {
                // The manifest follows the journal: written again if the coordinator died between the two.
                if (commits.FirstOrDefault(c => c.Step == step) is { } commit && !File.Exists(Path.Combine(directory, CheckpointFiles.ManifestName)))
                    WriteManifest(directory, commit);
                return new ResumePointChosen(directory, step, null);
            }
            if (_resumeFrom is not null && commits.Count == 0) return new ResumePointChosen(null, 0, $"checkpoint '{_resumeFrom}' does not verify");
            if (commits.Count > 0) _log.LogWarning("No committed checkpoint verifies: starting from step 0");
            return new ResumePointChosen(null, 0, null);
        }
        catch (Exception e) when (e is CheckpointException or IOException)
        {
            return new ResumePointChosen(null, 0, e.Message);
        }
    }

    void StartGeneration(long generation, string? resumeFrom)
    {
        _finished.Clear();
        _started.Clear();
        _pendingShards.Clear();
        _firstShardAt.Clear();
        // Rank hints first (a stable sort keeps registration order among equals), then whole TP groups on one host.
        var hinted = _workers.OrderBy(w => w.RankHint ?? int.MaxValue).ToList();
        var placed = ParallelLayout.PlaceTensorParallelGroups(hinted.Select(w => w.Host).ToList(), _spec.Parallel.Tp).Select(i => hinted[i]).ToList();
        _workers.Clear();
        _workers.AddRange(placed);
        var endpoints = _workers.Select(w => w.DataPlaneEndpoint).ToList();
        var pending = _faults.Where(f => !_state.HasFired(f)).ToArray();
        for (int rank = 0; rank < _workers.Count; rank++)
            _workers[rank].Worker.Tell(new AssignRank(generation, rank, endpoints, _jobHocon, resumeFrom,
                pending.Where(f => f.Rank == rank || (rank == 0 && f.Kind == FaultKind.KillCoordinator)).ToArray()));
        _timeline.GenerationStarted(generation);
        _log.LogInformation("Generation {Generation} started with {Workers} workers from {Checkpoint}", generation, _workers.Count, resumeFrom ?? "scratch");
        Become(() => Running(generation));
    }

    void Running(long generation)
    {
        Common();
        Command<RegisterWorker>(_ => { });   // late retries of a registration already counted
        Command<RankStarted>(m => m.Generation == generation, m =>
        {
            if (m.Rank == 0)
            {
                _timeline.RankStarted(m.LoadMs);
                Publish(new JobStarted(generation, _workers.Count, m.FirstStep, m.LastStep));
            }
            if (_started.Add(m.Rank) && _started.Count == _workers.Count) Timers.Cancel(GenerationStartTimer);
        });
        Command<GenerationStartExpired>(m => m.Generation == generation, _ =>
        {
            var missing = Enumerable.Range(0, _workers.Count).Where(r => !_started.Contains(r)).Select(r => $"rank {r} ({Describe(r)})");
            Abort(generation, $"generation {generation} did not start within {_spec.Recovery.GenerationStartSeconds} s (recovery.generation-start-timeout): " +
                $"{string.Join(", ", missing)} did not report that it built its model (checkpoint read, state broadcast)");
        });
        // Progress comes from the rank that has the loss: the last pipeline stage's.
        int reporting = ParallelLayout.For(_spec, _workers.Count).ReportingRank;
        Command<StepDone>(m => m.Generation == generation && m.Rank == reporting, m =>
        {
            if (_timeline.FirstStep(generation, m.Metrics.Step) is { } record) QueueFileWork($"appending to {_timeline.Path}", () => File.AppendAllText(_timeline.Path, record));
            Publish(new JobStepReport(m.Metrics, _workers.Count));
            PublishSample(m);
        });
        Command<StepDone>(m => m.Generation == generation, PublishSample);   // every other rank's telemetry
        Command<EvalDone>(m => m.Generation == generation && m.Rank == reporting, m => Publish(new JobEvalReport(m.Result)));
        Command<ShardWritten>(m => m.Generation == generation, m => OnShardWritten(generation, m));
        Command<WorkerFinished>(m => m.Generation == generation, m =>
        {
            _finished.Add(m.Rank);
            TryComplete();
        });
        Command<WorkerFailed>(m => m.Generation == generation, m =>
        {
            string who = m.FailedPeer is int lost && lost >= 0 && lost < _workers.Count
                ? $"rank {lost} ({Describe(lost)}) was lost: {m.Reason} (reported by rank {m.Rank})"
                : $"rank {m.Rank} ({Describe(m.Rank)}) failed: {m.Reason}";
            if (m.Fatal) End(new JobFailed(NotRetried(who)));
            else Abort(generation, who);
        });
        Command<Terminated>(t =>
        {
            int rank = _workers.FindIndex(w => w.Worker.Equals(t.ActorRef));
            if (rank >= 0) Abort(generation, $"rank {rank} ({Describe(rank)}) left the cluster");
        });
        Command<ProcessExited>(m =>
        {
            int rank = DropDeadWorker(m.ProcessId);
            if (rank >= 0) Abort(generation, $"rank {rank} ({Describe(rank)}) {m.Description}");
        });
        CommandAny(_ => { });   // reports of an older generation
    }

    void OnShardWritten(long generation, ShardWritten m)
    {
        // Already committed (an adopted generation's rank may not have heard): tell it again; nothing to collect.
        if (_state.Commits.Any(c => c.Step == m.Step))
        {
            if (m.Rank < _workers.Count) _workers[m.Rank].Worker.Tell(new CheckpointCommittedNotice(generation, m.Step, m.Directory));
            return;
        }
        if (!_pendingShards.TryGetValue(m.Step, out var shards)) _pendingShards[m.Step] = shards = [];
        _firstShardAt.TryAdd(m.Step, DateTime.UtcNow);
        shards[m.Rank] = m.Shard;
        if (shards.Count < _workers.Count) return;
        _pendingShards.Remove(m.Step);
        _firstShardAt.Remove(m.Step, out var firstShardAt);
        var commit = new CheckpointCommitted(m.Step, generation, shards.Values.OrderBy(s => s.Rank).ToArray(), DateTime.UtcNow);
        Record(commit, _ =>
        {
            string directory = m.Directory;
            int keep = _spec.Checkpoint.Keep;
            string checkpoints = CheckpointsDirectory;
            long bytes = commit.Shards.Sum(s => s.Bytes);
            double latency = (DateTime.UtcNow - firstShardAt).TotalSeconds;
            // Commits beyond checkpoint.keep leave the journal before their files go: a crash in between leaves directories
            // that no commit names (retention removes them later), never a commit without its files.
            var retired = _state.CommitsNewestFirst().Skip(keep).Select(c => c.Step).ToArray();
            RecordRetired(retired, () =>
            {
                var committedSteps = _state.Commits.Select(c => c.Step).ToList();
                // Durable in the journal: now the manifest, then retention (older commits may go only after this one is durable).
                QueueFileWork($"writing the manifest of {directory} and applying retention", () =>
                {
                    WriteManifest(directory, commit);
                    CommitLog.Append(_spec.RunDir, new CommitLog.Entry(commit.Step, generation, bytes, latency, commit.At));
                    CheckpointFiles.Retain(checkpoints, keep, committedSteps);
                });
            });
            _log.LogInformation("Checkpoint at step {Step} committed ({Shards} shards, {Bytes:N0} bytes)", m.Step, commit.Shards.Length, bytes);
            Publish(new JobCheckpointCommitted(m.Step, directory, bytes, latency));
            foreach (var w in _workers) w.Worker.Tell(new CheckpointCommittedNotice(generation, m.Step, directory));
            TryComplete();
        });
    }

    void RecordRetired(long[] steps, Action then)
    {
        if (steps.Length == 0) then();
        else Record(new CheckpointsRetired(steps, DateTime.UtcNow), _ => then());
    }

    void WriteManifest(string directory, CheckpointCommitted commit) =>
        CheckpointFiles.WriteManifest(directory, CheckpointManifest.For(commit.Step, commit.Generation, commit.Shards, _spec));

    /// <summary>
    /// File work of the actor (manifests, retention, timing records): off the actor, one piece after the other, in
    /// order. A failure of any kind comes back as a message (a faulted task nobody awaits would be silent).
    /// </summary>
    void QueueFileWork(string what, Action work)
    {
        var self = Self;
        _fileWork = _fileWork.ContinueWith(_ =>
        {
            try { work(); }
            catch (Exception e) { self.Tell(new FileWorkFailed(what, $"{e.GetType().Name}: {e.Message}")); }
        }, TaskScheduler.Default);
    }

    /// <summary>The job is complete when every rank finished and the checkpoint of its last step (train.max-iters) is committed.</summary>
    void TryComplete()
    {
        long last = _spec.Train.MaxIters;
        if (_finished.Count < _workers.Count || _state.Commits.All(c => c.Step != last)) return;
        End(new JobCompleted(last, CheckpointFiles.DirectoryFor(CheckpointsDirectory, last)));
    }

    void Abort(long generation, string reason)
    {
        Record(new GenerationAborted(generation, reason, DateTime.UtcNow), _ =>
        {
            _timeline.Detected(generation, reason);
            foreach (var w in _workers) w.Worker.Tell(new AbortGeneration(generation, reason));
            foreach (var w in _workers) Context.Unwatch(w.Worker);
            _workers.Clear();   // survivors register again once their training thread has stopped
            if (_state.Restarts > _spec.Recovery.MaxRestarts)
            {
                End(new JobFailed($"{reason}; giving up after {_spec.Recovery.MaxRestarts} restarts (recovery.max-restarts)"));
                return;
            }
            _log.LogWarning("Generation {Generation} aborted: {Reason}. Restart {Restart} of {Max}: waiting for {Workers} workers", generation, reason, _state.Restarts,
                _spec.Recovery.MaxRestarts, _expectedWorkers);
            Publish(new JobRecovering(generation, reason, _state.Restarts, _spec.Recovery.MaxRestarts));
            BecomeWaitingForWorkers();
        });
    }

    void End(JobEvent outcome)
    {
        var ended = outcome switch
        {
            JobCompleted c => new JobEnded(true, c.Step, "job completed", DateTime.UtcNow),
            JobFailed f => new JobEnded(false, -1, f.Reason, DateTime.UtcNow),
            _ => throw new ArgumentException("not an outcome", nameof(outcome)),
        };
        Record(ended, _ =>
        {
            Timers.CancelAll();
            Become(() => Ended(outcome));
            // Whoever hears of the end may stop this process at once: the queued file work (the newest commit's manifest) goes first, within a bound.
            var (self, announce) = (Self, new EndAnnounced(ended.Completed, ended.Reason));
            Task.WhenAny(_fileWork, Task.Delay(FileWorkBeforeTheEnd)).ContinueWith(_ => self.Tell(announce), TaskScheduler.Default);
        });
    }

    sealed record EndAnnounced(bool Completed, string Reason);
    static readonly TimeSpan FileWorkBeforeTheEnd = TimeSpan.FromSeconds(30);

    void Ended(JobEvent outcome)
    {
        Command<EndAnnounced>(m =>
        {
            Publish(outcome);
            foreach (var w in _workers) w.Worker.Tell(new Shutdown(m.Completed, m.Reason));
        });
        Command<SubscribeToJob>(m =>
        {
            if (_subscribers.Add(m.Subscriber)) m.Subscriber.Tell(new JobHistory(_spec.Name, _expectedWorkers, _state));
            m.Subscriber.Tell(outcome);
        });
        Command<JobStatusRequest>(_ => Sender.Tell(Status(ended: true)));
        Command<RegisterWorker>(m => m.Worker.Tell(new Shutdown(outcome is JobCompleted, "the job is over")));
        Command<FileWorkFailed>(f => _log.LogError("Failed {What}: {Error}", f.What, f.Error));
        CommandAny(_ => { });
    }

    void Common()
    {
        // In every state: a fault may fire while the generation is being aborted or adopted (its report waited in the
        // proxy while the coordinator was down); journaled once, so it never fires again.
        Command<FaultFired>(m => Record(new FaultInjected(m.Fault, m.At), _ =>
        {
            _timeline.FaultFired(m.Fault, m.At);
            Publish(new JobFaultInjected(m.Fault, m.At));
            // Rank 0 announces kill-coordinator at the exact step; the coordinator journals it (so it fires once) and dies.
            if (_faults.FirstOrDefault(f => f.Text == m.Fault && f.Kind == FaultKind.KillCoordinator) is { } fault) KillThisProcess(fault);
        }));
        Command<SubscribeToJob>(m =>
        {
            if (_subscribers.Add(m.Subscriber)) m.Subscriber.Tell(new JobHistory(_spec.Name, _expectedWorkers, _state));
        });
        Command<JobStatusRequest>(_ => Sender.Tell(Status(ended: false)));
        Command<SaveSnapshotSuccess>(_ => { });
        Command<SaveSnapshotFailure>(f => _log.LogWarning("Snapshot failed: {Error}", f.Cause.Message));
        Command<FileWorkFailed>(f => _log.LogError("Failed {What}: {Error}", f.What, f.Error));
    }

    /// <summary>Persists an event, applies it to the state, snapshots every persistence.snapshot-every events.</summary>
    void Record<T>(T e, Action<T> then) where T : class => Persist(e, persisted =>
    {
        _state = _state.Apply(persisted);
        if (LastSequenceNr % _spec.Persistence.SnapshotEvery == 0) SaveSnapshot(_state);
        then(persisted);
    });

    void KillThisProcess(Fault fault)
    {
        _log.LogWarning("Fault injection: {Fault}: SIGKILL to the coordinator (pid {Pid})", fault.Text, Environment.ProcessId);
        Process.GetCurrentProcess().Kill();
    }

    void TellWorkerNodes(object message)
    {
        foreach (var member in Akka.Cluster.Cluster.Get(Context.System).State.Members.Where(m => m.HasRole(ClusterBootstrap.WorkerRole)))
            Context.ActorSelection(new RootActorPath(member.Address) / "user" / "worker").Tell(message);
    }

    JobStatus Status(bool ended) => new(_state.Generation, _state.CommitsNewestFirst().FirstOrDefault()?.Step ?? 0, ended);

    string? LatestCommitDirectory() =>
        _state.CommitsNewestFirst().FirstOrDefault() is { } c ? CheckpointFiles.DirectoryFor(CheckpointsDirectory, c.Step) : null;

    string Describe(int rank) => $"worker pid {_workers[rank].ProcessId} on {_workers[rank].Host}";

    /// <summary>Where each rank of a new generation is: for the metrics and the status page.</summary>
    void PublishPlacement(GenerationStarted started)
    {
        var layout = ParallelLayout.For(_spec, _workers.Count);
        var placements = _workers.Select((w, rank) =>
        {
            var at = layout.Coordinates(rank);
            return new WorkerPlacement(rank, w.Host, w.ProcessId, at.Tp, at.Dp, at.Pp);
        }).ToArray();
        Publish(new JobGenerationStarted(started.Generation, layout.ToString(), placements, started.ResumeStep, started.At));
    }

    void PublishSample(StepDone m)
    {
        if (m.Sample is { } sample) Publish(new JobWorkerReport(m.Generation, m.Rank, m.Metrics, sample));
    }

    void Publish(JobEvent e)
    {
        foreach (var s in _subscribers) s.Tell(e);
    }
}
