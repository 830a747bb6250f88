using System.Buffers;
using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace Distributed.Comm;

/// <summary>
/// Which path carries the bytes of collectives: gRPC streams; raw TCP negotiated over gRPC; or shared-memory rings
/// negotiated over gRPC between workers on one host (raw TCP to workers elsewhere).
/// </summary>
public enum TransportKind { Grpc, Tcp, SharedMemory }

/// <summary>
/// One worker's data-plane endpoint: a Kestrel gRPC server (HTTP/2, port 0 by default) and a raw-TCP bulk listener,
/// both feeding one <see cref="Mailbox"/>. Outgoing connections are created per generation by <see cref="ProcessGroup"/>s.
/// </summary>
public sealed class DataPlaneNode : IAsyncDisposable
{
    internal const int MaxMessageBytes = 64 << 20;
    internal const int BulkHeaderBytes = 44;

    readonly WebApplication _app;
    readonly TcpListener _bulkListener;
    readonly CancellationTokenSource _stopping = new();
    readonly List<Socket> _acceptedSockets = [];
    readonly ILogger _logger;
    readonly Task _acceptLoop;
    readonly List<(SharedMemoryRing Ring, CancellationTokenSource Stop, Thread Reader)> _inboundRings = [];
    const long RingCapacity = 32 << 20;

    DataPlaneNode(WebApplication app, TcpListener bulkListener, string host, ILogger logger)
    {
        _app = app;
        _bulkListener = bulkListener;
        _logger = logger;
        Host = host;
        Mailbox = new Mailbox(Counters);
        var addresses = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses;
        GrpcPort = new Uri(addresses.First()).Port;
        BulkPort = ((IPEndPoint)bulkListener.LocalEndpoint).Port;
        _acceptLoop = AcceptBulkConnectionsAsync();
    }

    public Mailbox Mailbox { get; }

    /// <summary>Bytes this worker's data plane moved (for its reports).</summary>
    public DataPlaneCounters Counters { get; } = new();

    /// <summary>Identifies this machine, so peers can tell whether shared memory reaches us.</summary>
    public static string HostId { get; } = ReadHostId();

    static string ReadHostId()
    {
        const string bootId = "/proc/sys/kernel/random/boot_id";
        return Environment.MachineName + ":" + (File.Exists(bootId) ? File.ReadAllText(bootId).Trim() : Guid.NewGuid().ToString());
    }

    /// <summary>This worker's global rank in the current generation (-1 before it has one).</summary>
    public int Rank { get; private set; } = -1;

    public string Host { get; }
    public int GrpcPort { get; }
    public int BulkPort { get; }

    /// <summary>The address peers dial: http://host:port.</summary>
    public string Endpoint => $"http://{Host}:{GrpcPort}";

    /// <summary>Starts the servers. <paramref name="bindAddress"/> 127.0.0.1 on one host, 0.0.0.0 in a cluster.</summary>
    public static async Task<DataPlaneNode> StartAsync(string bindAddress = "127.0.0.1", int port = 0, string? advertisedHost = null,
        ILoggerFactory? loggerFactory = null, CancellationToken cancellationToken = default)
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        var ip = IPAddress.Parse(bindAddress);
        builder.WebHost.ConfigureKestrel(kestrel =>
        {
            kestrel.Listen(ip, port, listen => listen.Protocols = HttpProtocols.Http2);
            // Large windows and frames keep multi-MiB chunks flowing (measured in ../shared/TOOLCHAIN.md).
            kestrel.Limits.Http2.InitialConnectionWindowSize = 64 << 20;
            kestrel.Limits.Http2.InitialStreamWindowSize = 64 << 20;
            kestrel.Limits.Http2.MaxFrameSize = (1 << 20) - 1;
            kestrel.Limits.MaxRequestBodySize = null;
        });
        builder.Services.AddGrpc(options =>
        {
            options.MaxReceiveMessageSize = MaxMessageBytes;
            options.MaxSendMessageSize = MaxMessageBytes;
        });
        DataPlaneNode? node = null;
        builder.Services.AddSingleton(_ => node!);
        var app = builder.Build();
        app.MapGrpcService<DataPlaneService>();
        await app.StartAsync(cancellationToken).ConfigureAwait(false);

