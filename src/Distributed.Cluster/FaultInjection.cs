using System.Diagnostics;
using Akka.Actor;
using Distributed.Comm;
using Distributed.Core;
using Distributed.Training.Checkpoints;
using Microsoft.Extensions.Logging;

namespace Distributed.Cluster;

/// <summary>
/// The faults one rank injects into its own generation: real SIGKILLs of this process, a real cut of a peer
/// connection, real added latency, real bytes flipped on disk. Each is reported to the coordinator (which journals
/// it, so it fires once per job) just before it happens.
/// </summary>
sealed class WorkerFaults(IReadOnlyList<Fault> faults, int rank, int worldSize, IActorRef coordinator, ILogger logger)
{
    static readonly TimeSpan ReportGrace = TimeSpan.FromMilliseconds(200);
    PeerLinks? _links;

    public bool Any => faults.Count > 0;

    /// <summary>On the training thread, as the generation starts (<paramref name="generation"/> is cancelled when it is aborted).</summary>
    public void Attach(PeerLinks links, CancellationToken generation)
    {
        _links = links;
        foreach (var f in faults.Where(f => f.Kind == FaultKind.DelayLink))
        {
            Report(f, DateTime.UtcNow);
            links.SetDelay(f.Peer, TimeSpan.FromMilliseconds(f.DelayMs));
        }
        // Reported (so journaled, so it fires once) when armed: once the generation is aborted the coordinator no longer listens to it.
        // The registration is never disposed: disposing waits for a running callback, which is what this fault makes slow.
        foreach (var f in faults.Where(f => f.Kind == FaultKind.SlowAbort))
        {
            Report(f, DateTime.UtcNow);
            generation.Register(() =>
            {
                logger.LogWarning("Fault injection: {Fault}: a callback of the aborted generation's token blocks for {Ms} ms", f.Text, f.DelayMs);
                Thread.Sleep(f.DelayMs);
            });
        }
    }

    /// <summary>
    /// On the training thread, before the generation's initial state broadcast: a stall-start rank takes no part in it
    /// and waits until the generation is aborted, so its peers wait inside the broadcast.
    /// </summary>
    public void BeforeStateBroadcast(CancellationToken generation)
    {
        var f = faults.FirstOrDefault(f => f.Kind == FaultKind.StallStart);
        if (f is null) return;
        Report(f, DateTime.UtcNow);
        logger.LogWarning("Fault injection: {Fault}: rank {Rank} stalls before the state broadcast until the generation is aborted", f.Text, rank);
        generation.WaitHandle.WaitOne();
        generation.ThrowIfCancellationRequested();
    }

    /// <summary>On the training thread, after each optimizer step.</summary>
    public void AfterStep(long step)
    {
        foreach (var f in faults)
        {
            if (f.Kind == FaultKind.KillWorker && f.Step == step) KillThisProcess(f);
            if (f.Kind == FaultKind.KillCoordinator && f.Step == step) Report(f, DateTime.UtcNow);   // the coordinator kills itself on this report
            if (f.Kind == FaultKind.DropLink && f.Step == step && _links is not null)
            {
                Report(f, DateTime.UtcNow);
                _links.SeverAsync(f.Peer).GetAwaiter().GetResult();
            }
            // One step after its shard was handed to the writer, this rank waits for the commit, so the corrupted
            // checkpoint is the newest committed one when the process dies.
            if (f.Kind == FaultKind.CorruptShard && f.Step + 1 == step) CorruptCommittedShardAndDie(f);
        }
    }

    /// <summary>On the writer thread, when this rank's shard is durable in its temporary file but not yet renamed or reported.</summary>
    public void BeforeRename(long step)
    {
        var f = faults.FirstOrDefault(f => f.Kind == FaultKind.KillDuringCheckpoint && f.Step == step);
        if (f is not null) KillThisProcess(f);
    }

    /// <summary>On the actor, when the coordinator reports a commit.</summary>
    public void Committed(long step, string directory)
    {
        lock (_commits) _commits[step] = directory;
        _committed.Set();
    }

    readonly Dictionary<long, string> _commits = [];
    readonly AutoResetEvent _committed = new(false);

    void CorruptCommittedShardAndDie(Fault f)
    {
        string? directory = null;
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        while (DateTime.UtcNow < deadline)
        {
            lock (_commits) if (_commits.TryGetValue(f.Step, out directory)) break;
            _committed.WaitOne(TimeSpan.FromMilliseconds(100));
        }
        if (directory is null) throw new TimeoutException($"fault {f.Text}: the checkpoint at step {f.Step} was not committed within 60 s");
        string path = Path.Combine(directory, CheckpointFiles.ShardName(rank, worldSize));
        using (var file = new FileStream(path, FileMode.Open, FileAccess.ReadWrite))
        {
            file.Position = file.Length / 2;
            int b = file.ReadByte();
            file.Position = file.Length / 2;
            file.WriteByte((byte)(b ^ 0xFF));
            file.Flush(flushToDisk: true);
        }
        logger.LogWarning("Fault injection: {Fault}: flipped a byte of {Path}", f.Text, path);
        KillThisProcess(f);
    }

    void KillThisProcess(Fault f)
    {
        // The report leaves before the process dies; its time is the moment of the kill.
        Report(f, DateTime.UtcNow + ReportGrace);
        logger.LogWarning("Fault injection: {Fault}: SIGKILL to this worker (pid {Pid})", f.Text, Environment.ProcessId);
        Thread.Sleep(ReportGrace);
        Process.GetCurrentProcess().Kill();
    }

    void Report(Fault f, DateTime at) => coordinator.Tell(new FaultFired(f.Text, at));
}
