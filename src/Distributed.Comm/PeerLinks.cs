using System.Net.Security;
using System.Net.Sockets;
using Distributed.Comm.Protos;
using Grpc.Core;
using Grpc.Net.Client;

namespace Distributed.Comm;

/// <summary>
/// This worker's outgoing connections for one generation: one long-lived gRPC Exchange stream per peer, or one
/// raw-TCP socket per peer whose port a gRPC Hello negotiated. Writes to one peer are serialised; a failed write
/// is an error naming the peer's rank.
/// </summary>
public sealed class PeerLinks : IAsyncDisposable
{
    readonly DataPlaneNode _node;
    readonly IReadOnlyList<string> _endpoints;
    readonly TransportKind _transport;
    readonly Link?[] _links;
    readonly SemaphoreSlim[] _locks;
    readonly CancellationTokenSource _closing = new();
    readonly TimeSpan[] _delays;
    readonly bool[] _severed;
    bool _disposed;

    /// <summary>Ends an outgoing stream politely if the peer still listens, within 2 s either way.</summary>
    static async Task CloseQuietly(AsyncClientStreamingCall<TensorChunk, ExchangeSummary> call)
    {
        try
        {
            using var quick = new CancellationTokenSource(TimeSpan.FromSeconds(2));
            await call.RequestStream.CompleteAsync().WaitAsync(quick.Token).ConfigureAwait(false);
        }
        catch (Exception) { }   // the peer is gone: nothing to close
        call.Dispose();
    }

    abstract class Link : IAsyncDisposable
    {
        /// <param name="timeout">how long a write may wait for a receiver that does not take the bytes (a stuck peer)</param>
        public abstract Task WriteAsync(ChunkHeader header, ReadOnlyMemory<byte> payload, TimeSpan timeout, CancellationToken cancellationToken);
        public abstract ValueTask DisposeAsync();
    }

    sealed class GrpcLink(GrpcChannel channel, AsyncClientStreamingCall<TensorChunk, ExchangeSummary> call) : Link
    {
        public override Task WriteAsync(ChunkHeader h, ReadOnlyMemory<byte> payload, TimeSpan timeout, CancellationToken cancellationToken) =>
            call.RequestStream.WriteAsync(new TensorChunk
            {
                Generation = h.Generation, SourceRank = h.SourceRank, Group = h.Group, OpId = h.OpId, Seq = h.Seq, Offset = h.Offset,
                Payload = ByteStrings.Wrap(payload),
            }, cancellationToken);

        public override async ValueTask DisposeAsync()
        {
            await CloseQuietly(call).ConfigureAwait(false);
            channel.Dispose();
        }
    }

    /// <summary>Frames on a raw socket, or on a TLS stream over it under mutual TLS (<paramref name="tls"/>).</summary>
    sealed class TcpLink(GrpcChannel channel, Socket socket, SslStream? tls) : Link
    {
        readonly byte[] _header = new byte[DataPlaneNode.BulkHeaderBytes];

        public override async Task WriteAsync(ChunkHeader h, ReadOnlyMemory<byte> payload, TimeSpan timeout, CancellationToken cancellationToken)
        {
            DataPlaneNode.WriteHeader(_header, h, payload.Length);
            if (tls is not null)
            {
                await tls.WriteAsync(_header, cancellationToken).ConfigureAwait(false);
                await tls.WriteAsync(payload, cancellationToken).ConfigureAwait(false);
                return;
            }
            await socket.SendAsync(_header, SocketFlags.None, cancellationToken).ConfigureAwait(false);
            while (payload.Length > 0)
            {
                int sent = await socket.SendAsync(payload, SocketFlags.None, cancellationToken).ConfigureAwait(false);
                payload = payload[sent..];
            }
        }

        public override async ValueTask DisposeAsync()
        {
            if (tls is not null) await tls.DisposeAsync().ConfigureAwait(false);
            socket.Dispose();
            channel.Dispose();
        }
    }

    /// <summary>Writes into the receiver's shared-memory ring; the idle gRPC stream beside it only reports liveness.</summary>
    sealed class SharedMemoryLink(GrpcChannel channel, AsyncClientStreamingCall<TensorChunk, ExchangeSummary> liveness, SharedMemoryRing ring) : Link
    {
        readonly byte[] _header = new byte[DataPlaneNode.BulkHeaderBytes];

