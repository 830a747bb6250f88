using Distributed.Comm.Protos;
using Google.Protobuf;
using Grpc.Core;

namespace Distributed.Comm;

/// <summary>The gRPC side of a worker's data plane: accepts chunk streams and handshakes.</summary>
sealed class DataPlaneService(DataPlaneNode node) : DataPlane.DataPlaneBase
{
    public override async Task<ExchangeSummary> Exchange(IAsyncStreamReader<TensorChunk> requestStream, ServerCallContext context)
    {
        int? source = null;
        long count = 0;
        try
        {
            await foreach (var chunk in requestStream.ReadAllAsync(context.CancellationToken).ConfigureAwait(false))
            {
                source = chunk.SourceRank;
                var header = new ChunkHeader(chunk.Generation, chunk.SourceRank, chunk.Group, chunk.OpId, chunk.Seq, chunk.Offset);
                node.Deliver(header, new ReceivedChunk(chunk.Payload.Memory));
                count++;
            }
        }
        catch (StaleGenerationException e)
        {
            throw new RpcException(new Status(StatusCode.FailedPrecondition, e.Message));
        }
        catch (Exception e) when (source is int rank && e is not RpcException { StatusCode: StatusCode.FailedPrecondition })
        {
            node.PeerStreamBroke(rank, e);
            throw;
        }
        return new ExchangeSummary { Chunks = count };
    }

    public override Task<HelloReply> Hello(HelloRequest request, ServerCallContext context)
    {
        if (request.Generation != node.Mailbox.Generation)
            throw new RpcException(new Status(StatusCode.FailedPrecondition,
                $"rank {node.Rank} is in generation {node.Mailbox.Generation}, rank {request.SourceRank} in {request.Generation}"));
        var reply = new HelloReply { Generation = node.Mailbox.Generation, Rank = node.Rank, BulkPort = node.BulkPort };
        if (request.WantSharedMemory && request.HostId == DataPlaneNode.HostId)
            reply.SharedMemoryPath = node.OpenInboundRing(request.SourceRank, request.Generation);
        return Task.FromResult(reply);
    }
}

static class ByteStrings
{
    /// <summary>Wraps bytes without copying; the caller keeps them unchanged until the write completes.</summary>
    public static ByteString Wrap(ReadOnlyMemory<byte> bytes) => UnsafeByteOperations.UnsafeWrap(bytes);
}
