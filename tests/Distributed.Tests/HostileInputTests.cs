using System.Buffers.Binary;
using System.Net.Sockets;
using Distributed.Comm;
using Distributed.Comm.Protos;
using Google.Protobuf;
using Grpc.Core;
using Grpc.Net.Client;
using Xunit.Abstractions;

namespace Distributed.Tests;

/// <summary>
/// The data plane survives hostile and broken input: random and mutated frames, malformed handshakes, bytes that are
/// not HTTP/2, gRPC messages with absurd lengths, streams and sockets that never authenticate or never speak. Nothing
/// crashes, nothing reaches a collective, and the collectives running beside it end with exact results.
/// </summary>
public class HostileInputTests(ITestOutputHelper output)
{
    const int World = 4;

    /// <summary>A valid header of this test's world: rank 1 to rank 0, group 0 (all ranks), a collective op.</summary>
    static ChunkHeader Valid(Random random) => new(7, random.Next(1, World), 0, random.Next(0, 1000), random.Next(0, 100), random.Next(0, 1 << 20));

    static byte[] Encode(ChunkHeader header, int length)
    {
        var bytes = new byte[DataPlaneNode.BulkHeaderBytes];
        DataPlaneNode.WriteHeader(bytes, header, length);
        return bytes;
    }

    /// <summary>One field of a valid header replaced by an extreme or random value, or random bits flipped.</summary>
    static byte[] Mutate(byte[] valid, Random random)
    {
        var bytes = (byte[])valid.Clone();
        long[] extremes = [0, -1, 1, int.MaxValue, int.MinValue, long.MaxValue, long.MinValue, 1L << 40, -1_000_000, 63, 64, World];
        (int Offset, int Size)[] fields = [(0, 8), (8, 4), (12, 4), (16, 8), (24, 4), (28, 8), (36, 4), (40, 4)];
        var (offset, size) = fields[random.Next(fields.Length)];
        long value = random.Next(3) == 0 ? random.NextInt64() : extremes[random.Next(extremes.Length)];
        switch (random.Next(3))
        {
            case 0 when size == 8: BinaryPrimitives.WriteInt64LittleEndian(bytes.AsSpan(offset), value); break;
            case 0: BinaryPrimitives.WriteInt32LittleEndian(bytes.AsSpan(offset), (int)value); break;
            case 1: for (int i = 0, flips = random.Next(1, 8); i < flips; i++) bytes[random.Next(bytes.Length)] ^= (byte)(1 << random.Next(8)); break;
            default: random.NextBytes(bytes.AsSpan(offset, size)); break;
        }
        return bytes;
    }

