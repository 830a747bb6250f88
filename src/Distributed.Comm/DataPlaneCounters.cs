using System.Diagnostics;

namespace Distributed.Comm;

/// <summary>What one worker's data plane has moved since its process started: payload bytes sent and received, every transport.</summary>
public sealed class DataPlaneCounters
{
    long _sent, _received, _rejected;

    public long BytesSent => Interlocked.Read(ref _sent);
    public long BytesReceived => Interlocked.Read(ref _received);

    internal void Sent(long bytes) => Interlocked.Add(ref _sent, bytes);
    internal void Received(long bytes) => Interlocked.Add(ref _received, bytes);

    /// <summary>Chunks, connections and handshakes refused as malformed, unauthenticated or out of range.</summary>
    public long Rejected => Interlocked.Read(ref _rejected);
    internal void CountRejected() => Interlocked.Increment(ref _rejected);
}

/// <summary>
/// One process group's all-reduces: how many, their bytes, and the time at least one was in flight (overlapping ones,
/// such as gradient buckets reduced while backward runs, count once), from which a report derives bus bandwidth.
/// </summary>
public sealed class CollectiveCounters
{
    readonly object _gate = new();
    long _count, _bytes, _busyTicks, _busySince;
    int _inFlight;

    internal void Started(long bytes)
    {
        lock (_gate)
        {
            _count++;
            _bytes += bytes;
            if (_inFlight++ == 0) _busySince = Stopwatch.GetTimestamp();
        }
    }

    internal void Finished()
    {
        lock (_gate)
            if (--_inFlight == 0) _busyTicks += Stopwatch.GetTimestamp() - _busySince;
    }

    /// <summary>Totals so far (the time of one still in flight included).</summary>
    public (long AllReduces, long Bytes, TimeSpan Busy) Read()
    {
        lock (_gate)
        {
            long busy = _busyTicks + (_inFlight > 0 ? Stopwatch.GetTimestamp() - _busySince : 0);
            return (_count, _bytes, Stopwatch.GetElapsedTime(0, busy));
        }
    }
}

/// <summary>
/// Measures the one-way bandwidth of each rank's link to its ring neighbour, the capacity an all-reduce's bus
/// bandwidth is compared with: every rank sends a buffer to the next rank while receiving one from the previous
/// (the ring's pattern), best of a few rounds (the first also opens the connections).
/// </summary>
public static class LinkProbe
{
    /// <returns>bytes per second; 0 for a group of one</returns>
    public static async Task<double> MeasureAsync(IProcessGroup world, int bytes = 8 << 20, int rounds = 3, CancellationToken cancellationToken = default)
    {
        if (world.Size < 2) return 0;
        var send = new byte[bytes];
        var receive = new byte[bytes];
        int right = (world.Rank + 1) % world.Size, left = (world.Rank + world.Size - 1) % world.Size;
        double best = 0;
        for (int round = 0; round < rounds; round++)
        {
            long started = Stopwatch.GetTimestamp();
            await Task.WhenAll(world.SendAsync(right, send, cancellationToken), world.ReceiveAsync(left, receive, cancellationToken)).ConfigureAwait(false);
            best = Math.Max(best, bytes / Stopwatch.GetElapsedTime(started).TotalSeconds);
        }
        return best;
    }
}
