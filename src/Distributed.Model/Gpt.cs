using Distributed.Core;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;
using F = TorchSharp.torch.nn.functional;

namespace Distributed.Model;

/// <summary>
/// Where forward uses a parameter. Identity unless a trainer sets <see cref="Hook"/>: TorchSharp has no gradient
/// hooks, so a data-parallel trainer passes each use through an identity autograd function whose backward receives
/// that use's gradient the moment backward produces it (and starts the all-reduce of a bucket that is complete).
/// </summary>
public sealed class ParameterUse
{
    public Func<Tensor, Tensor>? Hook { get; set; }

    public Tensor this[Tensor parameter] => Hook is null ? parameter : Hook(parameter);

    /// <summary>A parameter a layer may lack (a bias when model.bias is off).</summary>
    public Tensor? Optional(Tensor? parameter) => parameter is null ? null : this[parameter];

    /// <summary>y = x W^T + b with both parameters passed through the hook.</summary>
    public Tensor Linear(Linear layer, Tensor x) => F.linear(x, this[layer.weight!], Optional(layer.bias));

    public Tensor LayerNorm(LayerNorm layer, Tensor x) =>
        F.layer_norm(x, [x.shape[^1]], Optional(layer.weight), Optional(layer.bias));

    /// <summary>Rows of an embedding table (the lookup nn.Embedding does, written with the table passed through the hook).</summary>
    public Tensor Embedding(Embedding table, Tensor ids)
    {
        var weight = this[table.weight!];
        return weight.index_select(0, ids.reshape(-1)).view([.. ids.shape, weight.shape[1]]);
    }
}

/// <summary>Causal multi-head self-attention (nanoGPT's CausalSelfAttention), fused q/k/v projection.</summary>
public sealed class CausalSelfAttention : Module<Tensor, Tensor>
{
    readonly Linear c_attn, c_proj;
    readonly Dropout resid_dropout;
    readonly int _heads;
    readonly double _dropout;
    readonly ParameterUse use;

    public CausalSelfAttention(ModelSpec spec, ParameterUse use) : base(nameof(CausalSelfAttention))
    {
        this.use = use;
        c_attn = Linear(spec.Embedding, 3 * spec.Embedding, hasBias: spec.Bias);
        c_proj = Linear(spec.Embedding, spec.Embedding, hasBias: spec.Bias);
        resid_dropout = Dropout(spec.Dropout);
        _heads = spec.Heads;
        _dropout = spec.Dropout;
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        long b = x.shape[0], t = x.shape[1], c = x.shape[2];
        var qkv = use.Linear(c_attn, x).split(c, dim: 2);
        Tensor Heads(Tensor z) => z.view(b, t, _heads, c / _heads).transpose(1, 2);
        var y = F.scaled_dot_product_attention(Heads(qkv[0]), Heads(qkv[1]), Heads(qkv[2]),
            p: training ? _dropout : 0.0, is_casual: true);
        y = y.transpose(1, 2).contiguous().view(b, t, c);
        return resid_dropout.forward(use.Linear(c_proj, y));
    }
}

/// <summary>The feed-forward part of a block: 4x expansion, GELU, projection back.</summary>
public sealed class Mlp : Module<Tensor, Tensor>
{
    readonly Linear c_fc, c_proj;
    readonly Dropout dropout;
    readonly ParameterUse use;

    public Mlp(ModelSpec spec, ParameterUse use) : base(nameof(Mlp))
    {
        this.use = use;
        c_fc = Linear(spec.Embedding, 4 * spec.Embedding, hasBias: spec.Bias);
        c_proj = Linear(4 * spec.Embedding, spec.Embedding, hasBias: spec.Bias);
        dropout = Dropout(spec.Dropout);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => dropout.forward(use.Linear(c_proj, F.gelu(use.Linear(c_fc, x))));
}

/// <summary>A pre-LayerNorm transformer block.</summary>
public sealed class Block : Module<Tensor, Tensor>
{
    readonly LayerNorm ln_1, ln_2;
    readonly CausalSelfAttention attn;
    readonly Mlp mlp;
    readonly ParameterUse use;

