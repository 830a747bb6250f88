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
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>> _accumulate;
    private readonly Action<Index1D, ArrayView<float>, float> _scale;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<ushort>> _toBFloat16;
    private readonly Action<Index1D, ArrayView<ushort>, ArrayView<float>> _fromBFloat16;
    private MemoryBuffer1D<float, Stride1D.Dense>? _a, _b;
    private MemoryBuffer1D<ushort, Stride1D.Dense>? _h;
    private bool _disposed;

    public IlgpuReductionKernels()
    {
        _context = Context.Create(b => b.Cuda().CPU(CPUDeviceKind.Default));
        var device = _context.Devices.FirstOrDefault(d => d.AcceleratorType == AcceleratorType.Cuda) ?? _context.GetCPUDevice(0);
        _accelerator = device.CreateAccelerator(_context);
        _accumulate = _accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>>(AccumulateKernel);
        _scale = _accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, float>(ScaleKernel);
        _toBFloat16 = _accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<ushort>>(ToBFloat16Kernel);
        _fromBFloat16 = _accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<ushort>, ArrayView<float>>(FromBFloat16Kernel);
    }

    public string Name => "ilgpu";

    /// <summary>The accelerator the kernels run on ("Cuda" or "CPU").</summary>
    public string AcceleratorKind => _accelerator.AcceleratorType.ToString();

    public void Accumulate(Span<float> accumulator, ReadOnlySpan<float> chunk)
    {
        ReductionKernels.CheckSameLength(accumulator.Length, chunk.Length);
        if (accumulator.IsEmpty) return;
        lock (_gate)
        {
            var a = Floats(ref _a, accumulator.Length);
            var b = Floats(ref _b, accumulator.Length);
            a.CopyFromCPU((ReadOnlySpan<float>)accumulator);
            b.CopyFromCPU(chunk);
            _accumulate(accumulator.Length, a, b);
            a.CopyToCPU(accumulator);
            _accelerator.Synchronize();
        }
    }

    public void Scale(Span<float> data, float factor)
    {
        if (data.IsEmpty) return;
        lock (_gate)
        {
            var a = Floats(ref _a, data.Length);
            a.CopyFromCPU((ReadOnlySpan<float>)data);
            _scale(data.Length, a, factor);
            a.CopyToCPU(data);
            _accelerator.Synchronize();
        }
    }

    public void ToBFloat16(ReadOnlySpan<float> source, Span<ushort> destination)
    {
        ReductionKernels.CheckDestination(source.Length, destination.Length);
        if (source.IsEmpty) return;
        lock (_gate)
        {
            var a = Floats(ref _a, source.Length);
            var h = Halves(source.Length);
            a.CopyFromCPU(source);
            _toBFloat16(source.Length, a, h);
            h.CopyToCPU(destination[..source.Length]);
            _accelerator.Synchronize();
        }
    }

    public void FromBFloat16(ReadOnlySpan<ushort> source, Span<float> destination)
    {
        ReductionKernels.CheckDestination(source.Length, destination.Length);
        if (source.IsEmpty) return;
        lock (_gate)
        {
            var h = Halves(source.Length);
            var a = Floats(ref _a, source.Length);
            h.CopyFromCPU(source);
            _fromBFloat16(source.Length, h, a);
            a.CopyToCPU(destination[..source.Length]);
            _accelerator.Synchronize();
        }
    }

    private ArrayView<float> Floats(ref MemoryBuffer1D<float, Stride1D.Dense>? buffer, int length)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (buffer is null || buffer.Length < length)
        {
            var capacity = Math.Max(length, (int)Math.Min(int.MaxValue, 2 * (buffer?.Length ?? 0)));
            buffer?.Dispose();
            buffer = null; // stays consistent if the allocation below throws
            buffer = _accelerator.Allocate1D<float>(capacity);
        }
        return buffer.View.SubView(0, length);
    }

    private ArrayView<ushort> Halves(int length)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_h is null || _h.Length < length)
        {
            var capacity = Math.Max(length, (int)Math.Min(int.MaxValue, 2 * (_h?.Length ?? 0)));
            _h?.Dispose();
            _h = null;
            _h = _accelerator.Allocate1D<ushort>(capacity);
        }
        return _h.View.SubView(0, length);
    }

    private static void AccumulateKernel(Index1D i, ArrayView<float> a, ArrayView<float> b) => a[i] += b[i];

    private static void ScaleKernel(Index1D i, ArrayView<float> a, float factor) => a[i] *= factor;

    // Same bit arithmetic as ScalarReductionKernels.ToBFloat16.
    private static void ToBFloat16Kernel(Index1D i, ArrayView<float> source, ArrayView<ushort> destination)
    {
        var bits = Interop.FloatAsInt(source[i]);
        destination[i] = (bits & 0x7FFF_FFFFu) > 0x7F80_0000u
            ? (ushort)((bits >> 16) | 0x0040u)
            : (ushort)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    }

    private static void FromBFloat16Kernel(Index1D i, ArrayView<ushort> source, ArrayView<float> destination) =>
        destination[i] = Interop.IntAsFloat((uint)source[i] << 16);

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
