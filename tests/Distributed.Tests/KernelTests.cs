using System.Runtime.InteropServices;
using Distributed.Comm.Kernels;

namespace Distributed.Tests;

public class KernelTests : IClassFixture<KernelTests.Kernels>
{
    /// <summary>One instance of each kernel set for the whole class (ILGPU's context is slow to create).</summary>
    public sealed class Kernels : IDisposable
    {
        readonly Dictionary<string, IReductionKernels> _byName = ReductionKernels.Names.ToDictionary(n => n, ReductionKernels.Create);
        public IReductionKernels this[string name] => _byName[name];
        public void Dispose() { foreach (var k in _byName.Values) k.Dispose(); }
    }

    readonly Kernels _kernels;
    readonly IReductionKernels _reference;

    public KernelTests(Kernels kernels) { _kernels = kernels; _reference = kernels["scalar"]; }

    static readonly int[] Sizes = [0, 1, 7, 1000, (1 << 20) + 3];

    public static TheoryData<string, int> OptimizedBySize()
    {
        var data = new TheoryData<string, int>();
        foreach (var name in new[] { "simd", "ilgpu" })
            foreach (var size in Sizes) data.Add(name, size);
        return data;
    }

    // Finite values over a wide range of magnitudes, signs and both zeros' neighbourhoods.
    static float[] RandomFloats(int length, int seed)
    {
        var random = new Random(seed);
        return Enumerable.Range(0, length).Select(_ => MathF.ScaleB(random.NextSingle() * 2 - 1, random.Next(-30, 30))).ToArray();
    }

    // Every bit pattern is possible: NaNs, infinities, subnormals included.
    static float[] RandomBits(int length, int seed)
    {
        var bits = new uint[length];
        new Random(seed).NextBytes(MemoryMarshal.AsBytes(bits.AsSpan()));
        return MemoryMarshal.Cast<uint, float>(bits).ToArray();
    }

    static void AssertSameBits<T>(ReadOnlySpan<T> expected, ReadOnlySpan<T> actual) where T : unmanaged
    {
        var e = MemoryMarshal.AsBytes(expected);
        var a = MemoryMarshal.AsBytes(actual);
        Assert.Equal(e.Length, a.Length);
        var mismatch = e.CommonPrefixLength(a);
        if (mismatch < e.Length)
        {
            var i = mismatch / Marshal.SizeOf<T>();
            Assert.Fail($"element {i} of {expected.Length}: expected {expected[i]}, got {actual[i]}");
        }
    }

    [Theory]
    [MemberData(nameof(OptimizedBySize))]
    public void AccumulateMatchesTheReference(string name, int size)
    {
        var chunk = RandomFloats(size, 2);
        var expected = RandomFloats(size, 1);
        var actual = expected.ToArray();
        _reference.Accumulate(expected, chunk);
        _kernels[name].Accumulate(actual, chunk);
        AssertSameBits<float>(expected, actual);
    }

    [Theory]
    [MemberData(nameof(OptimizedBySize))]
    public void ScaleMatchesTheReference(string name, int size)
    {
        var expected = RandomFloats(size, 3);
        var actual = expected.ToArray();
        _reference.Scale(expected, 1f / 3);
        _kernels[name].Scale(actual, 1f / 3);
        AssertSameBits<float>(expected, actual);
    }

    [Theory]
    [MemberData(nameof(OptimizedBySize))]
    public void ToBFloat16MatchesTheReference(string name, int size)
    {
        var source = RandomBits(size, 4);
        var expected = new ushort[size];
        var actual = new ushort[size];
        _reference.ToBFloat16(source, expected);
        _kernels[name].ToBFloat16(source, actual);
        AssertSameBits<ushort>(expected, actual);
    }

    [Theory]
    [MemberData(nameof(OptimizedBySize))]
    public void FromBFloat16MatchesTheReference(string name, int size)
    {
        var source = new ushort[size];
        new Random(5).NextBytes(MemoryMarshal.AsBytes(source.AsSpan()));
        var expected = new float[size];
        var actual = new float[size];
        _reference.FromBFloat16(source, expected);
        _kernels[name].FromBFloat16(source, actual);
        AssertSameBits<float>(expected, actual);
    }

    [Theory]
    [InlineData("scalar")]
    [InlineData("simd")]
    [InlineData("ilgpu")]
    public void EveryBFloat16ValueRoundTripsExactly(string name)
    {
        var all = Enumerable.Range(0, 1 << 16).Select(i => (ushort)i).ToArray();
        var widened = new float[all.Length];
        var back = new ushort[all.Length];
        _kernels[name].FromBFloat16(all, widened);
        _kernels[name].ToBFloat16(widened, back);
        for (var i = 0; i < all.Length; i++)
        {
            Assert.Equal(BitConverter.UInt32BitsToSingle((uint)i << 16), widened[i]); // widening is exact
            if (float.IsNaN(widened[i])) Assert.Equal(all[i] | 0x0040, back[i]);   // NaN stays NaN, quieted
            else Assert.Equal(all[i], back[i]);
        }
    }

