using System.Buffers;
using System.Buffers.Binary;
using System.Runtime.InteropServices;
using System.Text;

namespace Distributed.Comm;

/// <summary>
/// Collectives over <see cref="PeerLinks"/>. All-reduce picks its algorithm by size, as MPI and NCCL do: up to
/// <see cref="CollectiveOptions.OneShotLimit"/> one-shot (every member sends its whole buffer to every other and
/// each sums them in rank order: one message latency), above it the ring: reduce-scatter then all-gather (each
/// rank sends 2(n-1)/n of the buffer), cut into chunks that are pipelined: chunk c of ring step t+1 goes out as soon
/// as chunk c of step t has arrived and been reduced, so sending, receiving and reducing overlap. Both leave every
/// member with the same bits.
/// </summary>
public sealed class ProcessGroup : IProcessGroup
{
    // Op ids: collectives count up from 0; control frames and point-to-point transfers use separate negative ranges.
    internal const long AbortOpId = -1, LivenessOpId = -2, PointToPointOpBase = -1_000_000;

    readonly PeerLinks _links;
    readonly int[] _members;   // global ranks, in group-rank order
    readonly int _group;
    readonly CollectiveOptions _options;
    long _nextOp;
    readonly Dictionary<int, long> _sendCount = new(), _receiveCount = new();

    public ProcessGroup(PeerLinks links, int groupId, IReadOnlyList<int> members, CollectiveOptions? options = null)
    {
        _links = links;
        _members = members.ToArray();
        _group = groupId;
        _options = options ?? new CollectiveOptions();
        Rank = Array.IndexOf(_members, links.Rank);
        if (Rank < 0) throw new ArgumentException($"rank {links.Rank} is not a member of group {groupId} ({string.Join(",", members)})");
        links.Mailbox.RegisterGroup(groupId, _members);
    }

    public int Rank { get; }
    public int Size => _members.Length;

    /// <summary>This group's all-reduces, for bus bandwidth in a worker's reports.</summary>
    public CollectiveCounters Counters { get; } = new();

    /// <summary>Element range [start, start+length) of segment <paramref name="index"/> when <paramref name="total"/> splits over <paramref name="parts"/>.</summary>
    public static (int Start, int Length) Segment(int total, int parts, int index)
    {
        int baseLength = total / parts, extra = total % parts;
        int start = index * baseLength + Math.Min(index, extra);
        return (start, baseLength + (index < extra ? 1 : 0));
    }

    public async Task AllReduceAsync(Memory<float> data, ReduceOp op, CancellationToken cancellationToken = default)
    {
        Counters.Started((long)data.Length * sizeof(float));
        try { await AllReduceCore(data, op, cancellationToken).ConfigureAwait(false); }
        finally { Counters.Finished(); }
    }

    Task AllReduceCore(Memory<float> data, ReduceOp op, CancellationToken cancellationToken)
    {
        int n = Size;
        if ((long)data.Length * sizeof(float) <= _options.OneShotLimit(n) && _options.Compression == Compression.None)
            return OneShotAllReduce(data, op, cancellationToken);
        var segments = EvenSegments(data.Length);
        var steps = ReduceScatterSteps(n).Concat(AllGatherSteps(n)).ToList();
        return RunRing("all-reduce", data, segments, steps, scaleAfterStep: op == ReduceOp.Mean ? n - 2 : -1, cancellationToken,
            compressed: _options.Compression == Compression.BFloat16, reduce: op);
    }

    public async Task ReduceScatterAsync(ReadOnlyMemory<float> input, Memory<float> output, ReduceOp op, CancellationToken cancellationToken = default)
    {
        var segments = EvenSegments(input.Length);
        if (output.Length != segments[Rank].Length)
            throw new ArgumentException($"reduce-scatter output has {output.Length} elements, rank {Rank}'s segment has {segments[Rank].Length}");
        var work = input.ToArray();   // the ring reduces in place; the caller's input stays as it was
        await ReduceScatterAsync(work, segments, op, cancellationToken).ConfigureAwait(false);
        work.AsMemory(segments[Rank].Start, segments[Rank].Length).CopyTo(output);
    }

    public async Task ReduceScatterAsync(Memory<float> data, IReadOnlyList<(int Start, int Length)> segments, ReduceOp op, CancellationToken cancellationToken = default)
    {
        var ranges = CheckSegments("reduce-scatter", data.Length, segments);
        // Half an all-reduce's traffic: counted as half its bytes, so the bus bandwidth in reports stays comparable.
        Counters.Started((long)data.Length * sizeof(float) / 2);
        try
        {
            await RunRing("reduce-scatter", data, ranges, ReduceScatterSteps(Size).ToList(), op == ReduceOp.Mean ? Size - 2 : -1, cancellationToken,
                compressed: _options.Compression == Compression.BFloat16, reduce: op).ConfigureAwait(false);
        }
        finally { Counters.Finished(); }
    }

