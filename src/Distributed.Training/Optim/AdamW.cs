using Distributed.Core;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Distributed.Training.Optim;

/// <summary>
/// AdamW with decoupled weight decay on tensors of two or more dimensions (matrices and embeddings) only, as
/// nanoGPT configures it. Written here rather than taken from TorchSharp so the moments are plain named tensors:
/// checkpoints save them, and a later sharded optimizer can own a slice of them.
/// </summary>
public sealed class AdamW : IDisposable
{
    readonly OptimizerSpec _spec;
    readonly List<Slot> _slots;

    sealed record Slot(string Name, Parameter Param, Tensor ExpAvg, Tensor ExpAvgSq, bool Decay);

    public AdamW(IEnumerable<(string Name, Parameter Param)> parameters, OptimizerSpec spec)
    {
        _spec = spec;
        _slots = parameters.Select(p => new Slot(p.Name, p.Param,
            zeros_like(p.Param).DetachFromDisposeScope(), zeros_like(p.Param).DetachFromDisposeScope(), p.Param.dim() >= 2)).ToList();
    }

    /// <summary>Steps taken so far (Adam's bias correction depends on it).</summary>
    public long StepCount { get; set; }

    /// <summary>First and second moments by parameter name, for checkpoints.</summary>
    public IEnumerable<(string Name, Tensor ExpAvg, Tensor ExpAvgSq)> State => _slots.Select(s => (s.Name, s.ExpAvg, s.ExpAvgSq));

    public void Step(double learningRate)
    {
        StepCount++;
        double bias1 = 1 - Math.Pow(_spec.Beta1, StepCount);
        double bias2 = 1 - Math.Pow(_spec.Beta2, StepCount);
        double stepSize = learningRate / bias1;
        double bias2Sqrt = Math.Sqrt(bias2);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        foreach (var s in _slots)
        {
            var grad = s.Param.grad;
            if (grad is null) continue;
            if (s.Decay && _spec.WeightDecay != 0) s.Param.mul_(1 - learningRate * _spec.WeightDecay);
            s.ExpAvg.lerp_(grad, 1 - _spec.Beta1);
            s.ExpAvgSq.mul_(_spec.Beta2).addcmul_(grad, grad, 1 - _spec.Beta2);
            var denominator = s.ExpAvgSq.sqrt().div_(bias2Sqrt).add_(_spec.Eps);
            s.Param.addcdiv_(s.ExpAvg, denominator, -stepSize);
        }
    }

    public void Dispose()
    {
        foreach (var s in _slots) { s.ExpAvg.Dispose(); s.ExpAvgSq.Dispose(); }
    }
}