    [Theory]
    [InlineData("scalar")]
    [InlineData("simd")]
    [InlineData("ilgpu")]
    public void ToBFloat16RoundsToNearestEvenAndKeepsSpecialValues(string name)
    {
        (uint Float, ushort BFloat16)[] cases =
        [
            (0x3F80_0000, 0x3F80), // 1.0, exact
            (0x3F80_8000, 0x3F80), // tie between 1.0 and the next value: to the even one below
            (0x3F81_8000, 0x3F82), // tie with an odd lower neighbour: up to the even one
            (0x3F80_7FFF, 0x3F80), // just below a tie
            (0x3F80_8001, 0x3F81), // just above a tie
            (0xBF81_8000, 0xBF82), // negative tie: same magnitude rule
            (0x3FFF_8000, 0x4000), // tie that carries into the exponent
            (0x0001_8000, 0x0002), // subnormal tie
            (0x0000_8000, 0x0000), // smallest tie rounds to zero
            (0x8000_0000, 0x8000), // -0
            (0x7F7F_7FFF, 0x7F7F), // just below the tie above bf16's largest finite value
            (0x7F7F_FFFF, 0x7F80), // float.MaxValue overflows to +inf
            (0x7F80_0000, 0x7F80), // +inf
            (0xFF80_0000, 0xFF80), // -inf
            (0x7FC0_0000, 0x7FC0), // quiet NaN
            (0xFFC0_0000, 0xFFC0), // float.NaN (negative quiet NaN)
            (0x7F80_0001, 0x7FC0), // signalling NaN whose payload is all in the dropped bits: still NaN
            (0x7FFF_FFFF, 0x7FFF), // NaN with every payload bit: no carry into the sign
        ];
        var source = MemoryMarshal.Cast<uint, float>(cases.Select(c => c.Float).ToArray()).ToArray();
        var actual = new ushort[source.Length];
        _kernels[name].ToBFloat16(source, actual);
        for (var i = 0; i < cases.Length; i++)
            Assert.True(cases[i].BFloat16 == actual[i], $"0x{cases[i].Float:X8}: expected 0x{cases[i].BFloat16:X4}, got 0x{actual[i]:X4}");
        var back = new float[source.Length];
        _kernels[name].FromBFloat16(actual, back);
        for (var i = 0; i < cases.Length; i++)
            Assert.Equal(float.IsNaN(source[i]), float.IsNaN(back[i]));
    }

    [Theory]
    [InlineData("scalar")]
    [InlineData("simd")]
    [InlineData("ilgpu")]
    public void ScaleAndAccumulateGiveKnownValues(string name)
    {
        var kernels = _kernels[name];
        float[] data = [1, -2, 0.5f, 3e38f, float.PositiveInfinity];
        kernels.Scale(data, 0.25f);
        Assert.Equal([0.25f, -0.5f, 0.125f, 7.5e37f, float.PositiveInfinity], data);
        kernels.Accumulate(data, [1, 1, 1, 3e38f, 1]);
        Assert.Equal([1.25f, 0.5f, 1.125f, float.PositiveInfinity, float.PositiveInfinity], data); // 3.75e38 overflows
        kernels.Scale([], 2f); // empty spans are fine
        kernels.Accumulate([], []);
    }

    [Theory]
    [InlineData("scalar")]
    [InlineData("simd")]
    [InlineData("ilgpu")]
    public void MismatchedLengthsAreRejected(string name)
    {
        var kernels = _kernels[name];
        Assert.Throws<ArgumentException>(() => kernels.Accumulate(new float[4], new float[3]));
        Assert.Throws<ArgumentException>(() => kernels.ToBFloat16(new float[4], new ushort[3]));
        Assert.Throws<ArgumentException>(() => kernels.FromBFloat16(new ushort[4], new float[3]));
    }

    [Fact]
    public void FactoryKnowsEachNameAndDefaultsToSimd()
    {
        foreach (var name in ReductionKernels.Names)
        {
            using var kernels = ReductionKernels.Create(name.ToUpperInvariant());
            Assert.Equal(name, kernels.Name);
        }
        Assert.Equal("simd", ReductionKernels.Default.Name);
        Assert.Throws<ArgumentException>(() => ReductionKernels.Create("cuda"));
    }

    [Fact]
    public void EachJobSettingGetsItsKernelsAndAutoPrefersACudaGpuOverSimd()
    {
        bool cuda;
        using (var onCuda = IlgpuReductionKernels.TryCreateOnCuda())
        {
            cuda = onCuda is not null;
            if (onCuda is not null) Assert.Equal("Cuda", onCuda.AcceleratorKind);
        }
        using (var simd = ReductionKernels.ForJob("simd")) Assert.IsType<SimdReductionKernels>(simd);
        using (var ilgpu = ReductionKernels.ForJob("ilgpu"))
        {
            Assert.Equal(cuda ? "Cuda" : "CPU", Assert.IsType<IlgpuReductionKernels>(ilgpu).AcceleratorKind);
            Assert.StartsWith($"ilgpu on {(cuda ? "Cuda" : "CPU")} (", ilgpu.Description);
        }
        // Without a CUDA GPU (the build machines have none) auto is SIMD: ILGPU's CPU accelerator is slower.
        using (var auto = ReductionKernels.ForJob("auto")) Assert.Equal(cuda ? "ilgpu" : "simd", auto.Name);
        Assert.Equal(["auto", "simd", "ilgpu"], ReductionKernels.JobSettings);
        Assert.Contains("got 'cuda'", Assert.Throws<ArgumentException>(() => ReductionKernels.ForJob("cuda")).Message);
    }
}
