using System.Buffers;
using System.Collections.Concurrent;

namespace Distributed.Comm;

/// <summary>Where a chunk belongs: which generation, sender, process group, collective and position.</summary>
public readonly record struct ChunkHeader(long Generation, int SourceRank, int Group, long OpId, int Seq, long Offset);

/// <summary>
/// A received payload. Pooled buffers go back to the pool on Dispose. A borrowed payload (a frame still in a
/// shared-memory ring, handed to a receive that already waits) belongs to its transport until Dispose, which tells it.
/// </summary>
public sealed class ReceivedChunk(ReadOnlyMemory<byte> payload, byte[]? pooled = null) : IDisposable
{
    ManualResetEventSlim? _released;
    int _disposed;

    public ReadOnlyMemory<byte> Payload { get; } = payload;

    public static ReceivedChunk Borrowed(ReadOnlyMemory<byte> payload) => new(payload) { _released = new ManualResetEventSlim() };

    public bool IsBorrowed => _released is not null;

    /// <summary>A pooled copy of a borrowed payload (for a chunk that must wait for its receive); this one is released.</summary>
    public ReceivedChunk Detach()
    {
        var copy = ArrayPool<byte>.Shared.Rent(Math.Max(1, Payload.Length));
        Payload.Span.CopyTo(copy);
        var detached = new ReceivedChunk(copy.AsMemory(0, Payload.Length), copy);
        Dispose();
        return detached;
    }

    /// <summary>For the transport of a borrowed payload: whether its receiver has disposed it, waiting at most <paramref name="timeout"/>.</summary>
    public bool WaitUntilReleased(TimeSpan timeout, CancellationToken cancellationToken) => _released!.Wait(timeout, cancellationToken);

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0) return;
        if (pooled is not null) ArrayPool<byte>.Shared.Return(pooled);
        _released?.Set();
    }
}

/// <summary>
/// Incoming chunks of one worker, matched to the receives that wait for them by (source, group, op, seq).
/// Either side may come first. Chunks of another generation are rejected; a failed peer fails every pending and
/// later receive from it at once, so nobody waits out a deadline for a rank known to be dead. Waiters may continue
/// on the delivering thread: code after a receive never blocks (collectives only await).
/// A chunk no collective of this generation could ask for is rejected (<see cref="RejectedChunkException"/>) before
/// it takes a slot: a source outside the world, a group this rank is not in or its source is not a member of, an op
/// id, chunk number or offset out of range; and a source whose unclaimed chunks exceed <see cref="MaxUnclaimedChunks"/>
/// or <see cref="MaxUnclaimedBytes"/> is refused more, so hostile or broken traffic cannot exhaust memory.
/// </summary>
public sealed class Mailbox(DataPlaneCounters? counters = null)
{
    readonly record struct Key(int Source, int Group, long OpId, int Seq);

    /// <summary>A receive's rendezvous; <see cref="Unclaimed"/> while a delivered chunk waits for its receive.</summary>
    sealed class Slot
    {
        public readonly TaskCompletionSource<ReceivedChunk> Chunk = new();
        public int UnclaimedBytes = -1;   // >= 0 from delivery until a receive takes the chunk
    }

    /// <summary>Bounds on what one source may leave waiting for receives: far above any collective's or pipeline's lead.</summary>
    public const int MaxUnclaimedChunks = 16_384;
    public const long MaxUnclaimedBytes = 2L << 30;
    /// <summary>Group ids are small (one per axis and spanning group); a chunk may arrive before its group exists here.</summary>
    public const int MaxGroupId = 64;
    const int MaxSeq = 1 << 26;
    const long MaxOffset = 1L << 40, MaxPointToPointOps = 1L << 40;

    readonly ConcurrentDictionary<Key, Slot> _slots = new();
    readonly ConcurrentDictionary<int, Exception> _failedPeers = new();
    readonly ConcurrentDictionary<int, int[]> _groups = new();
    readonly ConcurrentDictionary<int, (int Chunks, long Bytes)> _unclaimed = new();
    volatile Exception? _aborted;
    long _generation;
    volatile int _rank = -1, _worldSize = int.MaxValue;