        public override Task WriteAsync(ChunkHeader h, ReadOnlyMemory<byte> payload, TimeSpan timeout, CancellationToken cancellationToken)
        {
            DataPlaneNode.WriteHeader(_header, h, payload.Length);
            return ring.WriteAsync(_header, payload, timeout, cancellationToken).AsTask();
        }

        public override async ValueTask DisposeAsync()
        {
            await CloseQuietly(liveness).ConfigureAwait(false);
            ring.Dispose();
            channel.Dispose();
        }
    }

    public PeerLinks(DataPlaneNode node, long generation, IReadOnlyList<string> endpoints, TransportKind transport)
    {
        _node = node;
        Generation = generation;
        _endpoints = endpoints;
        _transport = transport;
        _links = new Link?[endpoints.Count];
        _locks = endpoints.Select(_ => new SemaphoreSlim(1, 1)).ToArray();
        _delays = new TimeSpan[endpoints.Count];
        _severed = new bool[endpoints.Count];
    }

    /// <summary>Fault injection: every write to <paramref name="peer"/> waits <paramref name="delay"/> first (a slow link).</summary>
    public void SetDelay(int peer, TimeSpan delay) => _delays[peer] = delay;

    /// <summary>
    /// Fault injection: cuts the connection to <paramref name="peer"/>. Writes to it fail from now on, and so does
    /// whatever waits for its chunks here: the same errors a broken network gives.
    /// </summary>
    public async Task SeverAsync(int peer)
    {
        _severed[peer] = true;   // a write that starts from now on fails
        // A write in flight holds the lock; within the deadline the link is closed under it, otherwise as it is.
        bool locked = await _locks[peer].WaitAsync(TimeSpan.FromSeconds(10)).ConfigureAwait(false);
        try
        {
            if (_links[peer] is { } link) await link.DisposeAsync().ConfigureAwait(false);
            _links[peer] = null;
        }
        finally
        {
            if (locked) _locks[peer].Release();
        }
        _node.Mailbox.FailPeer(peer, new PeerFailedException(peer, $"the link to rank {peer} was cut"));
    }

    public long Generation { get; }
    public int Rank => _node.Rank;
    public int WorldSize => _endpoints.Count;
    public TransportKind Transport => _transport;
    public Mailbox Mailbox => _node.Mailbox;
    public string EndpointOf(int rank) => _endpoints[rank];