    public Task AllGatherAsync(ReadOnlyMemory<float> mine, Memory<float> all, CancellationToken cancellationToken = default)
    {
        int n = Size;
        if (all.Length != mine.Length * n)
            throw new ArgumentException($"all-gather output has {all.Length} elements, expected {n} x {mine.Length}");
        mine.CopyTo(all[(Rank * mine.Length)..]);
        return AllGatherAsync(all, Enumerable.Range(0, n).Select(i => (i * mine.Length, mine.Length)).ToArray(), cancellationToken);
    }

    public async Task AllGatherAsync(Memory<float> data, IReadOnlyList<(int Start, int Length)> segments, CancellationToken cancellationToken = default)
    {
        var ranges = CheckSegments("all-gather", data.Length, segments);
        Counters.Started((long)data.Length * sizeof(float) / 2);
        try { await RunRing("all-gather", data, ranges, AllGatherSteps(Size).ToList(), -1, cancellationToken).ConfigureAwait(false); }
        finally { Counters.Finished(); }
    }

    (int Start, int Length)[] EvenSegments(int total) => Enumerable.Range(0, Size).Select(i => Segment(total, Size, i)).ToArray();

    /// <summary>Segments must tile the buffer in rank order (the ring's member r owns segment r); an empty one is allowed.</summary>
    (int Start, int Length)[] CheckSegments(string name, int total, IReadOnlyList<(int Start, int Length)> segments)
    {
        if (segments.Count != Size) throw new ArgumentException($"{name}: {segments.Count} segments for a group of {Size}");
        int next = 0;
        for (int i = 0; i < segments.Count; i++)
        {
            if (segments[i].Start != next || segments[i].Length < 0)
                throw new ArgumentException($"{name}: segment {i} is [{segments[i].Start}, +{segments[i].Length}), expected to start at {next}: segments must tile the buffer in rank order");
            next += segments[i].Length;
        }
        if (next != total) throw new ArgumentException($"{name}: segments cover {next} of the buffer's {total} elements");
        return [.. segments];
    }

    public async Task BroadcastAsync(Memory<byte> data, int root, CancellationToken cancellationToken = default)
    {
        long op = _nextOp++;
        try
        {
            if (Rank == root)
                await Task.WhenAll(Enumerable.Range(0, Size).Where(r => r != root)
                    .Select(r => SendChunks(r, op, data, cancellationToken))).ConfigureAwait(false);
            else
                await ReceiveChunks(root, op, data, cancellationToken).ConfigureAwait(false);
        }
        catch (PeerFailedException e)
        {
            await ReportFailureAsync(e).ConfigureAwait(false);
            throw;
        }
    }

    public Task BarrierAsync(CancellationToken cancellationToken = default) =>
        AllReduceAsync(new float[Math.Max(1, Size)], ReduceOp.Sum, cancellationToken);

    /// <summary>Point to point; ops are numbered per (sender, receiver) pair so other members need not take part.</summary>
    public Task SendAsync(int destination, ReadOnlyMemory<byte> data, CancellationToken cancellationToken = default) =>
        SendChunks(destination, PointToPointOpBase - Next(_sendCount, destination), data, cancellationToken);

    public Task ReceiveAsync(int source, Memory<byte> data, CancellationToken cancellationToken = default) =>
        ReceiveChunks(source, PointToPointOpBase - Next(_receiveCount, source), data, cancellationToken);