    [Fact]
    public async Task TheFrameParserAndMailboxRejectRandomAndMutatedFramesWithoutHarm()
    {
        var counters = new DataPlaneCounters();
        var mailbox = new Mailbox(counters);
        mailbox.Reset(7, rank: 0, worldSize: World);
        mailbox.RegisterGroup(0, [0, 1, 2, 3]);
        mailbox.RegisterGroup(1, [0, 1]);
        var random = new Random(20261202);
        int inputs = 0, rejected = 0, delivered = 0;
        void Feed(byte[] header, int payloadBytes)
        {
            inputs++;
            ChunkHeader parsed;
            int length;
            try { parsed = DataPlaneNode.ReadHeader(header, out length); }
            catch (DataPlaneProtocolException) { rejected++; return; }
            try
            {
                mailbox.Deliver(parsed, new ReceivedChunk(new byte[Math.Min(length, payloadBytes)]));
                delivered++;
                // What was taken is something a collective of this world could ask for.
                Assert.InRange(parsed.SourceRank, 1, World - 1);
                Assert.InRange(parsed.Group, 0, Mailbox.MaxGroupId - 1);
                Assert.False(parsed.Group == 1 && parsed.SourceRank > 1, $"group 1 took a chunk of non-member {parsed.SourceRank}");
                Assert.True(parsed.OpId >= 0 || parsed.OpId <= ProcessGroup.PointToPointOpBase);
                Assert.True(parsed.Seq >= 0 && parsed.Offset >= 0);
            }
            catch (Exception e) when (e is StaleGenerationException or RejectedChunkException) { rejected++; }
        }
        for (int i = 0; i < 100_000; i++)
        {
            var header = new byte[DataPlaneNode.BulkHeaderBytes];
            random.NextBytes(header);
            if (i % 2 == 0) BinaryPrimitives.WriteInt64LittleEndian(header, 7);   // half in the right generation, to reach the later checks
            Feed(header, 16);
        }
        for (int i = 0; i < 100_000; i++) Feed(Mutate(Encode(Valid(random), 16), random), 16);
        output.WriteLine($"frame fuzz: {inputs} inputs, {rejected} rejected, {delivered} delivered (in range, waiting for a receive), 0 crashes");
        Assert.Equal(200_000, inputs);
        Assert.True(rejected > 150_000, $"only {rejected} of {inputs} rejected");
        Assert.InRange(counters.Rejected, 1, rejected);   // the mailbox counts what it refused (stale generations and bad lengths are refused before it)

        // A source that floods unclaimed chunks is refused more before it exhausts memory, and a real receive still works.
        var flood = Record.Exception(() =>
        {
            for (int op = 0; op <= Mailbox.MaxUnclaimedChunks + 1; op++) mailbox.Deliver(new ChunkHeader(7, 3, 0, 1_000_000 + op, 0, 0), new ReceivedChunk(new byte[1]));
        });
        Assert.IsType<RejectedChunkException>(flood);
        Assert.Contains("no receive has asked for", flood.Message);
        mailbox.Deliver(new ChunkHeader(7, 1, 1, 5_000_000, 0, 0), new ReceivedChunk(new byte[] { 42 }));
        using var received = await mailbox.ReceiveAsync(1, 1, 5_000_000, 0, TimeSpan.FromSeconds(5), CancellationToken.None);
        Assert.Equal(42, received.Payload.Span[0]);
    }

    /// <summary>Two nodes with a ring of all-reduces; node 1 is the target.</summary>
    sealed class Pair : IAsyncDisposable
    {
        public required DataPlaneNode[] Nodes;
        public required PeerLinks[] Links;
        public required ProcessGroup[] Groups;

        public static async Task<Pair> StartAsync(TransportKind transport)
        {
            var nodes = await Task.WhenAll(Enumerable.Range(0, 2).Select(_ => DataPlaneNode.StartAsync()));
            var endpoints = nodes.Select(x => x.Endpoint).ToArray();
            for (int r = 0; r < 2; r++) nodes[r].BeginGeneration(3, r, 2);
            var links = nodes.Select(x => new PeerLinks(x, 3, endpoints, transport)).ToArray();
            var options = new CollectiveOptions { Timeout = TimeSpan.FromSeconds(20), ChunkBytes = 4096, OneShotMaxBytes = 1024 };
            var groups = links.Select(l => new ProcessGroup(l, 0, [0, 1], options)).ToArray();
            return new Pair { Nodes = nodes, Links = links, Groups = groups };
        }

        /// <summary>All-reduces of several sizes, each checked against the exact sum.</summary>
        public async Task RunExactAllReducesAsync(int rounds)
        {
            for (int round = 0; round < rounds; round++)
                foreach (int length in new[] { 3, 1000, 20_000 })
                {
                    var buffers = Enumerable.Range(0, 2).Select(r => Enumerable.Range(0, length).Select(i => (float)(i % 97 + r * 1000 + round)).ToArray()).ToArray();
                    await Task.WhenAll(Groups.Select((g, r) => g.AllReduceAsync(buffers[r], ReduceOp.Sum)));
                    for (int i = 0; i < length; i++)
                    {
                        float expected = 2 * (i % 97) + 1000 + 2 * round;
                        Assert.Equal(expected, buffers[0][i]);
                        Assert.Equal(expected, buffers[1][i]);
                    }
                }
        }

        public async ValueTask DisposeAsync()
        {
            foreach (var l in Links) await l.DisposeAsync();
            foreach (var n in Nodes) await n.DisposeAsync();
        }
    }

    static async Task<int> SendRaw(int port, byte[] bytes)
    {
        using var socket = new Socket(SocketType.Stream, ProtocolType.Tcp);
        await socket.ConnectAsync("127.0.0.1", port);
        try { await socket.SendAsync(bytes, SocketFlags.None); } catch (SocketException) { }
        socket.Shutdown(SocketShutdown.Send);
        var sink = new byte[4096];
        int total = 0;
        using var quick = new CancellationTokenSource(TimeSpan.FromSeconds(5));
        try { while (await socket.ReceiveAsync(sink, SocketFlags.None, quick.Token) is int n and > 0) total += n; }
        catch (Exception e) when (e is SocketException or OperationCanceledException) { }
        return total;
    }

