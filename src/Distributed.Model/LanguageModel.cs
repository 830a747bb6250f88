using Distributed.Core;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Distributed.Model;

/// <summary>
/// A parameter and what part of the global tensor it is: <see cref="Slice"/> null for a whole tensor, which every
/// tensor-parallel rank holds alike (LayerNorms, position embeddings, row-parallel biases). Clipping counts a
/// replicated parameter once and a sliced one on every rank; checkpoints store slices by global name and offsets.
/// </summary>
public sealed record ModelParameter(string Name, Parameter Tensor, TensorSlice? Slice)
{
    public bool IsReplicated => Slice is null;
}

/// <summary>What the trainer needs of a model, whether the single-process <see cref="Gpt"/> or a tensor-parallel one.</summary>
public interface ILanguageModel : IDisposable
{
    ModelSpec Spec { get; }
    int VocabSize { get; }

    /// <summary>The module (train/eval mode, parameters).</summary>
    nn.Module Module { get; }

    /// <summary>Every parameter use of forward goes through this (identity unless a trainer hooks it).</summary>
    ParameterUse Use { get; }

    /// <summary>The parameters in registration order, with their parallel metadata.</summary>
    IReadOnlyList<ModelParameter> Parameters { get; }

    /// <summary>Mean next-token cross-entropy (the same value on every tensor-parallel rank).</summary>
    Tensor Loss(Tensor idx, Tensor targets);

    /// <summary>
    /// Seeds the step's dropout: <paramref name="shared"/> for replicated regions (the same masks on every
    /// tensor-parallel rank), <paramref name="tensorParallel"/> for the regions split over them (a stream per rank).
    /// </summary>
    void SeedDropout(long shared, long tensorParallel);
}
