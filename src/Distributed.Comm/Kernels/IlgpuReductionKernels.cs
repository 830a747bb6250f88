using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using ILGPU.Runtime.Cuda;

namespace Distributed.Comm.Kernels;

/// <summary>ILGPU kernels on the CUDA accelerator when there is one, else on ILGPU's CPU accelerator. Spans are
/// copied into cached device buffers (grown, never shrunk) and back; one lock serialises all calls.</summary>
public sealed class IlgpuReductionKernels : IReductionKernels
{
    private readonly object _gate = new();
    private readonly Context _context;
    private readonly Accelerator _accelerator;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, int> _accumulate;
    private readonly Action<Index1D, ArrayView<float>, float, int> _scale;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<ushort>, int> _toBFloat16;
    private readonly Action<Index1D, ArrayView<ushort>, ArrayView<float>, int> _fromBFloat16;
    private MemoryBuffer1D<float, Stride1D.Dense>? _a, _b;
    private MemoryBuffer1D<ushort, Stride1D.Dense>? _h;
    private bool _disposed;

    /// <summary>On the CUDA accelerator when there is a CUDA GPU, else on ILGPU's CPU accelerator.</summary>
    public IlgpuReductionKernels()
        // On the CPU: one two-thread group per core (the smallest warp ILGPU allows), each thread looping over a block
        // (see Launch). ILGPU's default CPU device, one emulated thread per element, ran Accumulate at 0.01 GB/s.
        : this(Context.Create(b => b.Cuda().CPU(new CPUDevice(2, 1, Environment.ProcessorCount))))
    {
    }

    // Takes ownership of the context. It is created without ContextFlags.FastMath, so on CUDA the kernels compile to
    // add.f32 and mul.f32: IEEE round-to-nearest with subnormals kept (FastMath would emit add.ftz.f32), one rounding
    // per element as on the CPU, so every accelerator gives the bits SimdReductionKernels gives.
    IlgpuReductionKernels(Context context)
    {
        _context = context;
        try
        {
            var device = _context.Devices.FirstOrDefault(d => d.AcceleratorType == AcceleratorType.Cuda) ?? _context.GetCPUDevice(0);
            _accelerator = device.CreateAccelerator(_context);
            _accumulate = _accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, int>(AccumulateKernel);
            _scale = _accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, float, int>(ScaleKernel);
            _toBFloat16 = _accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<ushort>, int>(ToBFloat16Kernel);
            _fromBFloat16 = _accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<ushort>, ArrayView<float>, int>(FromBFloat16Kernel);
        }
        catch
        {
            _accelerator?.Dispose();
            _context.Dispose();
            throw;
        }
    }

    /// <summary>The kernels on a CUDA GPU, or null where ILGPU finds none (no GPU, or no CUDA driver).</summary>
    public static IlgpuReductionKernels? TryCreateOnCuda()
    {
        var context = Context.Create(b => b.Cuda());
        if (context.Devices.Any(d => d.AcceleratorType == AcceleratorType.Cuda)) return new IlgpuReductionKernels(context);
        context.Dispose();
        return null;
    }

    public string Name => "ilgpu";

    /// <summary>The accelerator the kernels run on ("Cuda" or "CPU").</summary>
    public string AcceleratorKind => _accelerator.AcceleratorType.ToString();

    public string Description => $"ilgpu on {AcceleratorKind} ({_accelerator.Name})";

    public void Accumulate(Span<float> accumulator, ReadOnlySpan<float> chunk)
    {
        ReductionKernels.CheckSameLength(accumulator.Length, chunk.Length);
        if (accumulator.IsEmpty) return;
        lock (_gate)
        {
            var a = View(ref _a, accumulator.Length);
            var b = View(ref _b, accumulator.Length);
            a.CopyFromCPU((ReadOnlySpan<float>)accumulator);
            b.CopyFromCPU(chunk);
            Launch(_accumulate, accumulator.Length, a, b);
            a.CopyToCPU(accumulator);
            _accelerator.Synchronize();
        }
    }

    public void Scale(Span<float> data, float factor)
    {
        if (data.IsEmpty) return;
        lock (_gate)
        {
            var a = View(ref _a, data.Length);
            a.CopyFromCPU((ReadOnlySpan<float>)data);
            Launch(_scale, data.Length, a, factor);
            a.CopyToCPU(data);
            _accelerator.Synchronize();
        }
    }

