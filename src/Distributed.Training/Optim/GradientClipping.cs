using TorchSharp;
using static TorchSharp.torch;

namespace Distributed.Training.Optim;

public static class GradientClipping
{
    /// <summary>
    /// The L2 norm over all gradients together. With sharded parameters each rank passes its squared partial sum
    /// through <paramref name="reduceSquaredNorm"/> so every rank clips by the same global norm.
    /// </summary>
    public static double GlobalNorm(IEnumerable<Tensor> parameters, Func<double, double>? reduceSquaredNorm = null)
    {
        using var scope = NewDisposeScope();
        double squared = 0;
        foreach (var p in parameters)
        {
            var g = p.grad;
            if (g is null) continue;
            squared += g.to_type(ScalarType.Float64).square().sum().item<double>();
        }
        if (reduceSquaredNorm is not null) squared = reduceSquaredNorm(squared);
        return Math.Sqrt(squared);
    }

    /// <summary>Scales gradients so their global norm is at most <paramref name="maxNorm"/>; returns the norm before clipping.</summary>
    /// <param name="countedInNorm">the parameters whose gradients make up the norm (default: all): under tensor
    /// parallelism a rank counts its slices and, on one rank only, the replicated parameters</param>
    public static double ClipByGlobalNorm(IEnumerable<Tensor> parameters, double maxNorm, Func<double, double>? reduceSquaredNorm = null,
        IEnumerable<Tensor>? countedInNorm = null)
    {
        var list = parameters.ToList();
        double norm = GlobalNorm(countedInNorm ?? list, reduceSquaredNorm);
        if (maxNorm <= 0) return norm;
        double coefficient = maxNorm / (norm + 1e-6);
        if (coefficient < 1)
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            foreach (var p in list) p.grad?.mul_(coefficient);
        }
        return norm;
    }
}
