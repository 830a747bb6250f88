namespace Distributed.Comm.Kernels;

/// <summary>Plain loops: the reference the other kernels are tested against.</summary>
public sealed class ScalarReductionKernels : IReductionKernels
{
    public string Name => "scalar";

    public void Accumulate(Span<float> accumulator, ReadOnlySpan<float> chunk)
    {
        ReductionKernels.CheckSameLength(accumulator.Length, chunk.Length);
        for (var i = 0; i < accumulator.Length; i++) accumulator[i] += chunk[i];
    }

    public void Scale(Span<float> data, float factor)
    {
        for (var i = 0; i < data.Length; i++) data[i] *= factor;
    }

    public void ToBFloat16(ReadOnlySpan<float> source, Span<ushort> destination)
    {
        ReductionKernels.CheckDestination(source.Length, destination.Length);
        for (var i = 0; i < source.Length; i++) destination[i] = ToBFloat16(source[i]);
    }

    public void FromBFloat16(ReadOnlySpan<ushort> source, Span<float> destination)
    {
        ReductionKernels.CheckDestination(source.Length, destination.Length);
        for (var i = 0; i < source.Length; i++) destination[i] = FromBFloat16(source[i]);
    }

    /// <summary>Round to nearest even. A NaN keeps its sign and top payload bits, with the quiet bit set so that
    /// a payload living only in the dropped low bits cannot turn it into infinity.</summary>
    public static ushort ToBFloat16(float value)
    {
        var bits = BitConverter.SingleToUInt32Bits(value);
        if ((bits & 0x7FFF_FFFFu) > 0x7F80_0000u) return (ushort)((bits >> 16) | 0x0040u);
        // Adding 0x7FFF plus the kept LSB rounds ties to even; it carries into the exponent when needed
        // (up to infinity for values past bf16's largest finite one), and cannot overflow 32 bits.
        return (ushort)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    }

    public static float FromBFloat16(ushort value) => BitConverter.UInt32BitsToSingle((uint)value << 16);

    public void Dispose() { }
}