    public void ToBFloat16(ReadOnlySpan<float> source, Span<ushort> destination) =>
        Convert(_toBFloat16, ref _a, ref _h, source, destination);

    public void FromBFloat16(ReadOnlySpan<ushort> source, Span<float> destination) =>
        Convert(_fromBFloat16, ref _h, ref _a, source, destination);

    /// <summary>Element-wise conversion through device buffers, shared by both bf16 directions.</summary>
    private void Convert<TIn, TOut>(Action<Index1D, ArrayView<TIn>, ArrayView<TOut>, int> kernel,
        ref MemoryBuffer1D<TIn, Stride1D.Dense>? input, ref MemoryBuffer1D<TOut, Stride1D.Dense>? output,
        ReadOnlySpan<TIn> source, Span<TOut> destination) where TIn : unmanaged where TOut : unmanaged
    {
        ReductionKernels.CheckDestination(source.Length, destination.Length);
        if (source.IsEmpty) return;
        lock (_gate)
        {
            var from = View(ref input, source.Length);
            var to = View(ref output, source.Length);
            from.CopyFromCPU(source);
            Launch(kernel, source.Length, from, to);
            to.CopyToCPU(destination[..source.Length]);
            _accelerator.Synchronize();
        }
    }

    private ArrayView<T> View<T>(ref MemoryBuffer1D<T, Stride1D.Dense>? buffer, int length) where T : unmanaged
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (buffer is null || buffer.Length < length)
        {
            var capacity = Math.Max(length, (int)Math.Min(int.MaxValue, 2 * (buffer?.Length ?? 0)));
            buffer?.Dispose();
            buffer = null; // stays consistent if the allocation below throws
            buffer = _accelerator.Allocate1D<T>(capacity);
        }
        return buffer.View.SubView(0, length);
    }

    // On a GPU each thread takes one element (coalesced); on the CPU each of MaxNumThreads threads takes a block.
    private void Launch<T1, T2>(Action<Index1D, T1, T2, int> kernel, int length, T1 first, T2 second)
        where T1 : struct where T2 : struct
    {
        var threads = _accelerator.AcceleratorType == AcceleratorType.CPU ? _accelerator.MaxNumThreads : length;
        var perThread = (int)(((long)length + threads - 1) / threads);
        kernel((int)(((long)length + perThread - 1) / perThread), first, second, perThread);
    }

    private static void AccumulateKernel(Index1D thread, ArrayView<float> a, ArrayView<float> b, int perThread)
    {
        for (int i = thread * perThread, end = i + Math.Min(perThread, a.IntLength - i); i < end; i++) a[i] += b[i];
    }

    private static void ScaleKernel(Index1D thread, ArrayView<float> a, float factor, int perThread)
    {
        for (int i = thread * perThread, end = i + Math.Min(perThread, a.IntLength - i); i < end; i++) a[i] *= factor;
    }

    // Same bit arithmetic as ScalarReductionKernels.ToBFloat16.
    private static void ToBFloat16Kernel(Index1D thread, ArrayView<float> source, ArrayView<ushort> destination, int perThread)
    {
        for (int i = thread * perThread, end = i + Math.Min(perThread, source.IntLength - i); i < end; i++)
        {
            var bits = Interop.FloatAsInt(source[i]);
            destination[i] = (bits & 0x7FFF_FFFFu) > 0x7F80_0000u
                ? (ushort)((bits >> 16) | 0x0040u)
                : (ushort)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
        }
    }

    private static void FromBFloat16Kernel(Index1D thread, ArrayView<ushort> source, ArrayView<float> destination, int perThread)
    {
        for (int i = thread * perThread, end = i + Math.Min(perThread, source.IntLength - i); i < end; i++)
            destination[i] = Interop.IntAsFloat((uint)source[i] << 16);
    }

    public void Dispose()
    {
        lock (_gate)
        {
            if (_disposed) return;
            _disposed = true;
            _a?.Dispose();
            _b?.Dispose();
            _h?.Dispose();
            _accelerator.Dispose();
            _context.Dispose();
        }
    }
}
