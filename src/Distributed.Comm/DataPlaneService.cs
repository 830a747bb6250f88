using Distributed.Comm.Protos;
using Google.Protobuf;
using Grpc.Core;

namespace Distributed.Comm;

/// <summary>The gRPC side of a worker's data plane: accepts chunk streams and handshakes.</summary>
sealed class DataPlaneService(DataPlaneNode node) : DataPlane.DataPlaneBase
{
    /// <summary>
    /// A sender's chunk stream. Its first message is a liveness chunk carrying the link secret of an accepted Hello;
    /// a stream without one is refused and changes nothing. After it, every chunk must be that sender's, of that
    /// generation, and in range: otherwise the sender is failed (an authenticated peer that misbehaves is broken).
    /// </summary>
    public override async Task<ExchangeSummary> Exchange(IAsyncStreamReader<TensorChunk> requestStream, ServerCallContext context)
    {
        int? source = null;
        long generation = 0, count = 0;
        try
        {
            await foreach (var chunk in requestStream.ReadAllAsync(context.CancellationToken).ConfigureAwait(false))
            {
                var header = new ChunkHeader(chunk.Generation, chunk.SourceRank, chunk.Group, chunk.OpId, chunk.Seq, chunk.Offset);
                if (source is not int sender)
                {
                    if (chunk.OpId != ProcessGroup.LivenessOpId || node.Authenticate(chunk.Payload.Span, chunk.Generation) is not int authenticated ||
                        authenticated != chunk.SourceRank)
                    {
                        if (chunk.OpId != ProcessGroup.LivenessOpId) node.Counters.CountRejected();
                        throw new RpcException(new Status(StatusCode.PermissionDenied, "a chunk stream must start with the link secret of an accepted Hello"));
                    }
                    source = authenticated;
                    generation = chunk.Generation;
                    continue;
                }
                node.DeliverFrom(sender, generation, header, new ReceivedChunk(chunk.Payload.Memory));
                count++;
            }
        }
        catch (StaleGenerationException e)
        {
            throw new RpcException(new Status(StatusCode.FailedPrecondition, e.Message));
        }
        catch (Exception e) when (source is int rank && e is not RpcException)
        {
            node.PeerStreamBroke(rank, e);
            if (e is DataPlaneProtocolException) throw new RpcException(new Status(StatusCode.InvalidArgument, e.Message));
            throw;
        }
        return new ExchangeSummary { Chunks = count };
    }

    public override Task<HelloReply> Hello(HelloRequest request, ServerCallContext context) => Task.FromResult(node.AcceptHello(request));
}

static class ByteStrings
{
    /// <summary>Wraps bytes without copying; the caller keeps them unchanged until the write completes.</summary>
    public static ByteString Wrap(ReadOnlyMemory<byte> bytes) => UnsafeByteOperations.UnsafeWrap(bytes);
}
