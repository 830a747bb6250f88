using Distributed.Core;
using static TorchSharp.torch;

namespace Distributed.Training.Checkpoints;

/// <summary>One tensor of the training state under its global name; <see cref="Slice"/> says which part of it this rank holds (null: all of it).</summary>
public sealed record StateEntry(string Name, Tensor Tensor, TensorSlice? Slice = null);