    /// <param name="timeout">how long the write may wait for the receiver to take the bytes before it names it failed</param>
    public async Task SendAsync(int destination, ChunkHeader header, ReadOnlyMemory<byte> payload, TimeSpan timeout, CancellationToken cancellationToken)
    {
        var gate = _locks[destination];
        await gate.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            if (_severed[destination]) throw new PeerFailedException(destination, $"the link to rank {destination} was cut");
            if (_delays[destination] > TimeSpan.Zero) await Task.Delay(_delays[destination], cancellationToken).ConfigureAwait(false);
            var link = _links[destination] ??= await ConnectAsync(destination, cancellationToken).ConfigureAwait(false);
            await link.WriteAsync(header, payload, timeout, cancellationToken).ConfigureAwait(false);
            _node.Counters.Sent(payload.Length);
        }
        catch (Exception e) when (e is not PeerFailedException && !cancellationToken.IsCancellationRequested)
        {
            throw new PeerFailedException(destination, $"cannot send to rank {destination} at {_endpoints[destination]}: {Describe(e)}", e);
        }
        finally
        {
            gate.Release();
        }
    }

    async Task<Link> ConnectAsync(int destination, CancellationToken cancellationToken)
    {
        var credentials = _node.Credentials;
        string host = new Uri(_endpoints[destination]).Host;
        var channel = GrpcChannel.ForAddress(_endpoints[destination], new GrpcChannelOptions
        {
            HttpHandler = new SocketsHttpHandler
            {
                InitialHttp2StreamWindowSize = 16 << 20,
                EnableMultipleHttp2Connections = true,
                ConnectTimeout = TimeSpan.FromSeconds(5),
                KeepAlivePingDelay = TimeSpan.FromSeconds(5),
                KeepAlivePingTimeout = TimeSpan.FromSeconds(5),
                SslOptions = credentials?.ClientOptions(host) ?? new(),
            },
            MaxSendMessageSize = DataPlaneNode.MaxMessageBytes,
            MaxReceiveMessageSize = DataPlaneNode.MaxMessageBytes,
        });
        try
        {
            var client = new DataPlane.DataPlaneClient(channel);
            // Every path starts with a Hello: the receiver checks our generation and rank and gives a secret that each
            // of our connections presents first, so that only traffic it accepted a handshake for is delivered.
            bool wantShared = _transport == TransportKind.SharedMemory;
            var hello = await client.HelloAsync(new HelloRequest { Generation = Generation, SourceRank = Rank, WantSharedMemory = wantShared, HostId = DataPlaneNode.HostId },
                deadline: DateTime.UtcNow.AddSeconds(10), cancellationToken: cancellationToken).ConfigureAwait(false);
            var authenticate = new TensorChunk { Generation = Generation, SourceRank = Rank, OpId = ProcessGroup.LivenessOpId, Payload = hello.LinkSecret };
            if (_transport == TransportKind.Grpc)
            {
                var call = client.Exchange(cancellationToken: _closing.Token);
                // The receiver answers only when it rejects the stream (e.g. another generation): surface that at once
                // to whoever waits on this peer, instead of letting them run into a deadline.
                _ = call.ResponseAsync.ContinueWith(t =>
                {
                    if (t.Exception?.InnerException is RpcException { StatusCode: StatusCode.FailedPrecondition or StatusCode.PermissionDenied or StatusCode.InvalidArgument } rejected)
                        _node.Mailbox.FailPeer(destination, new PeerFailedException(destination,
                            $"rank {destination} rejected our traffic: {rejected.Status.Detail}", rejected));
                }, TaskScheduler.Default);
                await call.RequestStream.WriteAsync(authenticate, cancellationToken).ConfigureAwait(false);
                return new GrpcLink(channel, call);
            }
            if (hello.SharedMemoryPath.Length > 0)
            {
                var liveness = client.Exchange(cancellationToken: _closing.Token);
                await liveness.RequestStream.WriteAsync(authenticate, cancellationToken).ConfigureAwait(false);
                return new SharedMemoryLink(channel, liveness, SharedMemoryRing.Open(hello.SharedMemoryPath));
            }
            if (hello.BulkPort == 0) throw new InvalidOperationException($"rank {destination} offers no TCP bulk path");
            var socket = new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true, SendBufferSize = 4 << 20 };
            SslStream? tls = null;
            try
            {
                await socket.ConnectAsync(host, hello.BulkPort, cancellationToken).ConfigureAwait(false);
                var preamble = new byte[DataPlaneNode.BulkPreambleBytes];
                System.Buffers.Binary.BinaryPrimitives.WriteUInt32LittleEndian(preamble, DataPlaneNode.BulkMagic);
                hello.LinkSecret.Span.CopyTo(preamble.AsSpan(4));
                if (credentials is not null)
                {
                    tls = new SslStream(new NetworkStream(socket, ownsSocket: false), leaveInnerStreamOpen: false);
                    using var handshake = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
                    handshake.CancelAfter(TimeSpan.FromSeconds(10));
                    await tls.AuthenticateAsClientAsync(credentials.ClientOptions(host), handshake.Token).ConfigureAwait(false);
                    await tls.WriteAsync(preamble, cancellationToken).ConfigureAwait(false);
                }
                else await socket.SendAsync(preamble, SocketFlags.None, cancellationToken).ConfigureAwait(false);
            }
            catch
            {
                tls?.Dispose();
                socket.Dispose();
                throw;
            }
            return new TcpLink(channel, socket, tls);
        }
        catch
        {
            channel.Dispose();
            throw;
        }
    }

    static string Describe(Exception e) => e switch
    {
        RpcException rpc => $"{rpc.StatusCode}: {rpc.Status.Detail}",
        _ => e.InnerException is { } inner ? $"{e.Message} ({inner.Message})" : e.Message,
    };

    public async ValueTask DisposeAsync()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (var link in _links)
            if (link is not null) await link.DisposeAsync().ConfigureAwait(false);
        _closing.Cancel();
        _closing.Dispose();
    }
}