    public Block(ModelSpec spec, ParameterUse use) : base(nameof(Block))
    {
        this.use = use;
        ln_1 = LayerNorm(spec.Embedding, bias: spec.Bias);
        attn = new CausalSelfAttention(spec, use);
        ln_2 = LayerNorm(spec.Embedding, bias: spec.Bias);
        mlp = new Mlp(spec, use);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        x = x + attn.forward(use.LayerNorm(ln_1, x));
        return x + mlp.forward(use.LayerNorm(ln_2, x));
    }
}

/// <summary>
/// nanoGPT's GPT: token and learned position embeddings, pre-norm blocks, final LayerNorm, and an LM head tied
/// to the token embedding. Parameter names follow nanoGPT (wte, wpe, h.N..., ln_f) so checkpoints read alike.
/// </summary>
public sealed class Gpt : Module<Tensor, Tensor>, ILanguageModel
{
    readonly Embedding wte, wpe;
    readonly ModuleList<Block> h;
    readonly LayerNorm ln_f;
    readonly Dropout drop;

    public Gpt(ModelSpec spec, int vocabSize, long seed) : base(nameof(Gpt))
    {
        Spec = spec;
        VocabSize = vocabSize;
        // Initial weights are a pure function of the seed, so every data-parallel rank builds the same model.
        using (var generator = new Generator((ulong)seed))
        {
            wte = Embedding(vocabSize, spec.Embedding);
            wpe = Embedding(spec.BlockSize, spec.Embedding);
            drop = Dropout(spec.Dropout);
            h = new ModuleList<Block>(Enumerable.Range(0, spec.Layers).Select(_ => new Block(spec, Use)).ToArray());
            ln_f = LayerNorm(spec.Embedding, bias: spec.Bias);
            RegisterComponents();
            Initialise(generator);
        }
    }

    public ModelSpec Spec { get; }
    public int VocabSize { get; }
    public nn.Module Module => this;

    public IReadOnlyList<ModelParameter> Parameters => named_parameters().Select(p => new ModelParameter(p.name, p.parameter, null)).ToList();

    /// <summary>One process: every dropout draws from torch's global generator.</summary>
    public void SeedDropout(long shared, long tensorParallel) => manual_seed(shared);

    /// <summary>Every parameter use of forward goes through this (identity unless a trainer hooks it).</summary>
    public ParameterUse Use { get; } = new();

    /// <summary>nanoGPT's init: N(0, 0.02) for linear and embedding weights, zero biases, and N(0, 0.02/sqrt(2L))
    /// for the projections that write into the residual stream.</summary>
    void Initialise(Generator generator)
    {
        using var _ = no_grad();
        double residualStd = 0.02 / Math.Sqrt(2.0 * Spec.Layers);
        foreach (var (name, p) in named_parameters())
        {
            bool isWeight = name.EndsWith(".weight", StringComparison.Ordinal);
            bool isLayerNorm = name.Contains("ln_", StringComparison.Ordinal);
            if (isLayerNorm) continue;
            if (!isWeight) { p.zero_(); continue; }
            double std = name.EndsWith("c_proj.weight", StringComparison.Ordinal) ? residualStd : 0.02;
            // Drawn with randn from our own generator: init.normal_ ignores the generator in TorchSharp 0.107.
            using var draw = randn(p.shape, generator: generator);
            p.copy_(draw.mul_(std));
        }
    }

    /// <summary>Logits [B, T, vocab] for token ids [B, T].</summary>
    public override Tensor forward(Tensor idx)
    {
        long t = idx.shape[1];
        if (t > Spec.BlockSize) throw new ArgumentException($"sequence length {t} exceeds block size {Spec.BlockSize}");
        using var pos = arange(t, dtype: ScalarType.Int64, device: idx.device);
        var x = drop.forward(Use.Embedding(wte, idx) + Use.Embedding(wpe, pos));
        foreach (var block in h) x = block.forward(x);
        return F.linear(Use.LayerNorm(ln_f, x), Use[wte.weight!]);
    }

    /// <summary>Mean cross-entropy of next-token prediction.</summary>
    public Tensor Loss(Tensor idx, Tensor targets)
    {
        var logits = forward(idx);
        return F.cross_entropy(logits.view(-1, logits.shape[^1]), targets.view(-1));
    }
}
