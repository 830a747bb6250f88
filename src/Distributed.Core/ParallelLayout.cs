namespace Distributed.Core;

/// <summary>The model-parallel degrees a job asks for (<c>parallel.tp</c>, <c>parallel.pp</c>); dp follows from the workers.</summary>
public sealed record ParallelSpec(int Tp, int Pp)
{
    public static readonly ParallelSpec None = new(1, 1);
}

/// <summary>Where a rank sits in the grid.</summary>
public readonly record struct RankCoordinates(int Tp, int Dp, int Pp)
{
    public override string ToString() => $"tp {Tp}, dp {Dp}, pp {Pp}";
}

/// <summary>The axes of the grid; each rank belongs to exactly one group per axis.</summary>
public enum ParallelAxis { Data, Tensor, Pipeline }

/// <summary>
/// The dp x tp x pp grid of a job (torchtitan's ParallelDims): one validated record that every part of the
/// trainer reads. Ranks map to coordinates as Megatron-Core orders them: the tensor-parallel rank varies fastest,
/// then the data-parallel rank, then the pipeline stage, so a TP group is a run of neighbouring ranks (one host,
/// shared memory) and a DP group strides by tp.
/// </summary>
public sealed record ParallelLayout(int Dp, int Tp, int Pp)
{
    public int World => Dp * Tp * Pp;

    public static ParallelLayout Single { get; } = new(1, 1, 1);

    /// <summary>
    /// The layout of <paramref name="spec"/> on <paramref name="workers"/> ranks; every problem with the degrees is
    /// named in one message (workers vs tp x pp, heads and width vs tp, the global batch vs dp and grad-accum).
    /// </summary>
    public static ParallelLayout For(JobSpec spec, int workers)
    {
        int tp = spec.Parallel.Tp, pp = spec.Parallel.Pp;
        var problems = new List<string>();
        if (pp != 1) problems.Add($"parallel.pp ({pp}) must be 1: pipeline parallelism is not built yet");
        if (workers % (tp * pp) != 0) problems.Add($"the workers ({workers}) must be divisible by tp x pp ({tp} x {pp})");
        if (spec.Model.Heads % tp != 0) problems.Add($"model.n-head ({spec.Model.Heads}) must be divisible by tp ({tp})");
        if (spec.Model.Embedding % tp != 0) problems.Add($"model.n-embd ({spec.Model.Embedding}) must be divisible by tp ({tp})");
        int dp = Math.Max(1, workers / (tp * pp));
        if (spec.Train.BatchSize % (dp * spec.Train.GradAccum) != 0)
            problems.Add($"train.batch-size ({spec.Train.BatchSize}) must be divisible by dp x train.grad-accum ({dp} x {spec.Train.GradAccum})");
        if (problems.Count > 0)
            throw new ConfigException($"layout workers={workers} tp={tp} pp={pp} (dp={(double)workers / (tp * pp):0.##}) is invalid: {string.Join("; ", problems)}");
        return new ParallelLayout(dp, tp, pp);
    }

    public RankCoordinates Coordinates(int rank)
    {
        if (rank < 0 || rank >= World) throw new ArgumentOutOfRangeException(nameof(rank), $"rank {rank} is outside the layout {this} ({World} ranks)");
        return new RankCoordinates(rank % Tp, rank / Tp % Dp, rank / (Tp * Dp));
    }

    public int RankAt(RankCoordinates c) => c.Pp * Tp * Dp + c.Dp * Tp + c.Tp;

    /// <summary>The global ranks of <paramref name="rank"/>'s group along <paramref name="axis"/>, in group-rank order.</summary>
    public int[] Group(ParallelAxis axis, int rank)
    {
        var c = Coordinates(rank);
        return axis switch
        {
            ParallelAxis.Tensor => Enumerable.Range(0, Tp).Select(t => RankAt(c with { Tp = t })).ToArray(),
            ParallelAxis.Data => Enumerable.Range(0, Dp).Select(d => RankAt(c with { Dp = d })).ToArray(),
            ParallelAxis.Pipeline => Enumerable.Range(0, Pp).Select(p => RankAt(c with { Pp = p })).ToArray(),
            _ => throw new ArgumentOutOfRangeException(nameof(axis)),
        };
    }

    /// <summary>
    /// The data-plane id of a group along <paramref name="axis"/>: a rank belongs to one group per axis, so the axis
    /// tells its messages apart (a second, compressed data-parallel group takes <see cref="CompressedDataGroupId"/>).
    /// </summary>
    public static int GroupId(ParallelAxis axis) => (int)axis;

    public const int CompressedDataGroupId = 16;

    /// <summary>The group of every rank of the job (the worker's per-step preemption check).</summary>
    public const int WorldGroupId = 17;

    public override string ToString() => $"dp={Dp} x tp={Tp} x pp={Pp}";

    /// <summary>
    /// The order in which workers on <paramref name="hosts"/> (one entry per worker) take ranks 0, 1, ...: whole TP
    /// groups from one host first (TP is the chattiest group, and shared memory beats TCP), the remaining workers after
    /// them, each host's workers in their given order. Returns indices into <paramref name="hosts"/>.
    /// </summary>
    public static int[] PlaceTensorParallelGroups(IReadOnlyList<string> hosts, int tp)
    {
        var byHost = Enumerable.Range(0, hosts.Count).GroupBy(i => hosts[i]).Select(g => new Queue<int>(g)).ToList();
        var order = new List<int>(hosts.Count);
        foreach (var queue in byHost)
            while (queue.Count >= tp)
                for (int i = 0; i < tp; i++) order.Add(queue.Dequeue());
        foreach (var queue in byHost) order.AddRange(queue);
        return [.. order];
    }
}
