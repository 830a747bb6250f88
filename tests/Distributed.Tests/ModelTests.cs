using Distributed.Core;
using Distributed.Model;
using static TorchSharp.torch;

namespace Distributed.Tests;

public class ModelTests
{
    static readonly ModelSpec Small = new(Layers: 2, Heads: 2, Embedding: 32, BlockSize: 16, Dropout: 0.0, Bias: false);

    [Fact]
    public void ChangingLaterTokensLeavesEarlierLogitsUnchanged()
    {
        using var model = new Gpt(Small, vocabSize: 11, seed: 3);
        model.eval();
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var tokens = arange(16, dtype: ScalarType.Int64).remainder(11).view(1, 16);
        var before = model.forward(tokens);
        for (int t = 0; t < 15; t++)
        {
            var changed = tokens.clone();
            changed[0, TensorIndex.Slice(t + 1)] = (changed[0, TensorIndex.Slice(t + 1)] + 5).remainder(11);
            var after = model.forward(changed);
            Assert.True(before[0, TensorIndex.Slice(0, t + 1)].allclose(after[0, TensorIndex.Slice(0, t + 1)], rtol: 0, atol: 1e-6),
                $"logits at positions <= {t} changed when tokens after {t} changed");
            Assert.False(before[0, t + 1].allclose(after[0, t + 1], rtol: 0, atol: 1e-6), $"position {t + 1} ignored its own token");
        }
    }

    [Fact]
    public void ParameterCountMatchesNanoGpt()
    {
        // nanoGPT reports 0.80M for this recipe (its count excludes position embeddings: 804,096 - 64*128).
        using var model = new Gpt(new ModelSpec(4, 4, 128, 64, 0.0, false), vocabSize: 65, seed: 1);
        Assert.Equal(804_096, model.parameters().Sum(p => p.numel()));
    }

    [Fact]
    public void InitialisationFollowsNanoGpt()
    {
        using var model = new Gpt(new ModelSpec(4, 4, 128, 64, 0.0, true), vocabSize: 65, seed: 1);
        var p = model.named_parameters().ToDictionary(x => x.name, x => x.parameter);
        Assert.InRange(p["h.0.mlp.c_fc.weight"].std().item<float>(), 0.019, 0.021);
        Assert.InRange(p["h.0.mlp.c_proj.weight"].std().item<float>(), 0.02 / Math.Sqrt(8) * 0.95, 0.02 / Math.Sqrt(8) * 1.05);
        Assert.Equal(0f, p["h.0.mlp.c_fc.bias"].abs().max().item<float>());
        Assert.Equal(1f, p["h.0.ln_1.weight"].min().item<float>());
    }

    [Fact]
    public void TheLmHeadIsTiedToTheTokenEmbedding()
    {
        using var model = new Gpt(Small, vocabSize: 11, seed: 3);
        Assert.DoesNotContain(model.named_parameters(), p => p.name.Contains("lm_head"));
        using var x = zeros(1, 4, dtype: ScalarType.Int64);
        Assert.Equal(11, model.forward(x).shape[^1]);
    }

    [Fact]
    public void SameSeedSameWeights()
    {
        using var a = new Gpt(Small, 11, seed: 7);
        using var b = new Gpt(Small, 11, seed: 7);
        using var c = new Gpt(Small, 11, seed: 8);
        Assert.All(a.parameters().Zip(b.parameters()), pair => Assert.True(pair.Item1.bytes.SequenceEqual(pair.Item2.bytes)));
        Assert.False(a.parameters().First().bytes.SequenceEqual(c.parameters().First().bytes));
    }

    [Fact]
    public void GreedyGenerationIsDeterministic()
    {
        using var model = new Gpt(Small, 11, seed: 3);
        var first = TextGeneration.Generate(model, [1, 2, 3], 20, temperature: 1.0, seed: 5);
        Assert.Equal(first, TextGeneration.Generate(model, [1, 2, 3], 20, temperature: 1.0, seed: 5));
        Assert.Equal(23, first.Count);
    }
}