    [Theory]
    [InlineData(TransportKind.Tcp)]
    [InlineData(TransportKind.Grpc)]
    public async Task GarbageOnEveryPortLeavesTheCollectivesExact(TransportKind transport)
    {
        await using var pair = await Pair.StartAsync(transport);
        var target = pair.Nodes[1];
        target.HandshakeTimeout = TimeSpan.FromSeconds(1);
        await pair.RunExactAllReducesAsync(1);
        var random = new Random(7);
        int inputs = 0;

        // Peers that connect and never speak, on both ports, held open while everything else runs.
        var silent = new List<Socket>();
        foreach (int port in new[] { target.BulkPort, target.GrpcPort, target.BulkPort, target.GrpcPort })
        {
            var s = new Socket(SocketType.Stream, ProtocolType.Tcp);
            await s.ConnectAsync("127.0.0.1", port);
            silent.Add(s);
            inputs++;
        }

        // All-reduces run, checked, the whole time the attacks do.
        bool attacking = true;
        int collectiveRounds = 0;
        var collectives = Task.Run(async () =>
        {
            while (Volatile.Read(ref attacking)) { await pair.RunExactAllReducesAsync(1); collectiveRounds++; }
        });
        var attacks = new List<Task>();
        // Random bytes at the bulk port: none carries a link secret of this generation.
        for (int i = 0; i < 100; i++)
        {
            var bytes = new byte[random.Next(0, 200)];
            random.NextBytes(bytes);
            if (i % 3 == 0 && bytes.Length >= 4) BinaryPrimitives.WriteUInt32LittleEndian(bytes, DataPlaneNode.BulkMagic);   // the right magic, a guessed secret
            if (i % 3 == 1) bytes = [.. new byte[DataPlaneNode.BulkPreambleBytes], .. Encode(new ChunkHeader(3, 0, 0, 0, 0, 0), 4), 1, 2, 3, 4];
            attacks.Add(SendRaw(target.BulkPort, bytes));
            inputs++;
        }
        // Bytes that are not HTTP/2 at the gRPC port, and an HTTP/2 preface followed by garbage.
        for (int i = 0; i < 30; i++)
        {
            var bytes = new byte[random.Next(1, 300)];
            random.NextBytes(bytes);
            if (i % 2 == 0) bytes = [.. "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"u8.ToArray(), .. bytes];
            attacks.Add(SendRaw(target.GrpcPort, bytes));
            inputs++;
        }
        await Task.WhenAll(attacks);

        // Valid gRPC, hostile content: chunk streams without a link secret, with a wrong one, claiming rank 0's traffic.
        using var channel = GrpcChannel.ForAddress(target.Endpoint);
        var client = new DataPlane.DataPlaneClient(channel);
        for (int i = 0; i < 20; i++)
        {
            using var call = client.Exchange();
            var secret = new byte[DataPlaneNode.LinkSecretBytes];
            random.NextBytes(secret);
            try
            {
                if (i % 2 == 0) await call.RequestStream.WriteAsync(new TensorChunk { Generation = 3, SourceRank = 0, OpId = -2, Payload = ByteString.CopyFrom(secret) });
                await call.RequestStream.WriteAsync(new TensorChunk { Generation = 3, SourceRank = 0, Group = 0, OpId = 10_000 + i, Payload = ByteString.CopyFrom(1, 2, 3, 4) });
                await call.RequestStream.CompleteAsync();
            }
            catch (RpcException) { }   // the server refused the stream while we wrote
            var refused = await Assert.ThrowsAsync<RpcException>(() => call.ResponseAsync);
            Assert.Equal(StatusCode.PermissionDenied, refused.StatusCode);
            inputs++;
        }
        // A gRPC message whose length prefix claims 2 GiB.
        using (var http = new HttpClient(new SocketsHttpHandler()))
        {
            var request = new HttpRequestMessage(HttpMethod.Post, $"{target.Endpoint}/DataPlane/Exchange")
            {
                Version = new Version(2, 0), VersionPolicy = HttpVersionPolicy.RequestVersionExact,
                Content = new ByteArrayContent([0, 0x7F, 0xFF, 0xFF, 0xFF, 1, 2, 3]),
            };
            request.Content.Headers.ContentType = new System.Net.Http.Headers.MediaTypeHeaderValue("application/grpc");
            request.Headers.TryAddWithoutValidation("TE", "trailers");
            using var response = await http.SendAsync(request);
            await response.Content.ReadAsByteArrayAsync();
            var status = response.TrailingHeaders.TryGetValues("grpc-status", out var values) ? values.First()
                : response.Headers.TryGetValues("grpc-status", out var early) ? early.First() : "none";
            Assert.True(((int)StatusCode.ResourceExhausted).ToString() == status, $"HTTP {(int)response.StatusCode}, grpc-status {status}, headers {response.Headers}, trailers {response.TrailingHeaders}");
            inputs++;
        }

        Volatile.Write(ref attacking, false);
        await collectives;   // every all-reduce beside the attacks ended with the exact sums
        Assert.True(collectiveRounds >= 1, $"only {collectiveRounds} rounds of all-reduces ran beside the attacks");
        // The silent bulk connections were closed at the handshake deadline.
        foreach (var s in silent.Where((_, i) => i % 2 == 0))
        {
            using var quick = new CancellationTokenSource(TimeSpan.FromSeconds(10));
            Assert.Equal(0, await s.ReceiveAsync(new byte[1], SocketFlags.None, quick.Token));
        }
        foreach (var s in silent) s.Dispose();
        await pair.RunExactAllReducesAsync(2);
        output.WriteLine($"{transport}: {inputs} hostile inputs, {target.Counters.Rejected} rejections counted by the target, {collectiveRounds} rounds of all-reduces beside them exact, 0 crashes");
        Assert.True(target.Counters.Rejected >= 100, $"the target counted only {target.Counters.Rejected} rejections");
    }

