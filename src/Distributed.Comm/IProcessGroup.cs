namespace Distributed.Comm;

public enum ReduceOp { Sum, Mean, Max }

/// <summary>How reductions travel: exact float32, or bfloat16 (half the bytes; about 3 significant digits).</summary>
public enum Compression { None, BFloat16 }

/// <summary>
/// Collectives among a set of ranks (the whole world or a subgroup: tensor-, data- or pipeline-parallel).
/// Every member calls the same collectives in the same order. Every call has a deadline per received chunk
/// (<see cref="CollectiveOptions.Timeout"/>) and a cancellation token; a dead peer fails the call with a
/// <see cref="PeerFailedException"/> naming its rank.
/// </summary>
public interface IProcessGroup
{
    /// <summary>This process's index within the group.</summary>
    int Rank { get; }
    int Size { get; }

    Task AllReduceAsync(Memory<float> data, ReduceOp op, CancellationToken cancellationToken = default);
    Task BroadcastAsync(Memory<byte> data, int root, CancellationToken cancellationToken = default);
    /// <summary>Concatenates every member's <paramref name="mine"/> (equal lengths) in rank order into <paramref name="all"/>.</summary>
    Task AllGatherAsync(ReadOnlyMemory<float> mine, Memory<float> all, CancellationToken cancellationToken = default);
    /// <summary>Reduces <paramref name="input"/> over members; member r receives segment r (see <see cref="ProcessGroup.Segment"/>).</summary>
    Task ReduceScatterAsync(ReadOnlyMemory<float> input, Memory<float> output, ReduceOp op, CancellationToken cancellationToken = default);
    /// <summary>
    /// In place, over uneven segments (one contiguous range per member, in rank order, tiling the buffer; ZeRO-1's
    /// partition): afterwards segment <see cref="Rank"/> holds the reduction, the others partial results.
    /// </summary>
    Task ReduceScatterAsync(Memory<float> data, IReadOnlyList<(int Start, int Length)> segments, ReduceOp op, CancellationToken cancellationToken = default);
    /// <summary>In place, over the same kind of segments: each member's segment is copied to every other.</summary>
    Task AllGatherAsync(Memory<float> data, IReadOnlyList<(int Start, int Length)> segments, CancellationToken cancellationToken = default);
    Task SendAsync(int destination, ReadOnlyMemory<byte> data, CancellationToken cancellationToken = default);
    Task ReceiveAsync(int source, Memory<byte> data, CancellationToken cancellationToken = default);
    Task BarrierAsync(CancellationToken cancellationToken = default);
}

public sealed record CollectiveOptions
{
    /// <summary>Bytes per chunk: large enough to amortise per-message cost, small enough to pipeline.</summary>
    public int ChunkBytes { get; init; } = 1 << 20;

    /// <summary>How long a receive waits for one chunk before declaring its sender failed.</summary>
    public TimeSpan Timeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// All-reduces of at most this many bytes take the one-shot algorithm (one message latency; every member receives
    /// n-1 whole buffers), larger ones the pipelined ring (2(n-1) latencies; 2(n-1)/n of the buffer). Null: the
    /// crossover bench/allreduce-algorithms measured on shared memory, which depends on the member count (README,
    /// "Data plane").
    /// </summary>
    public long? OneShotMaxBytes { get; init; }

    /// <summary>The one-shot limit for a group of <paramref name="members"/>.</summary>
    public long OneShotLimit(int members) => OneShotMaxBytes ?? (members <= 2 ? 16 << 10 : 256 << 10);

    public Kernels.IReductionKernels Kernels { get; init; } = Comm.Kernels.ReductionKernels.Default;

    /// <summary>
    /// Applies to all-reduce and reduce-scatter: chunks travel as bfloat16 and are accumulated in float32. The owner of
    /// each reduced segment rounds it to bfloat16 too, so every rank still ends with the same bits.
    /// </summary>
    public Compression Compression { get; init; } = Compression.None;
}