    public long Generation => Interlocked.Read(ref _generation);

    /// <summary>Starts a generation: forgets everything of the previous one.</summary>
    /// <param name="rank">this node's rank, and <paramref name="worldSize"/> the generation's: chunks from other sources are rejected</param>
    public void Reset(long generation, int rank = -1, int worldSize = int.MaxValue)
    {
        Interlocked.Exchange(ref _generation, generation);
        _rank = rank;
        _worldSize = worldSize;
        _aborted = null;
        _failedPeers.Clear();
        _groups.Clear();
        foreach (var (key, slot) in _slots)
            if (_slots.TryRemove(key, out _))
            {
                slot.Chunk.TrySetCanceled();
                if (slot.Chunk.Task.IsCompletedSuccessfully) slot.Chunk.Task.Result.Dispose();
            }
        _unclaimed.Clear();
    }

    /// <summary>
    /// A process group of this generation: chunks for it from non-members are rejected from now on, and those that came
    /// before it was known here are dropped.
    /// </summary>
    public void RegisterGroup(int group, IReadOnlyList<int> members)
    {
        if (group is < 0 or >= MaxGroupId) throw new ArgumentOutOfRangeException(nameof(group), $"group ids are below {MaxGroupId}");
        var sorted = members.Order().ToArray();
        _groups[group] = sorted;
        foreach (var (key, slot) in _slots)
            if (key.Group == group && Array.BinarySearch(sorted, key.Source) < 0 && _slots.TryRemove(key, out _)) Drop(key, slot);
    }

    /// <summary>Why no collective could ask for this chunk, or null when one could.</summary>
    string? Invalid(in ChunkHeader h, int length)
    {
        if (h.SourceRank < 0 || h.SourceRank >= _worldSize) return $"source rank {h.SourceRank} is outside the world of {_worldSize}";
        if (h.SourceRank == _rank) return $"source rank {h.SourceRank} is this node's own rank";
        if (h.Group is < 0 or >= MaxGroupId) return $"group {h.Group} does not exist";
        if (_groups.TryGetValue(h.Group, out var members) && Array.BinarySearch(members, h.SourceRank) < 0)
            return $"rank {h.SourceRank} is not a member of group {h.Group}";
        bool collective = h.OpId >= 0, pointToPoint = h.OpId <= ProcessGroup.PointToPointOpBase && h.OpId > ProcessGroup.PointToPointOpBase - MaxPointToPointOps;
        if (!collective && !pointToPoint) return $"op id {h.OpId} is out of range";
        if (h.Seq is < 0 or >= MaxSeq) return $"chunk number {h.Seq} is out of range";
        if (h.Offset < 0 || h.Offset > MaxOffset) return $"offset {h.Offset} is out of range";
        if (length < 0) return $"length {length} is negative";
        return null;
    }