    [Fact]
    public async Task HelloRefusesMalformedRequestsAndBoundsWhatItHandsOut()
    {
        await using var pair = await Pair.StartAsync(TransportKind.SharedMemory);
        await pair.RunExactAllReducesAsync(1);
        var target = pair.Nodes[1];
        using var channel = GrpcChannel.ForAddress(target.Endpoint);
        var client = new DataPlane.DataPlaneClient(channel);
        var random = new Random(11);
        int inputs = 0, accepted = 0, refused = 0, rings = 0;
        long[] generations = [3, 3, 2, 4, 0, -1, long.MaxValue];
        int[] sources = [0, 0, 1, 2, -1, int.MaxValue, int.MinValue];
        for (int i = 0; i < 1000; i++)
        {
            var request = new HelloRequest
            {
                Generation = generations[random.Next(generations.Length)],
                SourceRank = sources[random.Next(sources.Length)],
                WantSharedMemory = random.Next(2) == 0,
                HostId = random.Next(4) switch { 0 => DataPlaneNode.HostId, 1 => new string('x', random.Next(513, 4000)), _ => Guid.NewGuid().ToString() },
            };
            inputs++;
            try
            {
                var reply = await client.HelloAsync(request, deadline: DateTime.UtcNow.AddSeconds(10));
                accepted++;
                Assert.Equal(3, request.Generation);
                Assert.Equal(0, request.SourceRank);
                Assert.True(request.HostId.Length <= 512);
                Assert.Equal(DataPlaneNode.LinkSecretBytes, reply.LinkSecret.Length);
                if (reply.SharedMemoryPath.Length > 0) rings++;
            }
            catch (RpcException e)
            {
                refused++;
                Assert.Contains(e.StatusCode, new[] { StatusCode.FailedPrecondition, StatusCode.InvalidArgument, StatusCode.ResourceExhausted });
            }
        }
        output.WriteLine($"hello fuzz: {inputs} requests, {accepted} accepted, {refused} refused, {rings} rings opened, 0 crashes");
        Assert.InRange(accepted, 1, 7);   // a peer's handshakes per generation are bounded at 8 (the real rank 0 made one)
        Assert.Equal(inputs, accepted + refused);
        await pair.RunExactAllReducesAsync(2);
    }
}
