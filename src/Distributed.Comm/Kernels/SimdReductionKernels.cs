using System.Numerics.Tensors;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace Distributed.Comm.Kernels;

/// <summary>TensorPrimitives for the arithmetic, Vector256/Vector128 bit manipulation for bfloat16.</summary>
public sealed class SimdReductionKernels : IReductionKernels
{
    public string Name => "simd";

    public void Accumulate(Span<float> accumulator, ReadOnlySpan<float> chunk)
    {
        ReductionKernels.CheckSameLength(accumulator.Length, chunk.Length);
        TensorPrimitives.Add(accumulator, chunk, accumulator); // in place is allowed: same start
    }

    public void Scale(Span<float> data, float factor) => TensorPrimitives.Multiply(data, factor, data);

    public void ToBFloat16(ReadOnlySpan<float> source, Span<ushort> destination)
    {
        ReductionKernels.CheckDestination(source.Length, destination.Length);
        var src = MemoryMarshal.Cast<float, uint>(source);
        var i = 0;
        if (Vector256.IsHardwareAccelerated)
            for (; i <= src.Length - 2 * Vector256<uint>.Count; i += 2 * Vector256<uint>.Count)
                Vector256.Narrow(ToBFloat16(Vector256.Create(src.Slice(i))),
                        ToBFloat16(Vector256.Create(src.Slice(i + Vector256<uint>.Count))))
                    .CopyTo(destination.Slice(i));
        if (Vector128.IsHardwareAccelerated)
            for (; i <= src.Length - 2 * Vector128<uint>.Count; i += 2 * Vector128<uint>.Count)
                Vector128.Narrow(ToBFloat16(Vector128.Create(src.Slice(i))),
                        ToBFloat16(Vector128.Create(src.Slice(i + Vector128<uint>.Count))))
                    .CopyTo(destination.Slice(i));
        for (; i < src.Length; i++) destination[i] = ScalarReductionKernels.ToBFloat16(source[i]);
    }

    public void FromBFloat16(ReadOnlySpan<ushort> source, Span<float> destination)
    {
        ReductionKernels.CheckDestination(source.Length, destination.Length);
        var dst = MemoryMarshal.Cast<float, uint>(destination);
        var i = 0;
        if (Vector256.IsHardwareAccelerated)
            for (; i <= source.Length - Vector256<ushort>.Count; i += Vector256<ushort>.Count)
            {
                var (lower, upper) = Vector256.Widen(Vector256.Create(source.Slice(i)));
                (lower << 16).CopyTo(dst.Slice(i));
                (upper << 16).CopyTo(dst.Slice(i + Vector256<uint>.Count));
            }
        if (Vector128.IsHardwareAccelerated)
            for (; i <= source.Length - Vector128<ushort>.Count; i += Vector128<ushort>.Count)
            {
                var (lower, upper) = Vector128.Widen(Vector128.Create(source.Slice(i)));
                (lower << 16).CopyTo(dst.Slice(i));
                (upper << 16).CopyTo(dst.Slice(i + Vector128<uint>.Count));
            }
        for (; i < source.Length; i++) destination[i] = ScalarReductionKernels.FromBFloat16(source[i]);
    }

    // Same arithmetic as ScalarReductionKernels.ToBFloat16, lane-wise; the result is in the low 16 bits of each lane.
    private static Vector256<uint> ToBFloat16(Vector256<uint> bits)
    {
        var rounded = (bits + Vector256.Create(0x7FFFu) + ((bits >> 16) & Vector256<uint>.One)) >> 16;
        // Masked magnitudes are below 2^31, so a signed compare is exact and avoids emulating an unsigned one.
        var isNaN = Vector256.GreaterThan((bits & Vector256.Create(0x7FFF_FFFFu)).AsInt32(), Vector256.Create(0x7F80_0000)).AsUInt32();
        return Vector256.ConditionalSelect(isNaN, (bits >> 16) | Vector256.Create(0x0040u), rounded);
    }

    private static Vector128<uint> ToBFloat16(Vector128<uint> bits)
    {
        var rounded = (bits + Vector128.Create(0x7FFFu) + ((bits >> 16) & Vector128<uint>.One)) >> 16;
        var isNaN = Vector128.GreaterThan((bits & Vector128.Create(0x7FFF_FFFFu)).AsInt32(), Vector128.Create(0x7F80_0000)).AsUInt32();
        return Vector128.ConditionalSelect(isNaN, (bits >> 16) | Vector128.Create(0x0040u), rounded);
    }

    public void Dispose() { }
}
