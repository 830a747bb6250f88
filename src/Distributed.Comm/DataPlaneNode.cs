using System.Buffers;
using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using System.Net.Security;
using System.Security.Authentication;
using System.Security.Cryptography;
using Distributed.Comm.Protos;
using Distributed.Comm.Security;
using Grpc.Core;
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
    /// <summary>What a raw-TCP bulk connection sends first: a magic number, then the link secret its Hello returned.</summary>
    internal const int BulkPreambleBytes = 4 + LinkSecretBytes;
    internal const int LinkSecretBytes = 16;
    internal const uint BulkMagic = 0x31425444;   // "DTB1"
    /// <summary>Hellos one peer may make per generation (a reconnect after a failed connect makes another).</summary>
    const int MaxHellosPerPeer = 8;

    readonly WebApplication _app;
    readonly TcpListener _bulkListener;
    readonly CancellationTokenSource _stopping = new();
    readonly List<Socket> _acceptedSockets = [];
    readonly ILogger _logger;
    readonly Task _acceptLoop;
    readonly List<(SharedMemoryRing Ring, CancellationTokenSource Stop, Thread Reader)> _inboundRings = [];
    const long RingCapacity = 32 << 20;

    DataPlaneNode(WebApplication app, TcpListener bulkListener, string host, ClusterCredentials? credentials, ILogger logger)
    {
        _app = app;
        Credentials = credentials;
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

    /// <summary>How long an accepted bulk connection may take to present its link secret before it is closed.</summary>
    public TimeSpan HandshakeTimeout { get; set; } = TimeSpan.FromSeconds(10);

    /// <summary>Secrets handed out by this generation's Hellos, and to whom (hex of the secret).</summary>
    readonly ConcurrentDictionary<string, (long Generation, int Source)> _linkSecrets = new();
    readonly ConcurrentDictionary<int, int> _hellosFrom = new();
    int _worldSize;

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

    /// <summary>The address peers dial: http://host:port, or https:// under mutual TLS.</summary>
    public string Endpoint => $"{(Credentials is null ? "http" : "https")}://{Host}:{GrpcPort}";

    /// <summary>Set under mutual TLS: the gRPC server and the raw-TCP bulk path then accept only peers of the cluster's CA.</summary>
    public ClusterCredentials? Credentials { get; }

    /// <summary>Starts the servers. <paramref name="bindAddress"/> 127.0.0.1 on one host, 0.0.0.0 in a cluster.</summary>
    /// <param name="credentials">mutual TLS on every data-plane connection (gRPC and raw TCP); null: plain sockets</param>
    public static async Task<DataPlaneNode> StartAsync(string bindAddress = "127.0.0.1", int port = 0, string? advertisedHost = null,
        ILoggerFactory? loggerFactory = null, CancellationToken cancellationToken = default, ClusterCredentials? credentials = null)
    {
        var builder = EmbeddedWebHost.CreateBuilder();
        var ip = IPAddress.Parse(bindAddress);
        builder.WebHost.ConfigureKestrel(kestrel =>
        {
            kestrel.Listen(ip, port, listen =>
            {
                listen.Protocols = HttpProtocols.Http2;
                if (credentials is not null)
                    listen.UseHttps(new Microsoft.AspNetCore.Server.Kestrel.Https.HttpsConnectionAdapterOptions
                    {
                        ServerCertificate = credentials.Node,
                        ClientCertificateMode = Microsoft.AspNetCore.Server.Kestrel.Https.ClientCertificateMode.RequireCertificate,
                        ClientCertificateValidation = (certificate, _, _) => credentials.Accepts(certificate, out _),
                        CheckCertificateRevocation = false,
                    });
            });
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
        node = new DataPlaneNode(app, listener, advertisedHost ?? (bindAddress == "0.0.0.0" ? Dns.GetHostName() : bindAddress), credentials, logger);
        return node;
    }

    /// <summary>
    /// Enters a generation with a rank in a world of <paramref name="worldSize"/>: traffic of every other generation,
    /// and of connections authenticated in another, is rejected from now on.
    /// </summary>
    public void BeginGeneration(long generation, int rank, int worldSize)
    {
        if (rank < 0 || rank >= worldSize) throw new ArgumentOutOfRangeException(nameof(rank), $"rank {rank} is outside a world of {worldSize}");
        Rank = rank;
        _worldSize = worldSize;
        _linkSecrets.Clear();
        _hellosFrom.Clear();
        Mailbox.Reset(generation, rank, worldSize);
        CloseInboundRings();
    }

    /// <summary>
    /// A sender's handshake: checked against this node's generation and world, then answered with a fresh link secret
    /// and the bulk paths it may use. Malformed or unexpected requests are refused with the reason, not served.
    /// </summary>
    internal HelloReply AcceptHello(HelloRequest request)
    {
        long generation = Mailbox.Generation;
        int source = request.SourceRank;
        RpcException Refuse(StatusCode code, string why)
        {
            Counters.CountRejected();
            return new RpcException(new Status(code, why));
        }
        if (Rank < 0) throw Refuse(StatusCode.FailedPrecondition, "this node is in no generation yet");
        if (request.Generation != generation)
            throw Refuse(StatusCode.FailedPrecondition, $"rank {Rank} is in generation {generation}, rank {source} in {request.Generation}");
        if (source < 0 || source >= _worldSize || source == Rank)
            throw Refuse(StatusCode.InvalidArgument, $"source rank {source} is not another rank of this generation's world of {_worldSize}");
        if (request.HostId.Length > 512) throw Refuse(StatusCode.InvalidArgument, $"a host id of {request.HostId.Length} characters");
        if (_hellosFrom.AddOrUpdate(source, 1, (_, n) => n + 1) > MaxHellosPerPeer)
            throw Refuse(StatusCode.ResourceExhausted, $"rank {source} already made {MaxHellosPerPeer} handshakes in generation {generation}");
        byte[] secret = RandomNumberGenerator.GetBytes(LinkSecretBytes);
        _linkSecrets[Convert.ToHexString(secret)] = (generation, source);
        var reply = new HelloReply { Generation = generation, Rank = Rank, BulkPort = BulkPort, LinkSecret = Google.Protobuf.ByteString.CopyFrom(secret) };
        if (request.WantSharedMemory && request.HostId == HostId)
            reply.SharedMemoryPath = OpenInboundRing(source, generation);
        return reply;
    }

    /// <summary>The sender a link secret of the current generation was given to, or null (unknown, or another generation's).</summary>
    internal int? Authenticate(ReadOnlySpan<byte> secret, long generation)
    {
        if (secret.Length == LinkSecretBytes && _linkSecrets.TryGetValue(Convert.ToHexString(secret), out var owner) &&
            owner.Generation == generation && generation == Mailbox.Generation)
            return owner.Source;
        Counters.CountRejected();
        return null;
    }

    /// <summary>Creates the ring a peer on this host writes into, and a thread that drains it into the mailbox.</summary>
    internal string OpenInboundRing(int sourceRank, long generation)
    {
        string directory = Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath();
        string path = Path.Combine(directory, $"dtrain-{Environment.ProcessId}-{Guid.NewGuid():N}-g{generation}-from{sourceRank}");
        var ring = SharedMemoryRing.Create(path, RingCapacity);
        var stop = CancellationTokenSource.CreateLinkedTokenSource(_stopping.Token);
        var reader = new Thread(() => DrainRing(ring, sourceRank, generation, stop.Token)) { IsBackground = true, Name = $"shm-from-{sourceRank}" };
        lock (_inboundRings) _inboundRings.Add((ring, stop, reader));
        reader.Start();
        return path;
    }

    /// <summary>
    /// Delivers what the ring's one writer, <paramref name="source"/>, sends; traffic claiming another sender ends the link.
    /// A frame that does not wrap is handed over in place, without a copy: a receive that already waits reads (reduces)
    /// it straight out of the ring, and the frame goes back to the writer once that receive has disposed it, which it
    /// does on this thread before the delivery returns (the mailbox copies a chunk that must wait for its receive).
    /// </summary>
    void DrainRing(SharedMemoryRing ring, int source, long generation, CancellationToken stop)
    {
        var header = new byte[BulkHeaderBytes];
        try
        {
            while (true)
            {
                long frame = ring.ReadHeader(header, stop);
                var chunkHeader = ReadHeader(header, out int length);
                ReceivedChunk chunk;
                if (ring.TryPayloadInPlace(frame, header.Length, length, out var inPlace)) chunk = ReceivedChunk.Borrowed(inPlace);
                else
                {
                    var payload = ArrayPool<byte>.Shared.Rent(Math.Max(length, 1));
                    ring.CopyPayload(frame, header.Length, payload.AsSpan(0, length));
                    chunk = new ReceivedChunk(payload.AsMemory(0, length), payload);
                }
                try { DeliverFrom(source, generation, chunkHeader, chunk); }
                catch (StaleGenerationException e) { _logger.LogWarning("{Message}", e.Message); }
                finally
                {
                    // Only a receive whose continuation did not run inline still holds the frame; none holds it for long.
                    if (chunk.IsBorrowed && !chunk.WaitUntilReleased(BorrowedFrameTimeout, stop))
                        throw new DataPlaneProtocolException($"a receive held a frame of rank {source}'s shared-memory ring for {BorrowedFrameTimeout.TotalSeconds:0} s");
                    ring.Release(frame, header.Length, length);
                }
            }
        }
        catch (OperationCanceledException) { }
        catch (DataPlaneProtocolException e) when (!stop.IsCancellationRequested) { PeerStreamBroke(source, e); }
    }

    /// <summary>How long a receive may hold a ring frame handed to it in place before the link is failed.</summary>
    static readonly TimeSpan BorrowedFrameTimeout = TimeSpan.FromSeconds(30);

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

    /// <summary>
    /// Delivers a chunk that arrived on a connection authenticated as <paramref name="source"/> in <paramref name="generation"/>.
    /// </summary>
    /// <exception cref="DataPlaneProtocolException">the chunk claims another sender or generation than its connection's, or is out of range</exception>
    internal void DeliverFrom(int source, long generation, ChunkHeader header, ReceivedChunk chunk)
    {
        if (header.SourceRank != source || header.Generation != generation)
        {
            chunk.Dispose();
            Counters.CountRejected();
            throw new DataPlaneProtocolException(
                $"a connection of rank {source} (generation {generation}) carried a chunk of rank {header.SourceRank}, generation {header.Generation}");
        }
        Deliver(header, chunk);
    }

    void Deliver(ChunkHeader header, ReceivedChunk chunk)
    {
        if (header.OpId == ProcessGroup.LivenessOpId) { chunk.Dispose(); return; }   // only tells the server who is on the stream
        if (header.OpId == ProcessGroup.AbortOpId)
        {
            if (chunk.Payload.Length is < 4 or > 64 << 10)
            {
                chunk.Dispose();
                Counters.CountRejected();
                throw new DataPlaneProtocolException($"an abort notice of {chunk.Payload.Length} bytes from rank {header.SourceRank}");
            }
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

    /// <summary>
    /// A preamble (magic, link secret) within <see cref="HandshakeTimeout"/>, then frames: a 44-byte header (generation,
    /// source, group, op, seq, offset, length) and the payload. A connection that does not authenticate is closed
    /// without effect; one that did and then breaks or misbehaves fails its sender.
    /// </summary>
    async Task ReadBulkConnectionAsync(Socket socket)
    {
        int? source = null;
        var remote = socket.RemoteEndPoint;
        Stream stream = new NetworkStream(socket, ownsSocket: true);
        try
        {
            long generation = Mailbox.Generation;
            var preamble = new byte[BulkPreambleBytes];
            using (var handshake = CancellationTokenSource.CreateLinkedTokenSource(_stopping.Token))
            {
                handshake.CancelAfter(HandshakeTimeout);
                try
                {
                    if (Credentials is not null)
                    {
                        var tls = new SslStream(stream, leaveInnerStreamOpen: false);
                        stream = tls;
                        await tls.AuthenticateAsServerAsync(Credentials.ServerOptions(), handshake.Token).ConfigureAwait(false);
                    }
                    await stream.ReadExactlyAsync(preamble, handshake.Token).ConfigureAwait(false);
                }
                catch (OperationCanceledException) when (!_stopping.IsCancellationRequested)
                {
                    Counters.CountRejected();
                    _logger.LogWarning("Closed a bulk connection from {Remote} that completed no handshake within {Seconds:0.#} s", remote, HandshakeTimeout.TotalSeconds);
                    return;
                }
                catch (Exception e) when (e is AuthenticationException or IOException && !_stopping.IsCancellationRequested)
                {
                    Counters.CountRejected();
                    _logger.LogWarning("Refused a bulk connection from {Remote}: {Error}", remote, e.Message);
                    return;
                }
            }
            bool magic = BinaryPrimitives.ReadUInt32LittleEndian(preamble) == BulkMagic;
            if (!magic) Counters.CountRejected();
            if (!magic || Authenticate(preamble.AsSpan(4), generation) is not int sender)
            {
                _logger.LogWarning("Closed a bulk connection from {Remote}: no valid link secret of generation {Generation}", remote, generation);
                return;
            }
            source = sender;
            await ReadBulkFramesAsync(stream, sender, generation).ConfigureAwait(false);
        }
        catch (StaleGenerationException e)
        {
            // Closing the connection tells the sender: its next write fails.
            _logger.LogWarning("{Message}", e.Message);
        }
        catch (Exception e) when (!_stopping.IsCancellationRequested && source is int rank)
        {
            PeerStreamBroke(rank, e);
        }
        catch (Exception) { }
        finally
        {
            await stream.DisposeAsync().ConfigureAwait(false);
        }
    }

    async Task ReadBulkFramesAsync(Stream stream, int source, long generation)
    {
        var headerBytes = new byte[BulkHeaderBytes];
        while (true)
        {
            await stream.ReadExactlyAsync(headerBytes, _stopping.Token).ConfigureAwait(false);
            var header = ReadHeader(headerBytes, out int length);
            byte[] payload = ArrayPool<byte>.Shared.Rent(Math.Max(length, 1));
            try { await stream.ReadExactlyAsync(payload.AsMemory(0, length), _stopping.Token).ConfigureAwait(false); }
            catch { ArrayPool<byte>.Shared.Return(payload); throw; }
            DeliverFrom(source, generation, header, new ReceivedChunk(payload.AsMemory(0, length), payload));
        }
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
        if (length < 0 || length > MaxMessageBytes) throw new DataPlaneProtocolException($"bulk frame of {length} bytes");
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
