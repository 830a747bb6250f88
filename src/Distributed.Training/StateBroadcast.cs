using System.Security.Cryptography;
using Distributed.Comm;

namespace Distributed.Training;

/// <summary>
/// Gives every rank of a group the root's training state: a few counters (steps), then each tensor in pieces
/// straight from and into its own memory, so no rank ever holds a second copy of the state (which may be far
/// larger than 2 GiB). Then every rank hashes what it holds and compares with the root's SHA-256.
/// </summary>
public static class StateBroadcast
{
    /// <summary>The broadcast's piece: the most a receiver buffers beyond its own tensors (see <see cref="RunAsync"/>).
    /// Each piece costs a barrier; 64 MiB take tens of milliseconds on the local transports, so that is a few percent.</summary>
    public const int PieceBytes = 64 << 20;

    /// <summary>Collectives <see cref="RunAsync"/> runs for tensors of these lengths: the layout, two per piece, the hash.</summary>
    public static int Collectives(IEnumerable<TensorBytes> tensors, int pieceBytes = PieceBytes) =>
        2 + 2 * tensors.Sum(t => (int)((t.Length + pieceBytes - 1) / pieceBytes));

    /// <summary>
    /// Overwrites <paramref name="counters"/> and <paramref name="tensors"/> on every rank but <paramref name="root"/>
    /// with the root's; returns the SHA-256 of the state, which is then the same on every rank. Every rank passes
    /// tensors of the same sizes in the same order; a rank whose state has another size fails, naming both sizes.
    /// </summary>
    public static async Task<byte[]> RunAsync(IProcessGroup group, long[] counters, IReadOnlyList<TensorBytes> tensors, int root = 0,
        int pieceBytes = PieceBytes, CancellationToken cancellationToken = default)
    {
        long total = tensors.Sum(t => t.Length);
        // The layout travels first: with a different one the pieces would not line up, and the error would be vaguer.
        var layout = new long[counters.Length + 2];
        counters.CopyTo(layout, 0);
        (layout[^2], layout[^1]) = (tensors.Count, total);
        var layoutBytes = new byte[layout.Length * sizeof(long)];
        Buffer.BlockCopy(layout, 0, layoutBytes, 0, layoutBytes.Length);
        await group.BroadcastAsync(layoutBytes, root, cancellationToken).ConfigureAwait(false);
        Buffer.BlockCopy(layoutBytes, 0, layout, 0, layoutBytes.Length);
        if (layout[^2] != tensors.Count || layout[^1] != total)
            throw new InvalidOperationException($"rank {group.Rank}'s state is {tensors.Count} tensors of {total:N0} bytes, rank {root}'s " +
                $"{layout[^2]} tensors of {layout[^1]:N0} bytes: do all ranks run the same model?");
        Array.Copy(layout, counters, counters.Length);

        // The data plane moves every arriving chunk into the receiver's mailbox at once, without flow control, so a
        // receiver that falls behind would buffer whatever the root sends (all of a state, at worst): a barrier after
        // each piece keeps the root at most one piece ahead of the slowest receiver.
        foreach (var tensor in tensors)
            foreach (var (offset, length) in tensor.Pieces(pieceBytes))
            {
                await group.BroadcastAsync(tensor.Memory(offset, length), root, cancellationToken).ConfigureAwait(false);
                await group.BarrierAsync(cancellationToken).ConfigureAwait(false);
            }

        var mine = Sha256(counters, tensors, pieceBytes);
        var roots = (byte[])mine.Clone();
        await group.BroadcastAsync(roots, root, cancellationToken).ConfigureAwait(false);
        if (!mine.AsSpan().SequenceEqual(roots))
            throw new InvalidOperationException($"rank {group.Rank}'s state differs from rank {root}'s after the broadcast: " +
                $"sha256 {Convert.ToHexStringLower(mine)}, rank {root}'s {Convert.ToHexStringLower(roots)}");
        return mine;
    }

    /// <summary>SHA-256 of the counters (little-endian) and then every tensor's bytes, read in pieces.</summary>
    public static byte[] Sha256(ReadOnlySpan<long> counters, IEnumerable<TensorBytes> tensors, int pieceBytes = TensorBytes.DefaultPieceBytes)
    {
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        hash.AppendData(System.Runtime.InteropServices.MemoryMarshal.AsBytes(counters));
        foreach (var tensor in tensors)
            foreach (var (offset, length) in tensor.Pieces(pieceBytes))
                hash.AppendData(tensor.Span(offset, length));
        return hash.GetHashAndReset();
    }
}
