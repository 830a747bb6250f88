using Distributed.Comm;
using TorchSharp;
using static TorchSharp.torch;

namespace Distributed.Model.Parallel;

/// <summary>
/// Megatron's conjugate communication operators, as autograd functions. f (<see cref="CopyToTensorParallelRegion"/>)
/// enters a tensor-parallel region: identity forward, all-reduce of the gradient backward (each rank's part of the
/// region contributed a part of the input's gradient). g (<see cref="ReduceFromTensorParallelRegion"/>) leaves it:
/// all-reduce forward (each rank computed a partial sum), identity backward. Layers call them by name in forward.
/// </summary>
public static class Mappings
{
    public static Tensor CopyToTensorParallelRegion(Tensor x, TensorParallelGroup group) =>
        group.Size == 1 ? x : CopyToRegion.apply(x, group);

    public static Tensor ReduceFromTensorParallelRegion(Tensor x, TensorParallelGroup group) =>
        group.Size == 1 ? x : ReduceFromRegion.apply(x, group);

    sealed class CopyToRegion : autograd.SingleTensorFunction<CopyToRegion>
    {
        public override string Name => nameof(CopyToRegion);

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            ctx.save_data("group", vars[1]);
            return ((Tensor)vars[0]).alias();
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad)
        {
            var summed = grad.contiguous().clone();
            ((TensorParallelGroup)ctx.get_data("group")).AllReduceInBackward(summed, ReduceOp.Sum);
            return [summed, null!];
        }
    }

    sealed class ReduceFromRegion : autograd.SingleTensorFunction<ReduceFromRegion>
    {
        public override string Name => nameof(ReduceFromRegion);

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var summed = ((Tensor)vars[0]).contiguous().clone();
            ((TensorParallelGroup)vars[1]).AllReduce(summed, ReduceOp.Sum);
            return summed;
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad) => [grad, null!];
    }
}
