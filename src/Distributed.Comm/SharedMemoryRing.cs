using System.IO.MemoryMappedFiles;
using System.Runtime.CompilerServices;

namespace Distributed.Comm;

/// <summary>
/// A single-producer, single-consumer byte ring in a memory-mapped file, one per (sender, receiver) pair on one host:
/// the sender copies a framed chunk in, the receiver copies it out, and no kernel call sits in between. Positions
/// are monotonically increasing 64-bit counters on separate cache lines; a frame is visible once the writer
/// publishes its new position.
/// </summary>
public sealed unsafe class SharedMemoryRing : IDisposable
{
    const int HeaderBytes = 128;   // write position at 0, read position at 64
    readonly MemoryMappedFile _file;
    readonly MemoryMappedViewAccessor _view;
    readonly byte* _base;
    readonly long _capacity;

    SharedMemoryRing(string path, MemoryMappedFile file, long capacity)
    {
        Path = path;
        _file = file;
        _capacity = capacity;
        _view = file.CreateViewAccessor(0, HeaderBytes + capacity);
        byte* pointer = null;
        _view.SafeMemoryMappedViewHandle.AcquirePointer(ref pointer);
        _base = pointer + _view.PointerOffset;
    }

    public string Path { get; }

    /// <summary>The receiver creates the ring (zeroed: both positions 0).</summary>
    public static SharedMemoryRing Create(string path, long capacity)
    {
        using (var stream = new FileStream(path, FileMode.Create, FileAccess.ReadWrite)) stream.SetLength(HeaderBytes + capacity);
        return new SharedMemoryRing(path, MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, HeaderBytes + capacity), capacity);
    }

    public static SharedMemoryRing Open(string path)
    {
        long capacity = new FileInfo(path).Length - HeaderBytes;
        return new SharedMemoryRing(path, MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0), capacity);
    }

    ref long WritePosition => ref Unsafe.AsRef<long>(_base);
    ref long ReadPosition => ref Unsafe.AsRef<long>(_base + 64);
    byte* Data => _base + HeaderBytes;

    /// <summary>Largest frame (header + payload) the ring accepts.</summary>
    public long MaxFrame => _capacity / 2;

    /// <summary>Writes one frame (two parts, copied back to back); waits for room until the deadline.</summary>
    public void Write(ReadOnlySpan<byte> header, ReadOnlySpan<byte> payload, CancellationToken cancellationToken)
    {
        long length = Align(header.Length + payload.Length);
        if (length > MaxFrame) throw new ArgumentException($"frame of {length} bytes exceeds the ring's {MaxFrame}");
        long write = Volatile.Read(ref WritePosition);
        var wait = new Backoff();
        while (write + length - Volatile.Read(ref ReadPosition) > _capacity) wait.Pause(cancellationToken);
        CopyIn(write, header);
        CopyIn(write + header.Length, payload);
        Volatile.Write(ref WritePosition, write + length);
    }

    /// <summary>Waits for the next frame; copies its header into <paramref name="header"/> and its payload via <paramref name="payload"/>.</summary>
    public void Read(Span<byte> header, Func<int, Memory<byte>> payloadBuffer, Func<ReadOnlySpan<byte>, int> payloadLength, CancellationToken cancellationToken)
    {
        long read = Volatile.Read(ref ReadPosition);
        var wait = new Backoff();
        while (Volatile.Read(ref WritePosition) == read) wait.Pause(cancellationToken);
        CopyOut(read, header);
        int length = payloadLength(header);
        var target = payloadBuffer(length);
        CopyOut(read + header.Length, target.Span[..length]);
        Volatile.Write(ref ReadPosition, read + Align(header.Length + length));
    }

    static long Align(long n) => (n + 63) & ~63L;

    void CopyIn(long position, ReadOnlySpan<byte> source)
    {
        long offset = position % _capacity;
        int first = (int)Math.Min(source.Length, _capacity - offset);
        source[..first].CopyTo(new Span<byte>(Data + offset, first));
        source[first..].CopyTo(new Span<byte>(Data, source.Length - first));
    }

    void CopyOut(long position, Span<byte> target)
    {
        long offset = position % _capacity;
        int first = (int)Math.Min(target.Length, _capacity - offset);
        new ReadOnlySpan<byte>(Data + offset, first).CopyTo(target);
        new ReadOnlySpan<byte>(Data, target.Length - first).CopyTo(target[first..]);
    }

    /// <summary>Spins briefly (a transfer in flight), then yields, then sleeps 1 ms (an idle ring costs no CPU).</summary>
    struct Backoff
    {
        int _count;

        public void Pause(CancellationToken cancellationToken)
        {
            _count++;
            if (_count < 64) Thread.SpinWait(20);
            else if (_count < 2048) Thread.Yield();
            else
            {
                cancellationToken.ThrowIfCancellationRequested();
                Thread.Sleep(1);
            }
            if ((_count & 255) == 0) cancellationToken.ThrowIfCancellationRequested();
        }
    }

    public void Dispose()
    {
        _view.SafeMemoryMappedViewHandle.ReleasePointer();
        _view.Dispose();
        _file.Dispose();
    }
}
