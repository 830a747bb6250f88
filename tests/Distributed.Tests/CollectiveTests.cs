using System.Diagnostics;
using System.Runtime.InteropServices;
using Distributed.Comm;

namespace Distributed.Tests;

/// <summary>
/// Collectives between data-plane nodes over real loopback sockets (gRPC streams or raw TCP), several nodes per
/// test process. Process-level kills are covered by the cluster tests.
/// </summary>
public class CollectiveTests
{
    sealed class World : IAsyncDisposable
    {
        public required DataPlaneNode[] Nodes;
        public required PeerLinks[] Links;
        public required ProcessGroup[] Groups;

        public static async Task<World> StartAsync(int n, TransportKind transport, CollectiveOptions? options = null, long generation = 1)
        {
            var nodes = await Task.WhenAll(Enumerable.Range(0, n).Select(_ => DataPlaneNode.StartAsync()));
            var endpoints = nodes.Select(x => x.Endpoint).ToArray();
            for (int r = 0; r < n; r++) nodes[r].BeginGeneration(generation, r, n);
            var links = nodes.Select(x => new PeerLinks(x, generation, endpoints, transport)).ToArray();
            var groups = links.Select(l => new ProcessGroup(l, 0, Enumerable.Range(0, n).ToArray(), options)).ToArray();
            return new World { Nodes = nodes, Links = links, Groups = groups };
        }

        public async ValueTask DisposeAsync()
        {
            foreach (var l in Links) await l.DisposeAsync();
            foreach (var n in Nodes) await n.DisposeAsync();
        }
    }

    static float[] Data(int rank, int length) => Enumerable.Range(0, length).Select(i => (float)((i * 7 + rank * 13) % 101) / 8 - 3).ToArray();

    public static IEnumerable<object[]> Cases() =>
        from n in new[] { 2, 3, 4 }
        from transport in new[] { TransportKind.Grpc, TransportKind.Tcp, TransportKind.SharedMemory }
        select new object[] { n, transport };

    [Theory]
    [MemberData(nameof(Cases))]
    public async Task AllReduceMatchesADirectSum(int n, TransportKind transport)
    {
        // Small chunks make even modest buffers span many pipelined chunks per segment; the sizes cross the
        // one-shot threshold, so both algorithms run.
        await using var world = await World.StartAsync(n, transport, new CollectiveOptions { ChunkBytes = 4096, OneShotMaxBytes = 4 * 1001 });
        foreach (int length in new[] { 0, 1, n - 1, 7, 1001, (1 << 16) + 3 })
        {
            foreach (var op in new[] { ReduceOp.Sum, ReduceOp.Mean })
            {
                var buffers = Enumerable.Range(0, n).Select(r => Data(r, length)).ToArray();
                var expected = Enumerable.Range(0, length).Select(i => Enumerable.Range(0, n).Sum(r => (double)buffers[r][i]) / (op == ReduceOp.Mean ? n : 1)).ToArray();
                await Task.WhenAll(world.Groups.Select((g, r) => g.AllReduceAsync(buffers[r], op)));
                for (int r = 0; r < n; r++)
                {
                    for (int i = 0; i < length; i++) Assert.Equal(expected[i], buffers[r][i], 4);
                    Assert.Equal(buffers[0], buffers[r]);   // every rank ends with the same bits
                }
            }
        }
    }

    /// <summary>
    /// Gradient buckets start while backward runs: several all-reduces of both algorithms are in flight on one group
    /// at once. Each ends with the exact sum on every rank, and each algorithm gives the same bits whichever
    /// transport carries it.
    /// </summary>
    [Theory]
    [InlineData(2)]
    [InlineData(3)]
    public async Task ConcurrentAllReducesOfBothAlgorithmsGiveTheSameBitsOnEveryTransport(int n)
    {
        int[] lengths = [1, 3000, 20_000, 5, 70_001, 257];
        var options = new CollectiveOptions { ChunkBytes = 8192, OneShotMaxBytes = 16 << 10 };
        float[][]? reference = null;
        foreach (var transport in new[] { TransportKind.SharedMemory, TransportKind.Tcp, TransportKind.Grpc })
        {
            await using var world = await World.StartAsync(n, transport, options);
            var buffers = Enumerable.Range(0, n).Select(r => lengths.Select((length, k) => Data(r + 10 * k, length)).ToArray()).ToArray();
            // Every rank issues the same collectives in the same order, without waiting for one before the next.
            await Task.WhenAll(world.Groups.Select((g, r) => Task.WhenAll(buffers[r].Select(b => g.AllReduceAsync(b, ReduceOp.Mean)))));
            for (int k = 0; k < lengths.Length; k++)
            {
                var inputs = Enumerable.Range(0, n).Select(r => Data(r + 10 * k, lengths[k])).ToArray();
                var expected = Enumerable.Range(0, lengths[k]).Select(i => inputs.Sum(x => (double)x[i]) / n).ToArray();
                for (int r = 0; r < n; r++)
                {
                    Assert.Equal(buffers[0][k], buffers[r][k]);
                    for (int i = 0; i < lengths[k]; i += 97) Assert.Equal(expected[i], buffers[r][k][i], 4);
                }
            }
            reference ??= buffers[0];
            for (int k = 0; k < lengths.Length; k++) Assert.Equal(reference[k], buffers[0][k]);
        }
    }