    /// <exception cref="StaleGenerationException">the chunk belongs to another generation</exception>
    /// <exception cref="RejectedChunkException">no collective of this generation could ask for it (nothing was changed)</exception>
    public void Deliver(ChunkHeader header, ReceivedChunk chunk)
    {
        if (header.Generation != Generation)
        {
            chunk.Dispose();
            throw new StaleGenerationException(Generation, header.Generation, header.SourceRank);
        }
        int length = chunk.Payload.Length;
        if (Invalid(header, length) is { } problem)
        {
            chunk.Dispose();
            counters?.CountRejected();
            throw new RejectedChunkException(header, problem);
        }
        counters?.Received(length);
        var key = new Key(header.SourceRank, header.Group, header.OpId, header.Seq);
        if (!_slots.TryGetValue(key, out var slot))
        {
            // Nobody waits yet: the chunk waits for its receive, within this source's bounds.
            var unclaimed = _unclaimed.AddOrUpdate(header.SourceRank, _ => (1, length), (_, u) => (u.Chunks + 1, u.Bytes + length));
            if (unclaimed.Chunks > MaxUnclaimedChunks || unclaimed.Bytes > MaxUnclaimedBytes)
            {
                _unclaimed.AddOrUpdate(header.SourceRank, _ => (0, 0), (_, u) => (u.Chunks - 1, u.Bytes - length));
                chunk.Dispose();
                counters?.CountRejected();
                throw new RejectedChunkException(header,
                    $"rank {header.SourceRank} has {unclaimed.Chunks - 1} chunks ({(unclaimed.Bytes - length) >> 20} MiB) that no receive has asked for");
            }
            if (chunk.IsBorrowed) chunk = chunk.Detach();   // its transport needs the bytes back before a receive may come
            var fresh = new Slot { UnclaimedBytes = length };
            slot = _slots.GetOrAdd(key, fresh);
            if (!ReferenceEquals(slot, fresh)) Claimed(header.SourceRank, length);   // a receive came first after all
            else { if (!slot.Chunk.TrySetResult(chunk)) chunk.Dispose(); return; }
        }
        // The waiter runs right here, on the receiving thread: a hop through the thread pool costs more than the
        // work (tens of microseconds on a busy machine; measured: 1.5-2x slower all-reduces from 64 KiB to 4 MiB
        // when chunks over 64 KiB went through the pool). Code after a receive never blocks, so this cannot stall.
        if (!slot.Chunk.TrySetResult(chunk)) chunk.Dispose();
    }

    void Claimed(int source, int bytes) => _unclaimed.AddOrUpdate(source, _ => (0, 0), (_, u) => (u.Chunks - 1, u.Bytes - bytes));

    void Drop(Key key, Slot slot)
    {
        if (slot.UnclaimedBytes >= 0) Claimed(key.Source, slot.UnclaimedBytes);
        if (slot.Chunk.Task.IsCompletedSuccessfully) slot.Chunk.Task.Result.Dispose();
        counters?.CountRejected();
    }

    public async ValueTask<ReceivedChunk> ReceiveAsync(int source, int group, long opId, int seq, TimeSpan timeout, CancellationToken cancellationToken)
    {
        var key = new Key(source, group, opId, seq);
        var slot = _slots.GetOrAdd(key, _ => new Slot());
        try
        {
            // A chunk that arrived before its sender failed (a peer that finished and closed its links) is still taken:
            // only a receive with nothing delivered fails at once.
            if (!slot.Chunk.Task.IsCompleted)
            {
                if (_aborted is { } aborted) throw aborted;
                if (_failedPeers.TryGetValue(source, out var failure)) throw failure;
            }
            return await slot.Chunk.Task.WaitAsync(timeout, cancellationToken).ConfigureAwait(false);
        }
        catch (TimeoutException)
        {
            throw new PeerFailedException(source,
                $"rank {source} sent nothing for {timeout.TotalSeconds:0.#} s (group {group}, op {opId}, chunk {seq}): it is dead, stuck or partitioned");
        }
        finally
        {
            if (_slots.TryRemove(KeyValuePair.Create(key, slot)) && slot.UnclaimedBytes >= 0) Claimed(source, slot.UnclaimedBytes);
        }
    }

    /// <summary>Fails every pending and later receive from <paramref name="source"/>.</summary>
    public void FailPeer(int source, Exception reason)
    {
        _failedPeers.TryAdd(source, reason);
        foreach (var (key, slot) in _slots)
            if (key.Source == source) slot.Chunk.TrySetException(reason);
    }

    /// <summary>Fails every pending and later receive of this generation (a peer reported a failure elsewhere in the ring).</summary>
    public void Abort(Exception reason)
    {
        _aborted ??= reason;
        foreach (var slot in _slots.Values) slot.Chunk.TrySetException(reason);
    }
}
