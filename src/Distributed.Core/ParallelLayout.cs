namespace Distributed.Core;

/// <summary>
/// The model-parallel degrees a job asks for (<c>parallel.tp</c>, <c>parallel.pp</c>; dp follows from the workers),
/// and how a pipeline runs a step: <c>parallel.micro-batches</c> per data-parallel rank, <c>parallel.schedule</c>
/// (gpipe or 1f1b).
/// </summary>
/// <c>parallel.shard-optimizer</c> shards the AdamW moments over the data-parallel group (ZeRO-1).
/// <c>parallel.stage-layers</c> lists the blocks of each stage ("3,1"; empty: balanced by count), kept as the text
/// the user wrote, normalised, so the spec stays a plain value.
public sealed record ParallelSpec(int Tp, int Pp, int MicroBatches = 1, string Schedule = "1f1b", bool ShardOptimizer = false, string StageLayers = "")
{
    public static readonly ParallelSpec None = new(1, 1);

    /// <summary>The blocks of each stage as listed, or null for the balanced split.</summary>
    public int[]? StageLayerCounts => StageLayers.Length == 0 ? null : ParseStageLayers(StageLayers);

    /// <summary>"3,1", "3 1" or HOCON's "[3, 1]" as counts; anything else is a <see cref="ConfigException"/> naming the key.</summary>
    public static int[] ParseStageLayers(string text)
    {
        var parts = text.Trim().TrimStart('[').TrimEnd(']').Split([',', ' '], StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        var counts = new int[parts.Length];
        for (int i = 0; i < parts.Length; i++)
            if (!int.TryParse(parts[i], System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out counts[i]) || counts[i] < 1)
                throw new ConfigException($"parallel.stage-layers must list a positive block count per stage (e.g. \"3,1\"), got '{text}'");
        return counts;
    }
}

/// <summary>A pipeline stage: blocks [FirstLayer, FirstLayer + Layers) of the model; the first stage also owns the embeddings, the last the final LayerNorm and the head.</summary>
public sealed record PipelineStage(int Index, int Count, int FirstLayer, int Layers)
{
    public bool IsFirst => Index == 0;
    public bool IsLast => Index == Count - 1;

    public static readonly PipelineStage Whole = new(0, 1, 0, int.MaxValue);

    /// <summary>
    /// Stage <paramref name="index"/> of <paramref name="count"/> over <paramref name="layers"/> blocks: the listed
    /// counts (<c>parallel.stage-layers</c>, validated by <see cref="ParallelLayout.For"/>), or balanced by layer
    /// count (earlier stages take the remainder).
    /// </summary>
    public static PipelineStage Of(int index, int count, int layers, IReadOnlyList<int>? stageLayers = null)
    {
        if (stageLayers is not null) return new PipelineStage(index, count, stageLayers.Take(index).Sum(), stageLayers[index]);
        int per = layers / count, extra = layers % count;
        return new PipelineStage(index, count, index * per + Math.Min(index, extra), per + (index < extra ? 1 : 0));
    }

    public override string ToString() => $"stage {Index} of {Count} (blocks {FirstLayer}..{FirstLayer + Layers - 1})";
}

/// <summary>Where a rank sits in the grid.</summary>
public readonly record struct RankCoordinates(int Tp, int Dp, int Pp)
{
    public override string ToString() => $"tp {Tp}, dp {Dp}, pp {Pp}";
}

/// <summary>The axes of the grid; each rank belongs to exactly one group per axis.</summary>
public enum ParallelAxis { Data, Tensor, Pipeline }

/// <summary>
/// Groups that are not one axis (their data-plane ids, after the axes' and the compressed data group's): the
/// embedding group (first and last stage, the tied weight), the model-parallel group (every tp x pp rank of one
/// data-parallel index) and the world (every rank: the link probe, the per-step preemption check).
/// </summary>
public enum SpanningGroup { Embedding = 17, ModelParallel = 18, World = 19 }

/// <summary>
/// The dp x tp x pp grid of a job (torchtitan's ParallelDims): one validated record that every part of the
/// trainer reads. Ranks map to coordinates as Megatron-Core orders them: the tensor-parallel rank varies fastest,
/// then the data-parallel rank, then the pipeline stage, so a TP group is a run of neighbouring ranks (one host,
/// shared memory) and a DP group strides by tp.
/// </summary>
public sealed record ParallelLayout(int Dp, int Tp, int Pp)
{
    public int World => Dp * Tp * Pp;

