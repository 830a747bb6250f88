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