    /// <summary>
    /// ZeRO-1's collectives: in place over uneven segments (one empty). The reduced segment holds the same bits the
    /// ring all-reduce gives, and the all-gather then leaves every rank with the whole all-reduced buffer.
    /// </summary>
    [Theory]
    [MemberData(nameof(Cases))]
    public async Task InPlaceReduceScatterAndAllGatherOverUnevenSegmentsEqualTheRingAllReduce(int n, TransportKind transport)
    {
        await using var world = await World.StartAsync(n, transport, new CollectiveOptions { ChunkBytes = 1024, OneShotMaxBytes = 0 });
        var g = world.Groups;
        int total = 5000;
        // Rank 0 owns nothing, the last rank the most (whole parameters dealt unevenly).
        var cuts = Enumerable.Range(0, n + 1).Select(i => i <= 1 ? 0 : total * (i - 1) * (i - 1) / ((n - 1) * (n - 1))).ToArray();
        var segments = Enumerable.Range(0, n).Select(i => (cuts[i], cuts[i + 1] - cuts[i])).ToArray();
        var reduced = Enumerable.Range(0, n).Select(r => Data(r, total)).ToArray();
        var expected = Enumerable.Range(0, n).Select(r => Data(r, total)).ToArray();
        await Task.WhenAll(g.Select((x, r) => x.AllReduceAsync(expected[r], ReduceOp.Mean)));
        await Task.WhenAll(g.Select((x, r) => x.ReduceScatterAsync(reduced[r], segments, ReduceOp.Mean)));
        for (int r = 0; r < n; r++)
            Assert.Equal(expected[r].AsSpan(segments[r].Item1, segments[r].Item2).ToArray(), reduced[r].AsSpan(segments[r].Item1, segments[r].Item2).ToArray());
        await Task.WhenAll(g.Select((x, r) => x.AllGatherAsync(reduced[r], segments)));
        Assert.All(reduced, x => Assert.Equal(expected[0], x));

        var gap = await Assert.ThrowsAsync<ArgumentException>(() => g[0].ReduceScatterAsync(new float[total], [.. segments.Select(s => (s.Item1 + 1, s.Item2))], ReduceOp.Sum));
        Assert.Contains("tile the buffer", gap.Message);
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public async Task AllGatherReduceScatterBroadcastSendReceiveAndBarrier(int n, TransportKind transport)
    {
        await using var world = await World.StartAsync(n, transport, new CollectiveOptions { ChunkBytes = 1024 });
        var g = world.Groups;

        // all-gather: rank-ordered concatenation
        var gathered = Enumerable.Range(0, n).Select(_ => new float[n * 300]).ToArray();
        await Task.WhenAll(g.Select((x, r) => x.AllGatherAsync(Data(r, 300), gathered[r])));
        var expectedGather = Enumerable.Range(0, n).SelectMany(r => Data(r, 300)).ToArray();
        Assert.All(gathered, x => Assert.Equal(expectedGather, x));

        // reduce-scatter: member r gets segment r of the sum, sizes not divisible by n
        int total = 1000 * n + 1;
        var outputs = Enumerable.Range(0, n).Select(r => new float[ProcessGroup.Segment(total, n, r).Length]).ToArray();
        await Task.WhenAll(g.Select((x, r) => x.ReduceScatterAsync(Data(r, total), outputs[r], ReduceOp.Sum)));
        for (int r = 0; r < n; r++)
        {
            var (start, length) = ProcessGroup.Segment(total, n, r);
            for (int i = 0; i < length; i++) Assert.Equal(Enumerable.Range(0, n).Sum(q => (double)Data(q, total)[start + i]), outputs[r][i], 4);
        }

        // broadcast from the last rank, larger than one chunk
        var payloads = Enumerable.Range(0, n).Select(r => r == n - 1 ? Enumerable.Range(0, 5000).Select(i => (byte)(i * 31)).ToArray() : new byte[5000]).ToArray();
        await Task.WhenAll(g.Select((x, r) => x.BroadcastAsync(payloads[r], root: n - 1)));
        Assert.All(payloads, p => Assert.Equal(payloads[n - 1], p));

        // send/receive between two ranks only, twice in a row (ordering by pair counters)
        var first = new byte[3000]; var second = new byte[10];
        await Task.WhenAll(
            g[0].SendAsync(n - 1, Enumerable.Repeat((byte)7, 3000).ToArray()).ContinueWith(_ => g[0].SendAsync(n - 1, new byte[10] { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 })).Unwrap(),
            g[n - 1].ReceiveAsync(0, first).ContinueWith(_ => g[n - 1].ReceiveAsync(0, second)).Unwrap());
        Assert.All(first, b => Assert.Equal(7, b));
        Assert.Equal(new byte[] { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 }, second);

        await Task.WhenAll(g.Select(x => x.BarrierAsync()));
    }

    [Theory]
    [InlineData(TransportKind.Grpc)]
    [InlineData(TransportKind.Tcp)]
    [InlineData(TransportKind.SharedMemory)]
    public async Task ADeadPeerFailsTheCollectiveWithItsRankWithinTheDeadline(TransportKind transport)
    {
        var timeout = TimeSpan.FromSeconds(3);
        await using var world = await World.StartAsync(3, transport, new CollectiveOptions { ChunkBytes = 4096, Timeout = timeout });
        // Rank 2 never joins and its server goes away: ranks 0 and 1 must fail naming rank 2, not hang.
        await world.Links[2].DisposeAsync();
        await world.Nodes[2].DisposeAsync();
        var clock = Stopwatch.StartNew();
        var results = await Task.WhenAll(world.Groups.Take(2).Select(async g =>
            await Record.ExceptionAsync(() => g.AllReduceAsync(Data(g.Rank, 100_000), ReduceOp.Sum))));
        Assert.All(results, e =>
        {
            var failure = Assert.IsType<PeerFailedException>(e);
            Assert.Equal(2, failure.Rank);
            Assert.Contains("rank 2", failure.Message);
        });
        Assert.True(clock.Elapsed < timeout + TimeSpan.FromSeconds(3), $"took {clock.Elapsed}");
    }

    [Theory]
    [InlineData(2, TransportKind.SharedMemory)]
    [InlineData(3, TransportKind.Tcp)]
    [InlineData(4, TransportKind.Grpc)]
    public async Task Bf16CompressedAllReduceIsCloseToExactAndIdenticalOnEveryRank(int n, TransportKind transport)
    {
        await using var world = await World.StartAsync(n, transport, new CollectiveOptions { ChunkBytes = 4096, Compression = Compression.BFloat16 });
        int length = 50_001;
        // Values with full float32 mantissas, so bfloat16 really has to round.
        var buffers = Enumerable.Range(0, n).Select(r => Enumerable.Range(0, length).Select(i => 1.5f + MathF.Sin(i * 0.37f + r)).ToArray()).ToArray();
        var exact = Enumerable.Range(0, length).Select(i => Enumerable.Range(0, n).Sum(r => (double)buffers[r][i]) / n).ToArray();
        await Task.WhenAll(world.Groups.Select((g, r) => g.AllReduceAsync(buffers[r], ReduceOp.Mean)));
        for (int r = 0; r < n; r++) Assert.Equal(buffers[0], buffers[r]);   // lossy, but the same bits everywhere
        double worst = Enumerable.Range(0, length).Max(i => Math.Abs(buffers[0][i] - exact[i]) / Math.Max(1e-3, Math.Abs(exact[i])));
        Assert.InRange(worst, 1e-9, 0.05);   // bfloat16 keeps 8 bits of mantissa; (n-1) roundings on the way
    }

    [Fact]
    public async Task TrafficOfAnotherGenerationIsRejected()
    {
        await using var world = await World.StartAsync(2, TransportKind.Grpc, new CollectiveOptions { Timeout = TimeSpan.FromSeconds(2) });
        world.Nodes[1].BeginGeneration(2, 1, 2);   // rank 1 moved on to generation 2; rank 0 still sends as generation 1
        var error = await Record.ExceptionAsync(() => world.Groups[0].AllReduceAsync(new float[10], ReduceOp.Sum));
        var failure = Assert.IsType<PeerFailedException>(error);
        Assert.Equal(1, failure.Rank);
        Assert.Contains("generation", failure.Message);
    }
}
