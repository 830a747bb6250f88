using System.Diagnostics;
using Distributed.Core;
using Microsoft.Extensions.Logging;

namespace Distributed.Training.Checkpoints;

/// <summary>Where a written shard goes next: the commit (a coordinator, or <see cref="LocalCommit"/> in a single process).</summary>
public interface ICheckpointCommit
{
    /// <summary>Called on the writer's thread once this rank's shard of <paramref name="step"/> is durable.</summary>
    void ShardWritten(long step, string directory, ShardRecord shard);
}

/// <summary>How long a shard took: the copy on the training thread (the step waits for it) and the write behind it (hash and fsync included).</summary>
public sealed record ShardTiming(long Step, int Rank, long Bytes, double CopyMs, double WriteMs);

/// <summary>
/// Writes this rank's shard in the background: the training thread only copies the tensors (memory speed) at the step
/// boundary, and the following steps run while the bytes go to disk. One write is in flight at a time.
/// </summary>
public sealed class ShardWriter(ICheckpointCommit commit) : IDisposable
{
    Task? _pending;
    List<StateEntry>? _stored;

    /// <summary>Fault injection: runs when the shard of a step is durable in its temporary file, before rename and report.</summary>
    public Action<long>? BeforeRename { get; init; }

    /// <summary>Where each written shard is logged with its size and timings; none by default.</summary>
    public ILogger? Logger { get; init; }

    /// <summary>Raised on the writer's thread once a shard is durable, before the commit hears of it.</summary>
    public event Action<ShardTiming>? Written;

    /// <param name="copy">
    /// true: the shard is copied first, so training may change the tensors while the write goes on. false (nothing
    /// changes them until <see cref="Wait"/>, e.g. after the last step): written from the tensors themselves, which
    /// saves a copy of the shard in memory; tensors that are not contiguous CPU ones (or whose padding is cut off
    /// and the rest is not contiguous) are copied all the same.
    /// </param>
    public void Begin(long step, string directory, int rank, int count, IReadOnlyList<StateEntry> shard,
        IReadOnlyDictionary<string, string> metadata, bool copy = true)
    {
        Wait();
        // Contiguous CPU tensors of the held indices, prepared here on the training thread: the writer thread only reads their bytes.
        var copying = Stopwatch.StartNew();
        var stored = shard.Select(e => e.ToStored(copy)).ToList();
        var copyTime = copying.Elapsed;
        _stored = stored;
        _pending = Task.Run(() =>
        {
            var writing = Stopwatch.StartNew();
            try
            {
                var record = CheckpointFiles.WriteShard(directory, rank, count, stored, metadata, BeforeRename is null ? null : () => BeforeRename(step));
                Logger?.LogInformation(
                    "Rank {Rank} wrote its shard of step {Step}: {Bytes:N0} bytes in {WriteMs:F0} ms ({MBps:F0} MB/s, hash and fsync included) after copying the tensors in {CopyMs:F0} ms",
                    rank, step, record.Bytes, writing.Elapsed.TotalMilliseconds, record.Bytes / 1e6 / writing.Elapsed.TotalSeconds, copyTime.TotalMilliseconds);
                Written?.Invoke(new ShardTiming(step, rank, record.Bytes, copyTime.TotalMilliseconds, writing.Elapsed.TotalMilliseconds));
                commit.ShardWritten(step, directory, record);
            }
            catch (DiskFullException e)
            {
                // The shard (or a single process's manifest) is not durable, so the step is never committed: the previous commit is the newest.
                throw new DiskFullException($"the checkpoint at step {step} failed on rank {rank}: {e.Message}; the previous commit stays", (IOException)e.InnerException!);
            }
        });
    }

    /// <summary>Surfaces the failure of a write that has ended, if any, without waiting for one in flight.</summary>
    public void ThrowIfFailed()
    {
        if (_pending is { IsFaulted: true }) Wait();
    }

    /// <summary>Waits for the write in flight, if any; its failure surfaces here, on the training thread, which also frees the copies
    /// and views (and from then on the tensors written without a copy may change again).</summary>
    public void Wait()
    {
        var (pending, stored) = (_pending, _stored);
        (_pending, _stored) = (null, null);
        try
        {
            pending?.GetAwaiter().GetResult();
        }
        finally
        {
            foreach (var entry in stored ?? []) entry.Tensor.Dispose();
        }
    }

    public void Dispose()
    {
        try { Wait(); } catch (Exception e) when (e is IOException or DiskFullException) { }
    }
}

/// <summary>
/// The commit of a single-process run: with one shard, the shard being durable is the commit. Writes the manifest,
/// applies retention, and queues the step for the training thread to announce.
/// </summary>
public sealed class LocalCommit(string checkpoints, int keep, Distributed.Core.JobSpec job) : ICheckpointCommit
{
    readonly System.Collections.Concurrent.ConcurrentQueue<(long Step, string Directory)> _committed = new();

    public void ShardWritten(long step, string directory, ShardRecord shard)
    {
        CheckpointFiles.WriteManifest(directory, CheckpointManifest.For(step, 0, [shard], job));
        CommitLog.Append(job.RunDir, new CommitLog.Entry(step, 0, shard.Bytes, 0, DateTime.UtcNow));
        CheckpointFiles.Retain(checkpoints, keep);
        _committed.Enqueue((step, directory));
    }

    public bool TryTake(out (long Step, string Directory) committed) => _committed.TryDequeue(out committed);
}
