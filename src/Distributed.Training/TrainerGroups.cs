using Distributed.Comm;
using Distributed.Core;

namespace Distributed.Training;

/// <summary>
/// One rank's place in the layout and its process groups, built by the worker from the <see cref="ParallelLayout"/>.
/// <see cref="Gradients"/> is the data-parallel group gradients are averaged over (a compressed one may be given);
/// <see cref="Data"/> the exact one (weights, losses, evaluations). <see cref="Pipeline"/> connects the stages,
/// <see cref="Embedding"/> the first and last stage (null elsewhere and without a pipeline), and
/// <see cref="ModelParallel"/> every tp x pp rank of one data-parallel index (the gradient norm).
/// </summary>
public sealed record TrainerGroups(ParallelLayout Layout, int Rank, IProcessGroup Data, IProcessGroup Gradients, IProcessGroup Tensor,
    IProcessGroup Pipeline, IProcessGroup? Embedding, IProcessGroup ModelParallel)
{
    public RankCoordinates Coordinates => Layout.Coordinates(Rank);
}
