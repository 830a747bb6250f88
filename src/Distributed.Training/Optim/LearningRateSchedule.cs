using Distributed.Core;

namespace Distributed.Training.Optim;

/// <summary>nanoGPT's get_lr: linear warm-up to the peak, cosine decay to the minimum, then the minimum.</summary>
public static class LearningRateSchedule
{
    public static double At(OptimizerSpec spec, long step)
    {
        if (step < spec.WarmupIters) return spec.LearningRate * (step + 1) / (spec.WarmupIters + 1);
        if (step > spec.DecayIters) return spec.MinLearningRate;
        double ratio = (double)(step - spec.WarmupIters) / Math.Max(1, spec.DecayIters - spec.WarmupIters);
        double coefficient = 0.5 * (1.0 + Math.Cos(Math.PI * ratio));
        return spec.MinLearningRate + coefficient * (spec.LearningRate - spec.MinLearningRate);
    }
}
