using Distributed.Comm;
using Distributed.Core;

namespace Distributed.Training;

/// <summary>
/// One rank's place in the layout and its process groups, built by the worker from the <see cref="ParallelLayout"/>.
/// <see cref="Gradients"/> is the data-parallel group gradients are averaged over (a compressed one may be given);
/// <see cref="Data"/> the exact one (weights, losses, evaluations). <see cref="Pipeline"/> connects the stages,
/// <see cref="Embedding"/> the first and last stage (null elsewhere and without a pipeline), and
/// <see cref="ModelParallel"/> every tp x pp rank of one data-parallel index (the gradient norm), <see cref="World"/>
/// every rank (the worker's link probe and preemption check, one after the other on the training thread).
/// </summary>
public sealed record TrainerGroups(ParallelLayout Layout, int Rank, IProcessGroup Data, IProcessGroup Gradients, IProcessGroup Tensor,
    IProcessGroup Pipeline, IProcessGroup? Embedding, IProcessGroup ModelParallel, IProcessGroup World)
{
    public RankCoordinates Coordinates => Layout.Coordinates(Rank);

    /// <summary>Every group of <paramref name="rank"/> in <paramref name="layout"/>, over one set of links (a group id per axis).</summary>
    /// <param name="compressGradients">gradients travel as bfloat16 in a data-parallel group of their own, so weights, losses and evaluations stay exact</param>
    public static TrainerGroups Create(PeerLinks links, ParallelLayout layout, int rank, CollectiveOptions options, bool compressGradients = false)
    {
        ProcessGroup Along(ParallelAxis axis) => new(links, ParallelLayout.GroupId(axis), layout.Group(axis, rank), options);
        var data = Along(ParallelAxis.Data);
        var gradients = compressGradients
            ? new ProcessGroup(links, ParallelLayout.CompressedDataGroupId, layout.Group(ParallelAxis.Data, rank), options with { Compression = Compression.BFloat16 })
            : data;
        var embedding = layout.EmbeddingGroup(rank);
        return new TrainerGroups(layout, rank, data, gradients, Along(ParallelAxis.Tensor), Along(ParallelAxis.Pipeline),
            embedding.Length > 0 ? new ProcessGroup(links, (int)SpanningGroup.Embedding, embedding, options) : null,
            new ProcessGroup(links, (int)SpanningGroup.ModelParallel, layout.ModelParallelGroup(rank), options),
            new ProcessGroup(links, (int)SpanningGroup.World, Enumerable.Range(0, layout.World).ToArray(), options));
    }
}
