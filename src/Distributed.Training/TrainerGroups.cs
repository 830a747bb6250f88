using Distributed.Comm;
using Distributed.Core;

namespace Distributed.Training;

/// <summary>
/// One rank's place in the layout and its process groups, built by the worker from the <see cref="ParallelLayout"/>.
/// <see cref="Gradients"/> is the data-parallel group gradients are averaged over (a compressed one may be given);
/// <see cref="Data"/> the exact one (weights, losses, evaluations).
/// </summary>
public sealed record TrainerGroups(ParallelLayout Layout, int Rank, IProcessGroup Data, IProcessGroup Gradients, IProcessGroup Tensor)
{
    public RankCoordinates Coordinates => Layout.Coordinates(Rank);
}
