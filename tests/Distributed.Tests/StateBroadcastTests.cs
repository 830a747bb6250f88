using Distributed.Comm;
using Distributed.Training;
using static TorchSharp.torch;

namespace Distributed.Tests;

/// <summary>
/// The initial-state broadcast and the byte access beneath it, with pieces far smaller than the real 256 MiB so a
/// small state already crosses many piece boundaries (and piece boundaries that split floats).
/// </summary>
public class StateBroadcastTests
{
    [Fact]
    public void SplitCoversLengthsBeyond2GiBInOrderedBoundedPieces()
    {
        long length = (5L << 30) + 7;
        var pieces = TensorBytes.Split(length, 256 << 20).ToList();
        Assert.Equal(21, pieces.Count);
        Assert.Equal((5L << 30, 7), pieces[^1]);
        Assert.All(pieces, p => Assert.InRange(p.Length, 1, 256 << 20));
        Assert.Equal(length, pieces.Sum(p => (long)p.Length));
        for (int i = 1; i < pieces.Count; i++) Assert.Equal(pieces[i - 1].Offset + pieces[i - 1].Length, pieces[i].Offset);
        Assert.Empty(TensorBytes.Split(0, 16));
        Assert.Throws<ArgumentOutOfRangeException>(() => TensorBytes.Split(10, 0).ToList());
    }

    [Fact]
    public void TensorBytesReachPastTwoGiBOfATensor()
    {
        // 4 GiB + 20 bytes that torch.empty does not touch: only the page written below becomes resident.
        long elements = (1L << 30) + 5;
        using var big = empty(elements, ScalarType.Float32);
        Assert.Throws<ArgumentException>(() => big.bytes.Length);   // TorchSharp's own Span stops at 2 GiB
        var bytes = TensorBytes.Of(big);
        Assert.Equal(elements * sizeof(float), bytes.Length);
        BitConverter.TryWriteBytes(bytes.Span(bytes.Length - 4, 4), 42.5f);
        Assert.Equal(42.5f, big[elements - 1].item<float>());
        Assert.Equal(42.5f, BitConverter.ToSingle(bytes.Memory(bytes.Length - 4, 4).Span));
        Assert.Throws<ArgumentOutOfRangeException>(() => bytes.Span(bytes.Length - 3, 4));
    }

    [Fact]
    public void TensorBytesRejectNonContiguousTensorsNamingThem()
    {
        using var matrix = zeros(4, 3);
        using var transposed = matrix.t();
        var error = Assert.Throws<ArgumentException>(() => TensorBytes.Of(transposed, "tensor 'w'"));
        Assert.Contains("tensor 'w' must be contiguous and on the CPU", error.Message);
    }

    static async Task<(PeerLinks[] Links, DataPlaneNode[] Nodes, ProcessGroup[] Groups)> StartAsync(int n, TransportKind transport)
    {
        var nodes = await Task.WhenAll(Enumerable.Range(0, n).Select(_ => DataPlaneNode.StartAsync()));
        var endpoints = nodes.Select(x => x.Endpoint).ToArray();
        for (int r = 0; r < n; r++) nodes[r].BeginGeneration(1, r, n);
        var links = nodes.Select(x => new PeerLinks(x, 1, endpoints, transport)).ToArray();
        var options = new CollectiveOptions { ChunkBytes = 1024, Timeout = TimeSpan.FromSeconds(10) };
        return (links, nodes, links.Select(l => new ProcessGroup(l, 0, Enumerable.Range(0, n).ToArray(), options)).ToArray());
    }

    static async Task StopAsync(PeerLinks[] links, DataPlaneNode[] nodes)
    {
        foreach (var l in links) await l.DisposeAsync();
        foreach (var n in nodes) await n.DisposeAsync();
    }

    // A state like a model's: float tensors of several sizes (one empty), and an int64 one.
    static Tensor[] State(int seed)
    {
        manual_seed(seed);
        return [randn(100_003), randn(0), randn(7, 13), randint(long.MaxValue, new long[] { 1000 }, dtype: ScalarType.Int64), randn(1)];
    }

    [Theory]
    [InlineData(2, TransportKind.SharedMemory, 0)]
    [InlineData(3, TransportKind.Tcp, 2)]
    public async Task EveryRankEndsWithTheRootsStateAndCounters(int n, TransportKind transport, int root)
    {
        var (links, nodes, groups) = await StartAsync(n, transport);
        var states = Enumerable.Range(0, n).Select(State).ToArray();
        try
        {
            var expected = states[root].Select(t => t.clone()).ToArray();
            var counters = Enumerable.Range(0, n).Select(r => new long[] { 100 + r, 200 + r }).ToArray();
            var bytes = states.Select(s => s.Select(t => TensorBytes.Of(t)).ToList()).ToArray();
            // 4099 bytes: every tensor of more than a few elements goes in several pieces, most of them split a float.
            var hashes = await Task.WhenAll(groups.Select((g, r) => StateBroadcast.RunAsync(g, counters[r], bytes[r], root, pieceBytes: 4099)));
            for (int r = 0; r < n; r++)
            {
                Assert.Equal([100 + root, 200 + root], counters[r]);
                for (int t = 0; t < expected.Length; t++) Assert.True(expected[t].bytes.SequenceEqual(states[r][t].bytes), $"rank {r} tensor {t} differs from the root's");
                Assert.Equal(hashes[root], hashes[r]);
            }
            // The hash covers the state: the same bytes hashed in other pieces give it, one changed element does not.
            Assert.Equal(hashes[root], StateBroadcast.Sha256(counters[root], bytes[root], pieceBytes: 1 << 20));
            using (var last = states[root][0].narrow(0, 100_002, 1)) last.add_(1);
            Assert.NotEqual(hashes[root], StateBroadcast.Sha256(counters[root], bytes[root]));
            foreach (var t in expected) t.Dispose();
        }
        finally
        {
            foreach (var t in states.SelectMany(s => s)) t.Dispose();
            await StopAsync(links, nodes);
        }
    }

    [Fact]
    public async Task ARankWithAnotherStateSizeFailsNamingBothSizes()
    {
        var (links, nodes, groups) = await StartAsync(2, TransportKind.Tcp);
        using var mine = zeros(10);
        using var larger = zeros(12);
        try
        {
            using var deadline = new CancellationTokenSource(TimeSpan.FromSeconds(30));
            var root = StateBroadcast.RunAsync(groups[0], [1], [TensorBytes.Of(mine)], cancellationToken: deadline.Token);
            var error = await Assert.ThrowsAsync<InvalidOperationException>(() =>
                StateBroadcast.RunAsync(groups[1], [0], [TensorBytes.Of(larger)], cancellationToken: deadline.Token));
            Assert.Contains("rank 1's state is 1 tensors of 48 bytes, rank 0's 1 tensors of 40 bytes", error.Message);
            await root.ContinueWith(_ => { });   // the root only sends: whatever it ends with is not this test's concern
        }
        finally
        {
            await StopAsync(links, nodes);
        }
    }
}
