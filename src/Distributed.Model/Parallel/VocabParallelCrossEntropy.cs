using Distributed.Comm;
using TorchSharp;
using static TorchSharp.torch;

namespace Distributed.Model.Parallel;

/// <summary>
/// Mean cross-entropy over logits whose vocabulary is split across the tensor-parallel ranks, without gathering
/// them (Megatron's vocab-parallel loss): three small all-reduces of one float per token (the maximum logit, the
/// target's logit, the sum of exponentials), and a backward that needs none (softmax minus one-hot, local).
/// </summary>
public static class VocabParallelCrossEntropy
{
    /// <param name="logits">[N, perRank] this rank's columns</param>
    /// <param name="targets">[N] global vocabulary ids</param>
    /// <param name="start">the global id of this rank's first column</param>
    public static Tensor Loss(Tensor logits, Tensor targets, long start, TensorParallelGroup group) =>
        Function.apply(logits, targets, group, start);

    sealed class Function : autograd.SingleTensorFunction<Function>
    {
        public override string Name => nameof(VocabParallelCrossEntropy);

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var (logits, targets, group, start) = ((Tensor)vars[0], (Tensor)vars[1], (TensorParallelGroup)vars[2], (long)vars[3]);
            long perRank = logits.shape[1];
            var max = logits.amax([1]).contiguous();
            group.AllReduce(max, ReduceOp.Max);
            var shifted = logits - max.unsqueeze(1);

            var local = targets - start;
            var outside = local.lt(0).logical_or(local.ge(perRank));
            var index = local.masked_fill(outside, 0).unsqueeze(1);
            var targetLogit = shifted.gather(1, index).squeeze(1).masked_fill(outside, 0).contiguous();
            group.AllReduce(targetLogit, ReduceOp.Sum);

            var exp = shifted.exp();
            var sumExp = exp.sum(1).contiguous();
            group.AllReduce(sumExp, ReduceOp.Sum);

            ctx.save_for_backward([exp.div_(sumExp.unsqueeze(1)), index, outside.logical_not().to_type(ScalarType.Float32).unsqueeze(1)]);
            return (sumExp.log() - targetLogit).mean();
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad)
        {
            var saved = ctx.get_saved_variables();
            var (softmax, index, inside) = (saved[0], saved[1], saved[2]);
            // d(mean loss)/d(logit) = (softmax - onehot(target)) / N; the one-hot only where this rank owns the target.
            var gradient = softmax.scatter_add(1, index, inside.neg()).mul_(grad / softmax.shape[0]);
            return [gradient, null!, null!, null!];
        }
    }
}
