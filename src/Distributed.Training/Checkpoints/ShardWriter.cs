using static TorchSharp.torch;

namespace Distributed.Training.Checkpoints;

/// <summary>Where a written shard goes next: the commit (a coordinator, or <see cref="LocalCommit"/> in a single process).</summary>
public interface ICheckpointCommit
{
    /// <summary>Called on the writer's thread once this rank's shard of <paramref name="step"/> is durable.</summary>
    void ShardWritten(long step, string directory, ShardRecord shard);
}

/// <summary>
/// Writes this rank's shard in the background: the training thread only copies the tensors (memory speed) at the step
/// boundary, and the following steps run while the bytes go to disk. One write is in flight at a time.
/// </summary>
public sealed class ShardWriter(ICheckpointCommit commit) : IDisposable
{
    Task? _pending;

    /// <summary>Hooks for fault injection: after the temporary file is durable, and after the shard is reported.</summary>
    public Action<long>? BeforeRename { get; init; }
    public Action<long, string>? AfterReport { get; init; }

    public void Begin(long step, string directory, int rank, int count, IReadOnlyList<(string Name, Tensor Tensor)> shard,
        IReadOnlyDictionary<string, string> metadata)
    {
        Wait();
        List<(string Name, Tensor Tensor)> copies;
        using (no_grad()) copies = shard.Select(s => (s.Name, s.Tensor.detach().clone().DetachFromDisposeScope())).ToList();
        _pending = Task.Run(() =>
        {
            try
            {
                var record = CheckpointFiles.WriteShard(directory, rank, count, copies, metadata,
                    BeforeRename is null ? null : () => BeforeRename(step));
                commit.ShardWritten(step, directory, record);
                AfterReport?.Invoke(step, Path.Combine(directory, record.File));
            }
            finally
            {
                foreach (var (_, t) in copies) t.Dispose();
            }
        });
    }

    /// <summary>Waits for the write in flight, if any; its failure surfaces here, on the training thread.</summary>
    public void Wait()
    {
        var pending = _pending;
        _pending = null;
        pending?.GetAwaiter().GetResult();
    }

    public void Dispose()
    {
        try { Wait(); } catch (IOException) { }
    }
}

/// <summary>
/// The commit of a single-process run: with one shard, the shard being durable is the commit. Writes the manifest,
/// applies retention, and queues the step for the training thread to announce.
/// </summary>
public sealed class LocalCommit(string checkpoints, int keep, string job) : ICheckpointCommit
{
    readonly System.Collections.Concurrent.ConcurrentQueue<(long Step, string Directory)> _committed = new();

    public void ShardWritten(long step, string directory, ShardRecord shard)
    {
        CheckpointFiles.WriteManifest(directory, new CheckpointManifest(Trainer.CheckpointFormat, step, 0, [shard], job));
        CheckpointFiles.Retain(checkpoints, keep);
        _committed.Enqueue((step, directory));
    }

    public bool TryTake(out (long Step, string Directory) committed) => _committed.TryDequeue(out committed);
}
