using Distributed.Core;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;
using F = TorchSharp.torch.nn.functional;

namespace Distributed.Model;

/// <summary>Causal multi-head self-attention (nanoGPT's CausalSelfAttention), fused q/k/v projection.</summary>
public sealed class CausalSelfAttention : Module<Tensor, Tensor>
{
    readonly Linear c_attn, c_proj;
    readonly Dropout resid_dropout;
    readonly int _heads;
    readonly double _dropout;

    public CausalSelfAttention(ModelSpec spec) : base(nameof(CausalSelfAttention))
    {
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
        var qkv = c_attn.forward(x).split(c, dim: 2);
        Tensor Heads(Tensor z) => z.view(b, t, _heads, c / _heads).transpose(1, 2);
        var y = F.scaled_dot_product_attention(Heads(qkv[0]), Heads(qkv[1]), Heads(qkv[2]),
            p: training ? _dropout : 0.0, is_casual: true);
        y = y.transpose(1, 2).contiguous().view(b, t, c);
        return resid_dropout.forward(c_proj.forward(y));
    }
}

/// <summary>The feed-forward part of a block: 4x expansion, GELU, projection back.</summary>
public sealed class Mlp : Module<Tensor, Tensor>
{
    readonly Linear c_fc, c_proj;
    readonly Dropout dropout;

    public Mlp(ModelSpec spec) : base(nameof(Mlp))
    {
        c_fc = Linear(spec.Embedding, 4 * spec.Embedding, hasBias: spec.Bias);
        c_proj = Linear(4 * spec.Embedding, spec.Embedding, hasBias: spec.Bias);
        dropout = Dropout(spec.Dropout);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => dropout.forward(c_proj.forward(F.gelu(c_fc.forward(x))));
}

/// <summary>A pre-LayerNorm transformer block.</summary>
public sealed class Block : Module<Tensor, Tensor>
{
    readonly LayerNorm ln_1, ln_2;
    readonly CausalSelfAttention attn;
    readonly Mlp mlp;

    public Block(ModelSpec spec) : base(nameof(Block))
    {
        ln_1 = LayerNorm(spec.Embedding, bias: spec.Bias);
        attn = new CausalSelfAttention(spec);
        ln_2 = LayerNorm(spec.Embedding, bias: spec.Bias);
        mlp = new Mlp(spec);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        x = x + attn.forward(ln_1.forward(x));
        return x + mlp.forward(ln_2.forward(x));
    }
}

/// <summary>
/// nanoGPT's GPT: token and learned position embeddings, pre-norm blocks, final LayerNorm, and an LM head tied
/// to the token embedding. Parameter names follow nanoGPT (wte, wpe, h.N..., ln_f) so checkpoints read alike.
/// </summary>
public sealed class Gpt : Module<Tensor, Tensor>
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
            h = new ModuleList<Block>(Enumerable.Range(0, spec.Layers).Select(_ => new Block(spec)).ToArray());
            ln_f = LayerNorm(spec.Embedding, bias: spec.Bias);
            RegisterComponents();
            Initialise(generator);
        }
    }

    public ModelSpec Spec { get; }
    public int VocabSize { get; }

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
        var x = drop.forward(wte.forward(idx) + wpe.forward(pos));
        foreach (var block in h) x = block.forward(x);
        return F.linear(ln_f.forward(x), wte.weight!);
    }

    /// <summary>Mean cross-entropy of next-token prediction.</summary>
    public Tensor Loss(Tensor idx, Tensor targets)
    {
        var logits = forward(idx);
        return F.cross_entropy(logits.view(-1, logits.shape[^1]), targets.view(-1));
    }
}
