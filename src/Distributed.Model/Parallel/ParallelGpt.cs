using Distributed.Core;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;
using F = TorchSharp.torch.nn.functional;

namespace Distributed.Model.Parallel;

/// <summary>
/// Attention with the heads split over the tensor-parallel ranks: q/k/v column-parallel (this rank's heads), the
/// output projection row-parallel. Communication: f before c_attn, g after c_proj (one all-reduce each way).
/// Attention dropout is inside the split region, so it draws from this rank's stream; the residual dropout is
/// replicated and draws from the shared one (the same mask on every TP rank, or the replicated weights would drift apart).
/// </summary>
public sealed class ParallelCausalSelfAttention : Module<Tensor, Tensor>
{
    readonly ColumnParallelLinear c_attn;
    readonly RowParallelLinear c_proj;
    readonly int _localHeads;
    readonly double _dropout;
    // The streams, not the model itself: a module field would register the model as its own child.
    readonly DropoutStream _shared, _tensorParallel;

    internal ParallelCausalSelfAttention(ParallelGpt model, string prefix, IReadOnlyDictionary<string, Tensor> full, TensorParallelGroup group)
        : base(nameof(ParallelCausalSelfAttention))
    {
        var spec = model.Spec;
        long c = spec.Embedding, part = c / group.Size, first = group.Rank * part;
        // This rank's heads: the same rows of q, of k and of v in the fused projection.
        SliceSegment[] qkv = [new(first, part), new(c + first, part), new(2 * c + first, part)];
        c_attn = model.Register(prefix + "c_attn", new ColumnParallelLinear(full[prefix + "c_attn.weight"], full.GetValueOrDefault(prefix + "c_attn.bias"), qkv, group, model.Use));
        c_proj = model.Register(prefix + "c_proj", new RowParallelLinear(full[prefix + "c_proj.weight"], full.GetValueOrDefault(prefix + "c_proj.bias"), new SliceSegment(first, part), group, model.Use));
        _localHeads = spec.Heads / group.Size;
        _dropout = spec.Dropout;
        (_shared, _tensorParallel) = (model.SharedDropout, model.TensorParallelDropout);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        long b = x.shape[0], t = x.shape[1];
        var qkv = c_attn.forward(x);
        long part = qkv.shape[2] / 3;
        var split = qkv.split(part, dim: 2);
        Tensor Heads(Tensor z) => z.view(b, t, _localHeads, part / _localHeads).transpose(1, 2);
        var y = Attend(Heads(split[0]), Heads(split[1]), Heads(split[2]));
        y = y.transpose(1, 2).contiguous().view(b, t, part);
        return _shared.Drop(c_proj.forward(y), _dropout, training);
    }

    Tensor Attend(Tensor q, Tensor k, Tensor v)
    {
        if (!training || _dropout == 0) return F.scaled_dot_product_attention(q, k, v, is_casual: true);
        // scaled_dot_product_attention draws its dropout from the global (shared) generator: written out to draw from this rank's.
        long t = q.shape[2];
        using var causal = ones(t, t, dtype: ScalarType.Bool).tril().logical_not();
        var scores = q.matmul(k.transpose(-2, -1)).div_(Math.Sqrt(q.shape[^1])).masked_fill(causal, float.NegativeInfinity);
        return _tensorParallel.Drop(F.softmax(scores, -1), _dropout, training).matmul(v);
    }
}

/// <summary>
/// Dropout drawn from a generator of its own that each step reseeds (Megatron's RNG tracker): torch's global
/// generator is shared by every thread of the process, so its draws would depend on what else runs.
/// </summary>
sealed class DropoutStream : IDisposable
{
    Generator _generator = new(0);

    public void Reseed(long seed)
    {
        _generator.Dispose();
        _generator = new Generator((ulong)seed);
    }

    public Tensor Drop(Tensor x, double p, bool training)
    {
        if (!training || p == 0) return x;
        using var keep = rand(x.shape, generator: _generator).ge(p);
        return x.mul(keep).div_(1 - p);
    }

    public void Dispose() => _generator.Dispose();
}

/// <summary>The MLP split over the ranks: c_fc column-parallel (f before it), c_proj row-parallel (g after it).</summary>
public sealed class ParallelMlp : Module<Tensor, Tensor>
{
    readonly ColumnParallelLinear c_fc;
    readonly RowParallelLinear c_proj;
    readonly DropoutStream _shared;
    readonly double _dropout;

