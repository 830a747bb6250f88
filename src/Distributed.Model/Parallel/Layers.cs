using Distributed.Core;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static Distributed.Model.Parallel.Mappings;
using F = TorchSharp.torch.nn.functional;

namespace Distributed.Model.Parallel;

/// <summary>Building a rank's part of a layer from the single process's full weights (so tp never changes them).</summary>
static class Slicing
{
    /// <summary>The rows of <paramref name="full"/> along <paramref name="dim"/> named by <paramref name="segments"/>, then <paramref name="padding"/> zero rows.</summary>
    public static Parameter Take(Tensor full, int dim, SliceSegment[] segments, long padding = 0)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();   // a leaf of its own, not a function of the full weights
        var parts = segments.Select(s => full.narrow(dim, s.Start, s.Length)).ToList();
        if (padding > 0)
        {
            long[] shape = [.. full.shape];
            shape[dim] = padding;
            parts.Add(zeros(shape, dtype: full.dtype));
        }
        var local = cat(parts, dim).detach().contiguous().clone();
        return new Parameter(local.MoveToOuterDisposeScope(), requires_grad: true);
    }
}

/// <summary>
/// Y = X A^T + b with A's rows (the output features) split over the tensor-parallel ranks: each rank computes its
/// columns of Y from the whole input. f before it (the input's gradient is summed over the ranks in backward); no
/// communication in forward.
/// </summary>
public sealed class ColumnParallelLinear : nn.Module<Tensor, Tensor>
{
    readonly Parameter weight;
    readonly Parameter? bias;
    readonly TensorParallelGroup _group;
    readonly ParameterUse _use;

    /// <param name="rows">the global output features this rank computes (several runs for q/k/v split by heads)</param>
    public ColumnParallelLinear(Tensor fullWeight, Tensor? fullBias, SliceSegment[] rows, TensorParallelGroup group, ParameterUse use)
        : base(nameof(ColumnParallelLinear))
    {
        weight = Slicing.Take(fullWeight, 0, rows);
        if (fullBias is not null) bias = Slicing.Take(fullBias, 0, rows);
        WeightSlice = new TensorSlice(fullWeight.shape, 0, rows);
        BiasSlice = fullBias is null ? null : new TensorSlice(fullBias.shape, 0, rows);
        (_group, _use) = (group, use);
        RegisterComponents();
    }

    public TensorSlice WeightSlice { get; }
    public TensorSlice? BiasSlice { get; }

    public override Tensor forward(Tensor x)
    {
        x = CopyToTensorParallelRegion(x, _group);
        return F.linear(x, _use[weight], _use.Optional(bias));
    }
}

/// <summary>
/// Y = X A^T + b with A's columns (the input features) split: each rank multiplies its part of X (the output of a
/// column-parallel layer) and g sums the partial products in forward. The bias is replicated and added once, after
/// the reduction.
/// </summary>
public sealed class RowParallelLinear : nn.Module<Tensor, Tensor>
{
    readonly Parameter weight;
    readonly Parameter? bias;
    readonly TensorParallelGroup _group;
    readonly ParameterUse _use;

    public RowParallelLinear(Tensor fullWeight, Tensor? fullBias, SliceSegment columns, TensorParallelGroup group, ParameterUse use)
        : base(nameof(RowParallelLinear))
    {
        weight = Slicing.Take(fullWeight, 1, [columns]);
        if (fullBias is not null) bias = Slicing.Take(fullBias, 0, [new SliceSegment(0, fullBias.shape[0])]);
        WeightSlice = new TensorSlice(fullWeight.shape, 1, [columns]);
        (_group, _use) = (group, use);
        RegisterComponents();
    }

    public TensorSlice WeightSlice { get; }

    public override Tensor forward(Tensor x)
    {
        var y = ReduceFromTensorParallelRegion(F.linear(x, _use[weight]), _group);
        return bias is null ? y : y + _use[bias];
    }
}

/// <summary>
/// The token embedding with the vocabulary (padded to a multiple of tp) split by rows: a rank looks up the ids in
/// its range, zeroes the others, and g sums the ranks' rows. The same table is the tied LM head
/// (<see cref="Logits"/>): each rank computes the logits of its part of the vocabulary, padding masked to -inf.
/// </summary>
public sealed class VocabParallelEmbedding : nn.Module<Tensor, Tensor>
{
    readonly Parameter weight;
    readonly TensorParallelGroup _group;
    readonly ParameterUse _use;
    readonly long _held;

    public VocabParallelEmbedding(Tensor fullWeight, TensorParallelGroup group, ParameterUse use) : base(nameof(VocabParallelEmbedding))
    {
        long vocab = fullWeight.shape[0];
        long padded = (vocab + group.Size - 1) / group.Size * group.Size;
        PerRank = padded / group.Size;
        Start = group.Rank * PerRank;
        _held = Math.Clamp(vocab - Start, 0, PerRank);
        SliceSegment[] held = _held > 0 ? [new SliceSegment(Start, _held)] : [];
        weight = Slicing.Take(fullWeight, 0, held, padding: PerRank - _held);
        WeightSlice = new TensorSlice(fullWeight.shape, 0, held);
        (_group, _use) = (group, use);
        RegisterComponents();
    }

    /// <summary>The first (padded) vocabulary index of this rank, and how many it covers.</summary>
    public long Start { get; }
    public long PerRank { get; }
    public TensorSlice WeightSlice { get; }

    public override Tensor forward(Tensor ids)
    {
        var outside = ids.lt(Start).logical_or(ids.ge(Start + PerRank));
        var local = (ids - Start).masked_fill(outside, 0);
        var table = _use[weight];
        var rows = table.index_select(0, local.reshape(-1)).view([.. ids.shape, table.shape[1]]);
        return ReduceFromTensorParallelRegion(rows.masked_fill(outside.unsqueeze(-1), 0), _group);
    }

    /// <summary>This rank's columns of the logits [.., PerRank] for hidden states [.., C].</summary>
    public Tensor Logits(Tensor x)
    {
        var logits = F.linear(CopyToTensorParallelRegion(x, _group), _use[weight]);
        if (_held == PerRank) return logits;
        using var padding = arange(PerRank).ge(_held);
        return logits.masked_fill(padding, float.NegativeInfinity);
    }
}
