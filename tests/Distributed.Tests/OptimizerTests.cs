using Distributed.Core;
using Distributed.Training.Optim;
using AdamW = Distributed.Training.Optim.AdamW;
using Parameter = TorchSharp.Modules.Parameter;
using static TorchSharp.torch;

namespace Distributed.Tests;

public class OptimizerTests
{
    static readonly OptimizerSpec Recipe = new(1e-3, 1e-4, 100, 2000, 0.9, 0.99, 1e-8, 0.1, 1.0);

    [Theory]
    [InlineData(0, 1e-3 * 1 / 101)]
    [InlineData(49, 1e-3 * 50 / 101)]
    [InlineData(99, 1e-3 * 100 / 101)]
    [InlineData(100, 1e-3)]
    [InlineData(1050, 5.5e-4)]
    [InlineData(2000, 1e-4)]
    [InlineData(2500, 1e-4)]
    public void LearningRateAtKnownSteps(long step, double expected)
    {
        Assert.Equal(expected, LearningRateSchedule.At(Recipe, step), 12);
    }

    [Fact]
    public void OneAdamWStepMatchesTheHandComputedValue()
    {
        var spec = Recipe with { WeightDecay = 0.1 };
        double lr = 0.1;
        float[] w = [1.0f, -2.0f, 0.5f, 3.0f];
        float[] g = [0.5f, -0.25f, 2.0f, 0.0f];
        using var matrix = new Parameter(tensor(w, [2, 2]));
        using var bias = new Parameter(tensor(w, [4]));
        matrix.grad = tensor(g, [2, 2]);
        bias.grad = tensor(g, [4]);
        using var adam = new AdamW([("matrix", matrix), ("bias", bias)], spec);
        adam.Step(lr);

        // Step 1: m = (1-b1) g, v = (1-b2) g^2, so m/(1-b1) = g and sqrt(v/(1-b2)) = |g|:
        // w' = w (1 - lr wd) - lr g / (|g| + eps); no decay for the 1-D tensor.
        for (int i = 0; i < 4; i++)
        {
            double update = lr * g[i] / (Math.Abs(g[i]) + 1e-8);
            Assert.Equal(w[i] * (1 - lr * 0.1) - update, matrix.data<float>()[i], 5);
            Assert.Equal(w[i] - update, bias.data<float>()[i], 5);
        }
    }

    [Fact]
    public void AdamWMatchesAScalarReferenceOverSeveralSteps()
    {
        var spec = Recipe;
        double[] w = [0.3, -0.7, 1.1, 0.05, -0.2, 0.9];
        using var p = new Parameter(tensor(w.Select(x => (float)x).ToArray(), [2, 3]));
        using var adam = new AdamW([("p", p)], spec);
        double[] m = new double[6], v = new double[6];
        for (int step = 1; step <= 4; step++)
        {
            double[] g = w.Select((x, i) => Math.Sin(step * 1.7 + i) * 0.3).ToArray();
            p.grad = tensor(g.Select(x => (float)x).ToArray(), [2, 3]);
            double lr = 1e-2 * step;
            adam.Step(lr);
            for (int i = 0; i < 6; i++)
            {
                m[i] = spec.Beta1 * m[i] + (1 - spec.Beta1) * g[i];
                v[i] = spec.Beta2 * v[i] + (1 - spec.Beta2) * g[i] * g[i];
                double mHat = m[i] / (1 - Math.Pow(spec.Beta1, step)), vHat = v[i] / (1 - Math.Pow(spec.Beta2, step));
                w[i] = w[i] * (1 - lr * spec.WeightDecay) - lr * mHat / (Math.Sqrt(vHat) + spec.Eps);
            }
        }
        var actual = p.data<float>().ToArray();
        for (int i = 0; i < 6; i++) Assert.Equal(w[i], actual[i], 5);
        Assert.Equal(4, adam.StepCount);
    }

    [Fact]
    public void ClippingScalesToTheGlobalNorm()
    {
        using var a = new Parameter(zeros(2));
        using var b = new Parameter(zeros(1));
        a.grad = tensor(new float[] { 3, 0 });
        b.grad = tensor(new float[] { 4 });
        double norm = GradientClipping.ClipByGlobalNorm([a, b], maxNorm: 1.0);
        Assert.Equal(5.0, norm, 6);
        Assert.Equal(0.6f, a.grad!.data<float>()[0], 5);
        Assert.Equal(0.8f, b.grad!.data<float>()[0], 5);
        Assert.Equal(1.0, GradientClipping.GlobalNorm([a, b]), 5);
    }

    [Fact]
    public void ClippingLeavesSmallGradientsAlone()
    {
        using var a = new Parameter(zeros(2));
        a.grad = tensor(new float[] { 0.3f, 0.4f });
        Assert.Equal(0.5, GradientClipping.ClipByGlobalNorm([a], maxNorm: 1.0), 6);
        Assert.Equal(new[] { 0.3f, 0.4f }, a.grad!.data<float>().ToArray());
    }

    [Fact]
    public void ClippingUsesTheReducedNormAcrossShards()
    {
        using var a = new Parameter(zeros(1));
        a.grad = tensor(new float[] { 3 });
        // Another shard holds a gradient of 4: the global norm is 5, so this shard scales by 1/5.
        double norm = GradientClipping.ClipByGlobalNorm([a], 1.0, squared => squared + 16);
        Assert.Equal(5.0, norm, 6);
        Assert.Equal(0.6f, a.grad!.data<float>()[0], 5);
    }
}