    internal ParallelMlp(ParallelGpt model, string prefix, IReadOnlyDictionary<string, Tensor> full, TensorParallelGroup group) : base(nameof(ParallelMlp))
    {
        long hidden = 4L * model.Spec.Embedding, part = hidden / group.Size, first = group.Rank * part;
        c_fc = model.Register(prefix + "c_fc", new ColumnParallelLinear(full[prefix + "c_fc.weight"], full.GetValueOrDefault(prefix + "c_fc.bias"), [new(first, part)], group, model.Use));
        c_proj = model.Register(prefix + "c_proj", new RowParallelLinear(full[prefix + "c_proj.weight"], full.GetValueOrDefault(prefix + "c_proj.bias"), new SliceSegment(first, part), group, model.Use));
        (_shared, _dropout) = (model.SharedDropout, model.Spec.Dropout);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => _shared.Drop(c_proj.forward(F.gelu(c_fc.forward(x))), _dropout, training);
}

/// <summary>A pre-LayerNorm block whose attention and MLP are tensor-parallel; the LayerNorms are replicated.</summary>
public sealed class ParallelBlock : Module<Tensor, Tensor>
{
    readonly LayerNorm ln_1, ln_2;
    readonly ParallelCausalSelfAttention attn;
    readonly ParallelMlp mlp;
    readonly ParameterUse _use;

    internal ParallelBlock(ParallelGpt model, string prefix, IReadOnlyDictionary<string, Tensor> full, TensorParallelGroup group) : base(nameof(ParallelBlock))
    {
        ln_1 = ParallelGpt.Replica(LayerNorm(model.Spec.Embedding, bias: model.Spec.Bias), prefix + "ln_1.", full);
        attn = new ParallelCausalSelfAttention(model, prefix + "attn.", full, group);
        ln_2 = ParallelGpt.Replica(LayerNorm(model.Spec.Embedding, bias: model.Spec.Bias), prefix + "ln_2.", full);
        mlp = new ParallelMlp(model, prefix + "mlp.", full, group);
        _use = model.Use;
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        x = x + attn.forward(_use.LayerNorm(ln_1, x));
        return x + mlp.forward(_use.LayerNorm(ln_2, x));
    }
}

/// <summary>
/// <see cref="Gpt"/> split over a tensor-parallel group, Megatron-style: the vocabulary (padded to a multiple of tp),
/// the attention heads and the MLP's hidden features are divided between the ranks; per block, two all-reduces
/// forward and two backward; the tied head and the loss are vocab-parallel (three small all-reduces, no gathered
/// logits). Every rank first builds the single process's full model from the seed and keeps its slices, so any tp
/// starts exactly where tp=1 does. Parameter names are the single-process ones.
/// With a pipeline, a rank builds only its <see cref="PipelineStage"/>: its blocks, the token embedding on the first
/// stage (with the position embedding) and on the last (the tied head), the final LayerNorm on the last.
/// </summary>
public sealed class ParallelGpt : Module<Tensor, Tensor>, ILanguageModel
{
    readonly VocabParallelEmbedding? wte;
    readonly Embedding? wpe;
    readonly ModuleList<ParallelBlock> h;
    readonly LayerNorm? ln_f;
    readonly TensorParallelGroup _group;
    readonly Dictionary<string, TensorSlice> _slices = [];

    public ParallelGpt(ModelSpec spec, int vocabSize, long seed, TensorParallelGroup group, PipelineStage? stage = null) : base(nameof(ParallelGpt))
    {
        stage ??= PipelineStage.Whole;
        Stage = stage = stage with { Layers = Math.Min(stage.Layers, spec.Layers - stage.FirstLayer) };
        if (spec.Heads % group.Size != 0 || spec.Embedding % group.Size != 0)
            throw new ConfigException($"model.n-head ({spec.Heads}) and model.n-embd ({spec.Embedding}) must be divisible by tp ({group.Size})");
        Spec = spec;
        VocabSize = vocabSize;
        _group = group;
        using var reference = new Gpt(spec, vocabSize, seed);
        var full = reference.named_parameters().ToDictionary(p => p.name, p => (Tensor)p.parameter);
        if (stage.IsFirst || stage.IsLast) wte = Register("wte", new VocabParallelEmbedding(full["wte.weight"], group, Use));
        if (stage.IsFirst) wpe = Replica(Embedding(spec.BlockSize, spec.Embedding), "wpe.", full);
        h = new ModuleList<ParallelBlock>(Enumerable.Range(stage.FirstLayer, stage.Layers).Select(i => new ParallelBlock(this, $"h.{i}.", full, group)).ToArray());
        if (stage.IsLast) ln_f = Replica(LayerNorm(spec.Embedding, bias: spec.Bias), "ln_f.", full);
        RegisterComponents();
        Parameters = named_parameters().Select(p => GlobalName((p.name, p.parameter))).Select(p => new ModelParameter(p.Name, p.Tensor, _slices.GetValueOrDefault(p.Name))).ToList();

        // The module list numbers a stage's blocks from 0; checkpoints and the optimizer know them by their place in the model.
        (string Name, Parameter Tensor) GlobalName((string name, Parameter parameter) p)
        {
            if (!p.name.StartsWith("h.", StringComparison.Ordinal)) return (p.name, p.parameter);
            int dot = p.name.IndexOf('.', 2);
            return ($"h.{int.Parse(p.name[2..dot], System.Globalization.CultureInfo.InvariantCulture) + stage.FirstLayer}{p.name[dot..]}", p.parameter);
        }
    }

