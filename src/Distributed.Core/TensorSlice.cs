namespace Distributed.Core;

/// <summary>A run of <see cref="Length"/> indices from global index <see cref="Start"/> along a slice's dimension.</summary>
public readonly record struct SliceSegment(long Start, long Length);

/// <summary>
/// Which part of a global tensor a local tensor holds, so that a checkpoint written by one parallel layout loads
/// into any other: along <see cref="Dim"/> the local tensor is the concatenation of <see cref="Segments"/> (global
/// index ranges, in order); every other dimension is whole. Local indices past the segments are padding (a
/// vocabulary padded to a multiple of tp) and belong to no global tensor. The fused q/k/v projection split by heads
/// is three segments (this rank's rows of q, of k and of v).
/// </summary>
public sealed record TensorSlice(long[] GlobalShape, int Dim, SliceSegment[] Segments)
{
    public static TensorSlice Whole(long[] globalShape) =>
        new(globalShape, 0, globalShape.Length == 0 ? [] : [new SliceSegment(0, globalShape[0])]);

    /// <summary>Rows [start, start + length) of dimension <paramref name="dim"/>.</summary>
    public static TensorSlice Range(long[] globalShape, int dim, long start, long length) => new(globalShape, dim, [new SliceSegment(start, length)]);

    /// <summary>Whether the slice is the whole global tensor.</summary>
    public bool IsWhole => GlobalShape.Length == 0 || (Segments.Length == 1 && Segments[0].Start == 0 && Segments[0].Length == GlobalShape[Dim]);

    /// <summary>Global indices held along <see cref="Dim"/>.</summary>
    public long Held => Segments.Sum(s => s.Length);

    public override string ToString() => IsWhole ? "whole"
        : $"dim {Dim} [{string.Join(", ", Segments.Select(s => $"{s.Start}:{s.Start + s.Length}"))}] of [{string.Join(", ", GlobalShape)}]";
}
