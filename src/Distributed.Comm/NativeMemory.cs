using System.Buffers;

namespace Distributed.Comm;

/// <summary>
/// A <see cref="Memory{T}"/> over native memory that someone else owns (a tensor's storage), so collectives and I/O
/// read and write it in place. <paramref name="owner"/>, when given, is kept alive by every pinned use.
/// <see cref="BytesOf"/> gives the same memory as bytes for sending.
/// </summary>
public sealed unsafe class NativeMemory<T>(T* pointer, int length, object? owner = null) : MemoryManager<T> where T : unmanaged
{
    public override Span<T> GetSpan() => new(pointer, length);

    public override MemoryHandle Pin(int elementIndex = 0) => new(pointer + elementIndex, pinnable: this);   // native memory never moves

    public override void Unpin() => GC.KeepAlive(owner);

    protected override void Dispose(bool disposing) { }

    /// <summary>Elements [start, start + count) as bytes.</summary>
    public ReadOnlyMemory<byte> BytesOf(int start, int count) => new NativeMemory<byte>((byte*)(pointer + start), checked(count * sizeof(T)), owner).Memory;
}
