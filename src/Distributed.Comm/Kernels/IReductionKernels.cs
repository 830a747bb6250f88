namespace Distributed.Comm.Kernels;

/// <summary>The element-wise arithmetic of a gradient all-reduce.</summary>
public interface IReductionKernels : IDisposable
{
    string Name { get; }

    /// <summary>What runs the arithmetic, for logs (ILGPU adds its accelerator).</summary>
    string Description => Name;

    /// <summary>accumulator[i] += chunk[i]; both spans have the same length.</summary>
    void Accumulate(Span<float> accumulator, ReadOnlySpan<float> chunk);

    /// <summary>data[i] *= factor.</summary>
    void Scale(Span<float> data, float factor);

    /// <summary>Rounds each float to bfloat16 (nearest, ties to even; NaN stays NaN, overflow becomes infinity).</summary>
    void ToBFloat16(ReadOnlySpan<float> source, Span<ushort> destination);

    /// <summary>Widens bfloat16 values to float (exact).</summary>
    void FromBFloat16(ReadOnlySpan<ushort> source, Span<float> destination);
}