    public PipelineStage Stage { get; }

    public ModelSpec Spec { get; }
    public int VocabSize { get; }
    public nn.Module Module => this;
    public ParameterUse Use { get; } = new();
    public IReadOnlyList<ModelParameter> Parameters { get; }

    /// <summary>Dropout in replicated regions (the same stream on every TP rank) and inside split ones (a stream per TP rank).</summary>
    internal DropoutStream SharedDropout { get; } = new();
    internal DropoutStream TensorParallelDropout { get; } = new();

    /// <summary>Records the slices a parallel layer holds under its parameters' global names.</summary>
    internal T Register<T>(string name, T layer) where T : Module
    {
        TensorSlice? Slice(string parameter) => layer switch
        {
            ColumnParallelLinear c => parameter == "weight" ? c.WeightSlice : c.BiasSlice,
            RowParallelLinear r => parameter == "weight" ? r.WeightSlice : null,
            VocabParallelEmbedding e => e.WeightSlice,
            _ => null,
        };
        foreach (var (parameter, _) in layer.named_parameters())
            if (Slice(parameter) is { } slice) _slices[$"{name}.{parameter}"] = slice;
        return layer;
    }

    /// <summary>A replicated module, its weights copied from the single process's.</summary>
    internal static T Replica<T>(T module, string prefix, IReadOnlyDictionary<string, Tensor> full) where T : Module
    {
        using var noGrad = no_grad();
        foreach (var (name, p) in module.named_parameters()) p.copy_(full[prefix + name]);
        return module;
    }

    public void SeedDropout(long shared, long tensorParallel)
    {
        SharedDropout.Reseed(shared);
        TensorParallelDropout.Reseed(tensorParallel);
    }

    /// <summary>This rank's columns of the logits [B, T, padded vocab / tp] (the whole model on one stage).</summary>
    public override Tensor forward(Tensor idx) => StageForward(idx);

    /// <summary>
    /// This stage's part of forward: token ids [B, T] (first stage) or the previous stage's hidden states [B, T, C] in;
    /// hidden states out, or on the last stage this rank's logits.
    /// </summary>
    public Tensor StageForward(Tensor input)
    {
        var x = input;
        if (Stage.IsFirst)
        {
            long t = input.shape[1];
            if (t > Spec.BlockSize) throw new ArgumentException($"sequence length {t} exceeds block size {Spec.BlockSize}");
            using var pos = arange(t, dtype: ScalarType.Int64, device: input.device);
            x = SharedDropout.Drop(wte!.forward(input) + Use.Embedding(wpe!, pos), Spec.Dropout, training);
        }
        foreach (var block in h) x = block.forward(x);
        return Stage.IsLast ? wte!.Logits(Use.LayerNorm(ln_f!, x)) : x;
    }

    /// <summary>Mean cross-entropy of the last stage's logits (vocab-parallel).</summary>
    public Tensor StageLoss(Tensor logits, Tensor targets)
    {
        if (!Stage.IsLast) throw new InvalidOperationException($"the loss is computed on the last stage; this is {Stage}");
        return VocabParallelCrossEntropy.Loss(logits.view(-1, logits.shape[^1]), targets.view(-1), wte!.Start, _group);
    }

    public Tensor Loss(Tensor idx, Tensor targets)
    {
        if (!Stage.IsFirst || !Stage.IsLast) throw new InvalidOperationException($"Loss needs the whole model; this is {Stage}: run the pipeline schedule");
        return StageLoss(forward(idx), targets);
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing) { SharedDropout.Dispose(); TensorParallelDropout.Dispose(); }
        base.Dispose(disposing);
    }
}
