using System.IO.MemoryMappedFiles;
using System.Runtime.CompilerServices;

namespace Distributed.Comm;

/// <summary>
/// A single-producer, single-consumer byte ring in a memory-mapped file, one per (sender, receiver) pair on one host:
/// the sender copies a framed chunk in, the receiver copies it out, and no kernel call sits in between. Positions
/// are monotonically increasing 64-bit counters on separate cache lines; a frame is visible once the writer
/// publishes its new position. A reader with nothing to read spins for a moment, then sleeps on a futex doorbell
/// in the header that the writer rings: it wakes within microseconds, and an idle ring costs no CPU.
/// </summary>
public sealed class SharedMemoryRing : IDisposable
{
    const int HeaderBytes = 128;   // write position at 0, read position at 64
    readonly MemoryMappedFile _file;
    readonly MemoryMappedViewAccessor _view;
    readonly unsafe byte* _base;
    readonly long _capacity;

    unsafe SharedMemoryRing(string path, MemoryMappedFile file, long capacity)
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

    /// <summary>The receiver creates the ring (zeroed: both positions 0), its pages allocated.</summary>
    public static SharedMemoryRing Create(string path, long capacity)
    {
        using (var stream = new FileStream(path, FileMode.Create, FileAccess.ReadWrite)) stream.SetLength(HeaderBytes + capacity);
        var ring = new SharedMemoryRing(path, MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, HeaderBytes + capacity), capacity);
        ring.TouchPages(write: true);
        return ring;
    }

    public static SharedMemoryRing Open(string path)
    {
        long capacity = new FileInfo(path).Length - HeaderBytes;
        var ring = new SharedMemoryRing(path, MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0), capacity);
        ring.TouchPages(write: false);
        return ring;
    }

    /// <summary>
    /// Faults every page of the data area into this mapping now, not on the first pass of the traffic through it:
    /// a first touch (a tmpfs page allocated and zeroed, then mapped in each process) measured 2-3x the time of a
    /// warm ring on 256 KiB-4 MiB all-reduces. The creator writes (allocating the pages); the opener only reads.
    /// </summary>
    unsafe void TouchPages(bool write)
    {
        const int Page = 4096;
        byte* data = Data;
        for (long offset = 0; offset < _capacity; offset += Page)
        {
            if (write) data[offset] = 0;
            else _ = Volatile.Read(ref data[offset]);
        }
    }

    // Header: the writer's cache line holds its position and the reader's doorbell (a futex word the writer bumps
    // when the reader sleeps); the reader's line holds its position.
    unsafe ref long WritePosition => ref Unsafe.AsRef<long>(_base);
    unsafe int* Doorbell => (int*)(_base + 8);
    unsafe ref int ReaderSleeping => ref Unsafe.AsRef<int>(_base + 12);
    unsafe ref long ReadPosition => ref Unsafe.AsRef<long>(_base + 64);
    unsafe byte* Data => _base + HeaderBytes;

    /// <summary>Largest frame (header + payload) the ring accepts.</summary>
    public long MaxFrame => _capacity / 2;

    /// <summary>How long a waiting reader spins before it sleeps on the doorbell: a collective's next chunk usually comes sooner.</summary>
    static readonly long ReaderSpinTicks = System.Diagnostics.Stopwatch.Frequency / 20_000;   // 50 us

    /// <summary>
    /// Writes one frame (two parts, copied back to back). Completes synchronously when the ring has room, which is
    /// the usual case; otherwise waits for the reader asynchronously (no thread is held), at most <paramref name="timeout"/>.
    /// </summary>
    public ValueTask WriteAsync(ReadOnlyMemory<byte> header, ReadOnlyMemory<byte> payload, TimeSpan timeout, CancellationToken cancellationToken)
    {
        long length = Align(header.Length + payload.Length);
        if (length > MaxFrame) throw new ArgumentException($"frame of {length} bytes exceeds the ring's {MaxFrame}");
        long write = Volatile.Read(ref WritePosition);
        if (!HasRoom(write, length))
        {
            // A reader that is draining frees room within microseconds: spin that long before giving up the thread.
            var spin = new SpinWait();
            for (int i = 0; i < 30 && !HasRoom(write, length); i++) spin.SpinOnce(sleep1Threshold: -1);
            if (!HasRoom(write, length)) return WaitForRoomThenWrite(header, payload, write, length, timeout, cancellationToken);
        }
        Publish(write, header.Span, payload.Span, length);
        return ValueTask.CompletedTask;
    }

    async ValueTask WaitForRoomThenWrite(ReadOnlyMemory<byte> header, ReadOnlyMemory<byte> payload, long write, long length, TimeSpan timeout,
        CancellationToken cancellationToken)
    {
        var deadline = System.Diagnostics.Stopwatch.StartNew();
        while (!HasRoom(write, length))
        {
            if (deadline.Elapsed > timeout)
                throw new TimeoutException($"the reader of shared-memory ring {Path} freed no room for {timeout.TotalSeconds:0.#} s");
            await Task.Delay(1, cancellationToken).ConfigureAwait(false);
        }
        Publish(write, header.Span, payload.Span, length);
    }

    bool HasRoom(long write, long length) => write + length - Volatile.Read(ref ReadPosition) <= _capacity;

    void Publish(long write, ReadOnlySpan<byte> header, ReadOnlySpan<byte> payload, long length)
    {
        CopyIn(write, header);
        CopyIn(write + header.Length, payload);
        Volatile.Write(ref WritePosition, write + length);
        // Pairs with the fence in WaitForData: either the reader sees the new position, or we see it asleep.
        Interlocked.MemoryBarrier();
        if (Volatile.Read(ref ReaderSleeping) != 0) RingDoorbell();
    }

    unsafe void RingDoorbell()
    {
        Interlocked.Increment(ref Unsafe.AsRef<int>(Doorbell));
        if (Futex.Supported) Futex.WakeAll(Doorbell);
    }

    /// <summary>Wakes a reader sleeping on the doorbell (so that it sees its cancellation at once).</summary>
    public void WakeReader() => RingDoorbell();

    /// <summary>Waits for the next frame and copies its header into <paramref name="header"/>; returns the frame's position.</summary>
    public long ReadHeader(Span<byte> header, CancellationToken cancellationToken)
    {
        long frame = Volatile.Read(ref ReadPosition);
        if (Volatile.Read(ref WritePosition) == frame) WaitForData(frame, cancellationToken);
        CopyOut(frame, header);
        return frame;
    }

    /// <summary>The frame's payload where it lies in the ring, when it does not wrap around the ring's end; valid until <see cref="Release"/>.</summary>
    public unsafe bool TryPayloadInPlace(long frame, int headerLength, int length, out ReadOnlyMemory<byte> payload)
    {
        long offset = (frame + headerLength) % _capacity;
        payload = default;
        if (offset + length > _capacity) return false;
        payload = new NativeMemory<byte>(Data + offset, length, this).Memory;
        return true;
    }

    public void CopyPayload(long frame, int headerLength, Span<byte> target) => CopyOut(frame + headerLength, target);

    /// <summary>Gives the frame's bytes back to the writer.</summary>
    public void Release(long frame, int headerLength, int length) => Volatile.Write(ref ReadPosition, frame + Align(headerLength + length));

    /// <summary>Spins briefly (the next chunk of a collective in flight), then sleeps on the doorbell: an idle ring costs no CPU.</summary>
    unsafe void WaitForData(long read, CancellationToken cancellationToken)
    {
        long spinUntil = System.Diagnostics.Stopwatch.GetTimestamp() + ReaderSpinTicks;
        while (Volatile.Read(ref WritePosition) == read)
        {
            if (System.Diagnostics.Stopwatch.GetTimestamp() < spinUntil) { Thread.SpinWait(16); continue; }
            cancellationToken.ThrowIfCancellationRequested();
            int bell = Volatile.Read(ref Unsafe.AsRef<int>(Doorbell));
            Interlocked.Exchange(ref ReaderSleeping, 1);
            if (Volatile.Read(ref WritePosition) == read && !cancellationToken.IsCancellationRequested)
            {
                if (Futex.Supported) Futex.WaitWhile(Doorbell, bell, TimeSpan.FromMilliseconds(100));
                else Thread.Sleep(1);
            }
            Volatile.Write(ref ReaderSleeping, 0);
        }
    }

    static long Align(long n) => (n + 63) & ~63L;

    unsafe void CopyIn(long position, ReadOnlySpan<byte> source)
    {
        long offset = position % _capacity;
        int first = (int)Math.Min(source.Length, _capacity - offset);
        source[..first].CopyTo(new Span<byte>(Data + offset, first));
        source[first..].CopyTo(new Span<byte>(Data, source.Length - first));
    }

    unsafe void CopyOut(long position, Span<byte> target)
    {
        long offset = position % _capacity;
        int first = (int)Math.Min(target.Length, _capacity - offset);
        new ReadOnlySpan<byte>(Data + offset, first).CopyTo(target);
        new ReadOnlySpan<byte>(Data, target.Length - first).CopyTo(target[first..]);
    }

    public void Dispose()
    {
        _view.SafeMemoryMappedViewHandle.ReleasePointer();
        _view.Dispose();
        _file.Dispose();
    }
}
