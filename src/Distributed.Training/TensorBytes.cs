using System.Buffers;
using TorchSharp;
using static TorchSharp.torch;

namespace Distributed.Training;

/// <summary>
/// The bytes of a contiguous CPU tensor as native memory with a long length. TorchSharp's <c>Tensor.bytes</c> is a
/// Span, so it ends at 2 GiB; this hands out pieces of any tensor, as spans or as <see cref="Memory{T}"/> (for
/// collectives), straight over the tensor's own memory: no copy, no managed buffer of the whole tensor.
/// Valid while the tensor lives and is not resized; it keeps a reference to the tensor so the GC cannot free it.
/// </summary>
public readonly unsafe struct TensorBytes
{
    /// <summary>The piece size used unless a caller picks another: large enough that per-piece costs vanish, small
    /// enough that a piece is never a memory problem and fits every Span and Memory.</summary>
    public const int DefaultPieceBytes = 256 << 20;

    readonly Tensor? _owner;
    readonly byte* _start;

    TensorBytes(Tensor owner, byte* start, long length)
    {
        _owner = owner;
        _start = start;
        Length = length;
    }

    public long Length { get; }

    /// <summary>Where the tensor's bytes start (its storage: the same for every TorchSharp wrapper of one tensor).</summary>
    public byte* Address => _start;

    /// <summary>
    /// The bytes of <paramref name="tensor"/>, which must be contiguous and on the CPU. A tensor of 2 GiB or more gets
    /// a one-element view, disposed at once, to find its address (TorchSharp's dispose scopes are per thread, so this
    /// is safe off the training thread too); smaller ones create no torch object.
    /// </summary>
    public static TensorBytes Of(Tensor tensor, string name = "tensor")
    {
        if (tensor.device_type != DeviceType.CPU || !tensor.is_contiguous())
            throw new ArgumentException($"{name} must be contiguous and on the CPU to be read or written as bytes (it is {tensor.device_type}, " +
                $"{(tensor.is_contiguous() ? "contiguous" : "not contiguous")})", nameof(tensor));
        long length = tensor.NumberOfElements * tensor.ElementSize;
        if (length == 0) return new TensorBytes(tensor, null, 0);
        if (length <= int.MaxValue) return new TensorBytes(tensor, AddressOf(tensor.bytes), length);
        using var flat = tensor.view(-1);
        using var first = flat.narrow(0, 0, 1);
        return new TensorBytes(tensor, AddressOf(first.bytes), length);
    }

    static byte* AddressOf(Span<byte> bytes)
    {
        fixed (byte* start = bytes) return start;   // native memory: "fixed" pins nothing, it only takes the address
    }

    /// <summary>Bytes [offset, offset + length).</summary>
    public Span<byte> Span(long offset, int length)
    {
        Check(offset, length);
        return new Span<byte>(_start + offset, length);
    }

    /// <summary>Bytes [offset, offset + length) as Memory, for APIs that take it (collectives, async I/O).</summary>
    public Memory<byte> Memory(long offset, int length)
    {
        Check(offset, length);
        return new Comm.NativeMemory<byte>(_start + offset, length, _owner).Memory;
    }

    /// <summary>Offsets and lengths that cover these bytes in order, each at most <paramref name="pieceBytes"/>.</summary>
    public IEnumerable<(long Offset, int Length)> Pieces(int pieceBytes = DefaultPieceBytes) => Split(Length, pieceBytes);

    /// <summary>Offsets and lengths that cover [0, <paramref name="length"/>) in order, each at most <paramref name="pieceBytes"/>; none when empty.</summary>
    public static IEnumerable<(long Offset, int Length)> Split(long length, int pieceBytes)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(pieceBytes);
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        for (long offset = 0; offset < length; offset += pieceBytes)
            yield return (offset, (int)Math.Min(pieceBytes, length - offset));
    }

    void Check(long offset, int length)
    {
        if (offset < 0 || length < 0 || offset > Length - length)
            throw new ArgumentOutOfRangeException(nameof(offset), $"bytes [{offset}, {offset + length}) are outside the tensor's {Length}");
    }
}