        var listener = new TcpListener(ip, 0);
        listener.Start();
        var logger = (loggerFactory ?? Microsoft.Extensions.Logging.Abstractions.NullLoggerFactory.Instance).CreateLogger<DataPlaneNode>();
        node = new DataPlaneNode(app, listener, advertisedHost ?? (bindAddress == "0.0.0.0" ? Dns.GetHostName() : bindAddress), logger);
        return node;
    }

    /// <summary>Enters a generation with a rank: traffic of every other generation is rejected from now on.</summary>
    public void BeginGeneration(long generation, int rank)
    {
        Rank = rank;
        Mailbox.Reset(generation);
        CloseInboundRings();
    }

    /// <summary>Creates the ring a peer on this host writes into, and a thread that drains it into the mailbox.</summary>
    internal string OpenInboundRing(int sourceRank, long generation)
    {
        string directory = Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath();
        string path = Path.Combine(directory, $"dtrain-{Environment.ProcessId}-{Guid.NewGuid():N}-g{generation}-from{sourceRank}");
        var ring = SharedMemoryRing.Create(path, RingCapacity);
        var stop = CancellationTokenSource.CreateLinkedTokenSource(_stopping.Token);
        var reader = new Thread(() => DrainRing(ring, stop.Token)) { IsBackground = true, Name = $"shm-from-{sourceRank}" };
        lock (_inboundRings) _inboundRings.Add((ring, stop, reader));
        reader.Start();
        return path;
    }

    void DrainRing(SharedMemoryRing ring, CancellationToken stop)
    {
        var header = new byte[BulkHeaderBytes];
        try
        {
            while (true)
            {
                byte[]? payload = null;
                ring.Read(header, length => payload = ArrayPool<byte>.Shared.Rent(Math.Max(length, 1)),
                    h => BinaryPrimitives.ReadInt32LittleEndian(h[36..]), stop);
                var chunkHeader = ReadHeader(header, out int length);
                try { Deliver(chunkHeader, new ReceivedChunk(payload.AsMemory(0, length), payload)); }
                catch (StaleGenerationException e) { _logger.LogWarning("{Message}", e.Message); }
            }
        }
        catch (OperationCanceledException) { }
    }

    void CloseInboundRings()
    {
        lock (_inboundRings)
        {
            foreach (var (ring, stop, _) in _inboundRings)
            {
                stop.Cancel();
                ring.WakeReader();
            }
            foreach (var (ring, stop, reader) in _inboundRings)
            {
                File.Delete(ring.Path);
                // Unmapping a ring its reader still touches would crash the process: a reader that does not stop in
                // time (a starved machine) keeps its mapping, which costs memory, not correctness.
                if (reader.Join(TimeSpan.FromSeconds(10))) ring.Dispose();
                else _logger.LogWarning("The reader of shared-memory ring {Path} did not stop within 10 s; its mapping stays", ring.Path);
                stop.Dispose();
            }
            _inboundRings.Clear();
        }
    }

    internal void Deliver(ChunkHeader header, ReceivedChunk chunk)
    {
        if (header.OpId == ProcessGroup.LivenessOpId) { chunk.Dispose(); return; }   // only tells the server who is on the stream
        if (header.OpId == ProcessGroup.AbortOpId)
        {
            int failed = BinaryPrimitives.ReadInt32LittleEndian(chunk.Payload.Span);
            string reason = System.Text.Encoding.UTF8.GetString(chunk.Payload.Span[4..]);
            chunk.Dispose();
            if (header.Generation == Mailbox.Generation)
                Mailbox.Abort(new PeerFailedException(failed, $"rank {failed} failed: {reason} (reported by rank {header.SourceRank})"));
            return;
        }
        Mailbox.Deliver(header, chunk);
    }

    internal void PeerStreamBroke(int rank, Exception e)
    {
        _logger.LogDebug("Stream from rank {Rank} broke: {Error}", rank, e.Message);
        Mailbox.FailPeer(rank, new PeerFailedException(rank, $"rank {rank}'s connection broke: {e.Message}", e));
    }

    async Task AcceptBulkConnectionsAsync()
    {
        try
        {
            while (!_stopping.IsCancellationRequested)
            {
                var socket = await _bulkListener.AcceptSocketAsync(_stopping.Token).ConfigureAwait(false);
                socket.NoDelay = true;
                lock (_acceptedSockets) _acceptedSockets.Add(socket);
                _ = ReadBulkConnectionAsync(socket);
            }
        }
        catch (Exception) when (_stopping.IsCancellationRequested) { }
        catch (SocketException) { }
    }

    /// <summary>Frames: a 44-byte header (generation, source, group, op, seq, offset, length) then the payload.</summary>
    async Task ReadBulkConnectionAsync(Socket socket)
    {
        int? source = null;
        var headerBytes = new byte[BulkHeaderBytes];
        try
        {
            await using var stream = new NetworkStream(socket, ownsSocket: true);
            while (true)
            {
                await stream.ReadExactlyAsync(headerBytes, _stopping.Token).ConfigureAwait(false);
                var header = ReadHeader(headerBytes, out int length);
                source = header.SourceRank;
                byte[] payload = ArrayPool<byte>.Shared.Rent(Math.Max(length, 1));
                await stream.ReadExactlyAsync(payload.AsMemory(0, length), _stopping.Token).ConfigureAwait(false);
                try
                {
                    Deliver(header, new ReceivedChunk(payload.AsMemory(0, length), payload));
                }
                catch (StaleGenerationException e)
                {
                    // Closing the connection tells the sender: its next write fails.
                    _logger.LogWarning("{Message}", e.Message);
                    return;
                }
            }
        }
        catch (Exception e) when (!_stopping.IsCancellationRequested && source is int rank)
        {
            PeerStreamBroke(rank, e);
        }
        catch (Exception) { }
    }

    internal static void WriteHeader(Span<byte> span, ChunkHeader header, int length)
    {
        BinaryPrimitives.WriteInt64LittleEndian(span, header.Generation);
        BinaryPrimitives.WriteInt32LittleEndian(span[8..], header.SourceRank);
        BinaryPrimitives.WriteInt32LittleEndian(span[12..], header.Group);
        BinaryPrimitives.WriteInt64LittleEndian(span[16..], header.OpId);
        BinaryPrimitives.WriteInt32LittleEndian(span[24..], header.Seq);
        BinaryPrimitives.WriteInt64LittleEndian(span[28..], header.Offset);
        BinaryPrimitives.WriteInt32LittleEndian(span[36..], length);
        BinaryPrimitives.WriteInt32LittleEndian(span[40..], 0);
    }

    internal static ChunkHeader ReadHeader(ReadOnlySpan<byte> span, out int length)
    {
        length = BinaryPrimitives.ReadInt32LittleEndian(span[36..]);
        if (length < 0 || length > MaxMessageBytes) throw new InvalidDataException($"bulk frame of {length} bytes");
        return new ChunkHeader(BinaryPrimitives.ReadInt64LittleEndian(span), BinaryPrimitives.ReadInt32LittleEndian(span[8..]),
            BinaryPrimitives.ReadInt32LittleEndian(span[12..]), BinaryPrimitives.ReadInt64LittleEndian(span[16..]),
            BinaryPrimitives.ReadInt32LittleEndian(span[24..]), BinaryPrimitives.ReadInt64LittleEndian(span[28..]));
    }

    public async ValueTask DisposeAsync()
    {
        if (_stopping.IsCancellationRequested) return;
        _stopping.Cancel();
        CloseInboundRings();
        _bulkListener.Stop();
        lock (_acceptedSockets)
            foreach (var s in _acceptedSockets) s.Dispose();
        try { await _acceptLoop.ConfigureAwait(false); } catch { }
        using var quick = new CancellationTokenSource(TimeSpan.FromSeconds(2));
        try { await _app.StopAsync(quick.Token).ConfigureAwait(false); } catch (OperationCanceledException) { }
        await _app.DisposeAsync().ConfigureAwait(false);
    }
}

public static class TransportKinds
{
    /// <summary>The config spelling (cluster.transport): shm, tcp or grpc.</summary>
    public static TransportKind Parse(string name) => name switch
    {
        "shm" => TransportKind.SharedMemory,
        "tcp" => TransportKind.Tcp,
        "grpc" => TransportKind.Grpc,
        _ => throw new ArgumentException($"unknown transport '{name}': shm, tcp or grpc"),
    };
}