    /// <summary>Sends a buffer to one member in ChunkBytes pieces (one piece when empty).</summary>
    async Task SendChunks(int member, long op, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        int chunk = _options.ChunkBytes, chunks = Math.Max(1, (data.Length + chunk - 1) / chunk);
        for (int c = 0; c < chunks; c++)
        {
            int start = c * chunk, length = Math.Min(chunk, data.Length - start);
            await _links.SendAsync(_members[member], Header(op, c, start), data.Slice(start, length), _options.Timeout, cancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>Receives what <see cref="SendChunks"/> sent into a buffer of the same size.</summary>
    async Task ReceiveChunks(int member, long op, Memory<byte> data, CancellationToken cancellationToken)
    {
        int chunk = _options.ChunkBytes, chunks = Math.Max(1, (data.Length + chunk - 1) / chunk);
        for (int c = 0; c < chunks; c++)
        {
            using var received = await Receive(member, op, c, cancellationToken).ConfigureAwait(false);
            if (received.Payload.Length != Math.Min(chunk, data.Length - c * chunk))
                throw new InvalidDataException($"rank {member} sent {received.Payload.Length} bytes in chunk {c}; this rank expects a buffer of {data.Length}");
            received.Payload.Span.CopyTo(data.Span[(c * chunk)..]);
        }
    }

    static long Next(Dictionary<int, long> counters, int peer)
    {
        lock (counters)
        {
            counters.TryGetValue(peer, out long value);
            counters[peer] = value + 1;
            return value;
        }
    }

    /// <summary>
    /// Every member sends its buffer to every other; each then sums the n buffers chunk by chunk in rank order
    /// (x0 + x1 + ...), so all end with the same bits after one message latency instead of 2(n-1).
    /// </summary>
    async Task OneShotAllReduce(Memory<float> data, ReduceOp op, CancellationToken cancellationToken)
    {
        long opId = _nextOp++;
        int n = Size;
        if (n == 1 || data.Length == 0) return;
        using var failed = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        var kernels = _options.Kernels;
        int chunkFloats = Math.Max(1, _options.ChunkBytes / sizeof(float));
        int chunks = (data.Length + chunkFloats - 1) / chunkFloats;
        // This rank's own values, kept aside: they are sent from there while the sum is built in the caller's buffer
        // (a send may wait for its link while the sum is already changing it).
        float[] own = ArrayPool<float>.Shared.Rent(data.Length);
        try
        {
            data.Span.CopyTo(own);
            var reducing = CancelOthersOnFailure(ReduceInRankOrder(), failed);   // its first receive waits before the sends go out
            var sends = new List<Task>(n - 1);
            for (int m = 0; m < n; m++)
                if (m != Rank) sends.Add(CancelOthersOnFailure(SendChunks(m, opId, AsBytes(own.AsMemory(0, data.Length)), failed.Token), failed));
            await Task.WhenAll(sends.Append(reducing)).ConfigureAwait(false);
        }
        catch (PeerFailedException e)
        {
            await ReportFailureAsync(e).ConfigureAwait(false);
            throw;
        }
        finally
        {
            ArrayPool<float>.Shared.Return(own);
        }

        async Task ReduceInRankOrder()
        {
            for (int c = 0; c < chunks; c++)
            {
                int start = c * chunkFloats, length = Math.Min(chunkFloats, data.Length - start);
                for (int m = 0; m < n; m++)
                {
                    if (m == Rank)
                    {
                        if (m > 0) Combine(op, data.Span.Slice(start, length), own.AsSpan(start, length));
                        continue;   // rank 0's buffer already holds x0
                    }
                    using var chunk = await Receive(m, opId, c, failed.Token).ConfigureAwait(false);
                    if (chunk.Payload.Length != length * sizeof(float))
                        throw new InvalidDataException($"all-reduce: rank {m} sent {chunk.Payload.Length} bytes for a chunk of {length * sizeof(float)}; do all ranks pass buffers of the same size?");
                    var incoming = MemoryMarshal.Cast<byte, float>(chunk.Payload.Span);
                    if (m == 0) incoming.CopyTo(data.Span.Slice(start, length));
                    else Combine(op, data.Span.Slice(start, length), incoming);
                }
                if (op == ReduceOp.Mean) kernels.Scale(data.Span.Slice(start, length), 1f / n);
            }
        }
    }

    /// <summary>accumulator = accumulator (op) chunk: a sum on the reduction kernels (a mean is scaled afterwards), or the element-wise maximum.</summary>
    void Combine(ReduceOp op, Span<float> accumulator, ReadOnlySpan<float> chunk)
    {
        if (op == ReduceOp.Max) System.Numerics.Tensors.TensorPrimitives.Max(accumulator, chunk, accumulator);
        else _options.Kernels.Accumulate(accumulator, chunk);
    }

    /// <summary>One ring step: send segment Send to the right neighbour, receive segment Receive from the left.</summary>
    readonly record struct RingStep(int Send, int Receive, bool Reduce);

    // Reduce-scatter that leaves member r holding the reduced segment r.
    IEnumerable<RingStep> ReduceScatterSteps(int n)
    {
        for (int t = 0; t < n - 1; t++)
            yield return new RingStep(Mod(Rank - t - 1, n), Mod(Rank - t - 2, n), Reduce: true);
    }

    // All-gather starting from member r holding segment r.
    IEnumerable<RingStep> AllGatherSteps(int n)
    {
        for (int t = 0; t < n - 1; t++)
            yield return new RingStep(Mod(Rank - t, n), Mod(Rank - t - 1, n), Reduce: false);
    }

    static int Mod(int a, int n) => ((a % n) + n) % n;

    /// <summary>
    /// Runs ring steps with chunk pipelining. Step t+1 always sends the segment step t received, so chunk c of step
    /// t+1 goes out right where chunk c of step t has been received and reduced: on the thread that delivered it, with
    /// no hand-off in between (a credit semaphore here cost a thread-pool hop per chunk: about 140 us per all-reduce
    /// at 2 ranks on a busy 2-core machine). Only step 0's chunks are sent by a loop of their own.
    /// </summary>
    async Task RunRing(string name, Memory<float> data, (int Start, int Length)[] segments, List<RingStep> steps, int scaleAfterStep,
        CancellationToken cancellationToken, bool compressed = false, ReduceOp reduce = ReduceOp.Sum)
    {
        long op = _nextOp++;
        int n = Size;
        if (n == 1 || data.Length == 0) return;
        int right = _members[Mod(Rank + 1, n)], left = Mod(Rank - 1, n);
        int chunkFloats = Math.Max(1, _options.ChunkBytes / sizeof(float));
        int maxChunks = segments.Max(s => (s.Length + chunkFloats - 1) / chunkFloats);
        int ChunksOf(int segment) => (segments[segment].Length + chunkFloats - 1) / chunkFloats;
        (int Start, int Length) ChunkOf(int segment, int c)
        {
            int start = segments[segment].Start + c * chunkFloats;
            return (start, Math.Min(chunkFloats, segments[segment].Start + segments[segment].Length - start));
        }

        using var failed = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        var kernels = _options.Kernels;
        float scale = 1f / n;
        int wireBytes = compressed ? sizeof(ushort) : sizeof(float);
        int lastReduceStep = steps.FindLastIndex(s => s.Reduce);

        async Task Send(int t, int c)
        {
            var (start, length) = ChunkOf(steps[t].Send, c);
            var header = Header(op, t * maxChunks + c, start * sizeof(float));
            if (!compressed)
            {
                await _links.SendAsync(right, header, AsBytes(data.Slice(start, length)), _options.Timeout, failed.Token).ConfigureAwait(false);
                return;
            }
            var packed = ArrayPool<ushort>.Shared.Rent(length);
            try
            {
                kernels.ToBFloat16(data.Span.Slice(start, length), packed.AsSpan(0, length));
                await _links.SendAsync(right, header, AsBytes(packed, length), _options.Timeout, failed.Token).ConfigureAwait(false);
            }
            finally { ArrayPool<ushort>.Shared.Return(packed); }
        }

        async Task SendFirstStep()
        {
            for (int c = 0; c < ChunksOf(steps[0].Send); c++) await Send(0, c).ConfigureAwait(false);
        }

        async Task ReceiveAndForward()
        {
            for (int t = 0; t < steps.Count; t++)
            {
                int segment = steps[t].Receive;
                for (int c = 0; c < ChunksOf(segment); c++)
                {
                    var (start, length) = ChunkOf(segment, c);
                    using (var chunk = await Receive(left, op, t * maxChunks + c, failed.Token).ConfigureAwait(false))
                    {
                        if (chunk.Payload.Length != length * wireBytes)
                            throw new InvalidDataException($"{name}: rank {left} sent {chunk.Payload.Length} bytes for a chunk of {length * wireBytes}; do all ranks pass buffers of the same size and options?");
                        var target = data.Span.Slice(start, length);
                        float[]? widened = null;
                        try
                        {
                            ReadOnlySpan<float> incoming;
                            if (compressed)
                            {
                                widened = ArrayPool<float>.Shared.Rent(length);
                                kernels.FromBFloat16(MemoryMarshal.Cast<byte, ushort>(chunk.Payload.Span), widened.AsSpan(0, length));
                                incoming = widened.AsSpan(0, length);
                            }
                            else incoming = MemoryMarshal.Cast<byte, float>(chunk.Payload.Span);
                            if (steps[t].Reduce) Combine(reduce, target, incoming);
                            else incoming.CopyTo(target);
                            if (t == scaleAfterStep) kernels.Scale(target, scale);
                            if (compressed && t == lastReduceStep) RoundToBFloat16(kernels, target);
                        }
                        finally { if (widened is not null) ArrayPool<float>.Shared.Return(widened); }
                    }
                    if (t + 1 < steps.Count) await Send(t + 1, c).ConfigureAwait(false);
                }
            }
        }

        // The first receive is posted before the first send, so that the peer's chunk finds it waiting (and can be
        // reduced straight out of a shared-memory ring instead of parked in a copy).
        var receiving = ReceiveAndForward();
        var sending = SendFirstStep();
        try
        {
            await Task.WhenAll(CancelOthersOnFailure(sending, failed), CancelOthersOnFailure(receiving, failed)).ConfigureAwait(false);
        }
        catch (PeerFailedException e)
        {
            await ReportFailureAsync(e).ConfigureAwait(false);
            throw;
        }
    }

    /// <summary>One part of a collective failing stops its other parts at once, instead of at their deadlines.</summary>
    static async Task CancelOthersOnFailure(Task part, CancellationTokenSource failed)
    {
        try { await part.ConfigureAwait(false); }
        catch { failed.Cancel(); throw; }
    }

    ValueTask<ReceivedChunk> Receive(int sourceMember, long op, int seq, CancellationToken cancellationToken) =>
        _links.Mailbox.ReceiveAsync(_members[sourceMember], _group, op, seq, _options.Timeout, cancellationToken);

    ChunkHeader Header(long op, int seq, long offset) => new(_links.Generation, _links.Rank, _group, op, seq, offset);

    /// <summary>Tells the other members which rank failed, so they fail now instead of at their deadline.</summary>
    async Task ReportFailureAsync(PeerFailedException failure)
    {
        var reason = Encoding.UTF8.GetBytes(failure.Message);
        var payload = new byte[4 + reason.Length];
        BinaryPrimitives.WriteInt32LittleEndian(payload, failure.Rank);
        reason.CopyTo(payload, 4);
        using var quick = new CancellationTokenSource(TimeSpan.FromSeconds(2));
        var notices = _members.Where(m => m != _links.Rank && m != failure.Rank).Select(async m =>
        {
            try { await _links.SendAsync(m, Header(AbortOpId, 0, 0), payload, TimeSpan.FromSeconds(2), quick.Token).ConfigureAwait(false); }
            catch (Exception) { }   // best effort: that peer may be gone too
        });
        await Task.WhenAll(notices).ConfigureAwait(false);
    }

    /// <summary>The owner of a reduced segment keeps what the others will receive: its bfloat16 rounding.</summary>
    static void RoundToBFloat16(Kernels.IReductionKernels kernels, Span<float> values)
    {
        var packed = ArrayPool<ushort>.Shared.Rent(values.Length);
        try
        {
            kernels.ToBFloat16(values, packed.AsSpan(0, values.Length));
            kernels.FromBFloat16(packed.AsSpan(0, values.Length), values);
        }
        finally { ArrayPool<ushort>.Shared.Return(packed); }
    }

    /// <summary>The bytes of a float buffer without copying: arrays and native memory (tensor-backed buckets) alike.</summary>
    static ReadOnlyMemory<byte> AsBytes(Memory<float> floats)
    {
        if (MemoryMarshal.TryGetArray<float>(floats, out var segment))
            return new ArrayBytes<float>(segment.Array!, segment.Offset, segment.Count).Memory;
        if (MemoryMarshal.TryGetMemoryManager<float, NativeMemory<float>>(floats, out var native, out int start, out int length))
            return native.BytesOf(start, length);
        throw new ArgumentException("collective buffers must be arrays or NativeMemory<float>: a copy here would cost a buffer per chunk");
    }

    static ReadOnlyMemory<byte> AsBytes(ushort[] values, int count) => new ArrayBytes<ushort>(values, 0, count).Memory;

    /// <summary>A byte view of part of an array, without copying, for zero-copy sends.</summary>
    sealed class ArrayBytes<T>(T[] array, int offset, int count) : MemoryManager<byte> where T : unmanaged
    {
        public override Span<byte> GetSpan() => MemoryMarshal.AsBytes(array.AsSpan(offset, count));

        public override unsafe MemoryHandle Pin(int elementIndex = 0)
        {
            var handle = GCHandle.Alloc(array, GCHandleType.Pinned);   // freed when the MemoryHandle is disposed
            byte* start = (byte*)handle.AddrOfPinnedObject() + (long)offset * sizeof(T) + elementIndex;
            return new MemoryHandle(start, handle);
        }

        public override void Unpin() { }

        protected override void Dispose(bool disposing) { }
    }
}
