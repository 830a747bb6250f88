using Distributed.Core;

namespace Distributed.Comm;

/// <summary>A collective failed because a peer is dead, unreachable, or too slow. Names the rank.</summary>
public sealed class PeerFailedException(int rank, string message, Exception? inner = null)
    : UserFacingException(message, inner)
{
    public int Rank { get; } = rank;
}

/// <summary>Traffic from another generation: the sender belongs to an aborted (or not yet started) job attempt.</summary>
public sealed class StaleGenerationException(long expected, long actual, int sourceRank)
    : Exception($"rejected traffic of generation {actual} from rank {sourceRank}: this node is in generation {expected}");

/// <summary>Traffic that breaks the data plane's protocol: a frame out of range, or a connection that claims another sender.</summary>
public class DataPlaneProtocolException(string message) : Exception(message);

/// <summary>
/// A chunk no collective of this generation could ask for (a source, group, op id or size out of range, or more
/// unclaimed traffic than any collective leaves): dropped before it touched any receive.
/// </summary>
public sealed class RejectedChunkException(ChunkHeader header, string problem)
    : DataPlaneProtocolException($"rejected a chunk from rank {header.SourceRank} (group {header.Group}, op {header.OpId}, chunk {header.Seq}): {problem}")
{
    public ChunkHeader Header { get; } = header;
}
