using Distributed.Core;
using TorchSharp;
using static TorchSharp.torch;

namespace Distributed.Training.Checkpoints;

/// <summary>
/// One tensor of a rank's state as checkpoints see it: the global tensor's <see cref="Name"/> (the same on every rank
/// and in every layout), the local <see cref="Tensor"/>, and which part of the global tensor it holds
/// (<see cref="Slice"/>; null: the whole tensor).
/// </summary>
public sealed record StateEntry(string Name, Tensor Tensor, TensorSlice? Slice = null)
{
    // Checked when the entry is made: a local tensor that does not fit its slice is a bug of the caller, not of a checkpoint.
    public TensorSlice? Slice { get; init; } = Checked(Name, Tensor, Slice);

    /// <summary>The global tensor's shape.</summary>
    public long[] GlobalShape => Slice?.GlobalShape ?? Tensor.shape;

    /// <summary>Whether this is the whole global tensor (a whole slice counts as whole, also with padding).</summary>
    public bool IsWhole => Slice is null || Slice.IsWhole;

    /// <summary>The bytes a shard file stores for this entry: the held indices only, never the padding.</summary>
    public long StoredBytes => Tensor.NumberOfElements / Math.Max(1, LocalLength) * HeldLength * Tensor.ElementSize;

    /// <summary>Whether <see cref="Tensor"/> can be written as it is: contiguous on the CPU, without padding.</summary>
    public bool IsStorable => Tensor.device_type == DeviceType.CPU && Tensor.is_contiguous() && LocalLength == HeldLength;

    // Along the slice's dimension: the local length (padding included) and the global indices held.
    long LocalLength => Slice is null || Tensor.dim() == 0 ? 1 : Tensor.shape[Slice.Dim];
    long HeldLength => Slice is null || Tensor.dim() == 0 ? 1 : Slice.Held;

    /// <summary>
    /// A view of the held indices (the padding cut off), for the caller to dispose: along the slice's dimension it is
    /// the concatenation of the segments, every other dimension is the global one.
    /// </summary>
    public Tensor Held() => LocalLength == HeldLength ? Tensor.detach() : Tensor.narrow(Slice!.Dim, 0, HeldLength);

    /// <summary>
    /// This entry as a shard file stores it: the held indices, contiguous on the CPU, in a new tensor for the caller to
    /// dispose. With <paramref name="copy"/> false that is a view of the tensor's own memory wherever one will do.
    /// </summary>
    public StateEntry ToStored(bool copy)
    {
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        var held = Held();
        var stored = !copy && held.device_type == DeviceType.CPU && held.is_contiguous() ? held : held.cpu().contiguous().clone();
        return this with { Tensor = stored.DetachFromDisposeScope() };
    }

    static TensorSlice? Checked(string name, Tensor tensor, TensorSlice? slice)
    {
        if (slice is null) return null;
        long[] local = tensor.shape, global = slice.GlobalShape;
        int dim = slice.Dim;
        var sorted = slice.Segments.OrderBy(s => s.Start).ToList();
        string? problem =
            local.Length != global.Length ? $"{local.Length} dimensions against the global tensor's {global.Length}" :
            local.Length == 0 ? null :
            dim < 0 || dim >= global.Length ? $"the slice names dimension {dim}" :
            Enumerable.Range(0, global.Length).Any(d => d != dim && local[d] != global[d]) ? $"other dimensions than {dim} differ from the global tensor's" :
            local[dim] < slice.Held ? $"{local[dim]} indices along dimension {dim}, fewer than the {slice.Held} held" :
            sorted.Any(s => s.Start < 0 || s.Length <= 0 || s.Start + s.Length > global[dim]) ? "a segment lies outside the global tensor" :
            sorted.Zip(sorted.Skip(1)).Any(p => p.First.Start + p.First.Length > p.Second.Start) ? "segments overlap" : null;
        if (problem is not null)
            throw new ArgumentException($"state entry '{name}' of local shape [{string.Join(", ", local)}] does not fit its slice ({slice}): {problem}");
        return slice;
    }
}