    /// <summary>The blocks of each stage when <c>parallel.stage-layers</c> lists them; null: balanced.</summary>
    public int[]? StageLayers { get; init; }

    public static ParallelLayout Single { get; } = new(1, 1, 1);

    /// <summary>
    /// The layout of <paramref name="spec"/> on <paramref name="workers"/> ranks; every problem with the degrees is
    /// named in one message (workers vs tp x pp, heads and width vs tp, the global batch vs dp and grad-accum).
    /// </summary>
    public static ParallelLayout For(JobSpec spec, int workers)
    {
        int tp = spec.Parallel.Tp, pp = spec.Parallel.Pp, micro = spec.Parallel.MicroBatches;
        var problems = new List<string>();
        if (pp > spec.Model.Layers) problems.Add($"parallel.pp ({pp}) must not exceed model.n-layer ({spec.Model.Layers}): every stage needs a block");
        var stageLayers = spec.Parallel.StageLayerCounts;
        if (stageLayers is not null && (stageLayers.Length != pp || stageLayers.Sum() != spec.Model.Layers))
            problems.Add($"parallel.stage-layers ({string.Join(",", stageLayers)}) must list parallel.pp ({pp}) block counts that sum to model.n-layer ({spec.Model.Layers})");
        if (pp > 1 && spec.Train.GradAccum != 1) problems.Add($"train.grad-accum ({spec.Train.GradAccum}) must be 1 with a pipeline: parallel.micro-batches ({micro}) splits the batch instead");
        if (spec.Parallel.Schedule is not ("gpipe" or "1f1b")) problems.Add($"parallel.schedule must be gpipe or 1f1b, got '{spec.Parallel.Schedule}'");
        if (workers % (tp * pp) != 0) problems.Add($"the workers ({workers}) must be divisible by tp x pp ({tp} x {pp})");
        if (spec.Model.Heads % tp != 0) problems.Add($"model.n-head ({spec.Model.Heads}) must be divisible by tp ({tp})");
        if (spec.Model.Embedding % tp != 0) problems.Add($"model.n-embd ({spec.Model.Embedding}) must be divisible by tp ({tp})");
        int dp = Math.Max(1, workers / (tp * pp));
        if (spec.Train.BatchSize % (dp * spec.Train.GradAccum) != 0)
            problems.Add($"train.batch-size ({spec.Train.BatchSize}) must be divisible by dp x train.grad-accum ({dp} x {spec.Train.GradAccum})");
        else if (spec.Train.BatchSize / dp % micro != 0)
            problems.Add($"a data-parallel rank's batch (train.batch-size / dp = {spec.Train.BatchSize / dp}) must be divisible by parallel.micro-batches ({micro})");
        if (problems.Count > 0)
            throw new ConfigException($"layout workers={workers} tp={tp} pp={pp} (dp={(double)workers / (tp * pp):0.##}) is invalid: {string.Join("; ", problems)}");
        return new ParallelLayout(dp, tp, pp) { StageLayers = pp > 1 ? stageLayers : null };
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

    /// <summary>The rank whose step reports and evaluations the coordinator shows: the last stage computes the loss.</summary>
    public int ReportingRank => RankAt(new RankCoordinates(0, 0, Pp - 1));

    public PipelineStage StageOf(int rank, int layers) => Pp == 1 ? PipelineStage.Whole : PipelineStage.Of(Coordinates(rank).Pp, Pp, layers, StageLayers);

    /// <summary>
    /// The embedding group of a rank on the first or last stage (those two ranks of its tp and dp coordinates, which
    /// both hold the tied embedding); empty for middle stages and without a pipeline.
    /// </summary>
    public int[] EmbeddingGroup(int rank)
    {
        var c = Coordinates(rank);
        if (Pp == 1 || (c.Pp != 0 && c.Pp != Pp - 1)) return [];
        return [RankAt(c with { Pp = 0 }), RankAt(c with { Pp = Pp - 1 })];
    }

    /// <summary>Every tp x pp rank of this rank's data-parallel index (the gradient norm is summed over them), in rank order.</summary>
    public int[] ModelParallelGroup(int rank)
    {
        var c = Coordinates(rank);
        return Enumerable.Range(0, Pp).SelectMany(p => Enumerable.Range(0, Tp).Select(t => RankAt(new RankCoordinates(t, c.Dp, p)))).ToArray();
    }


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
