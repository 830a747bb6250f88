using Distributed.Comm;
using TorchSharp;
using static TorchSharp.torch;

namespace Distributed.Model.Parallel;

/// <summary>
/// A process group as the layers and the training thread use it: blocking all-reduces of tensors, called from
/// forward and from autograd's backward (the tensor-parallel group), and by the trainer for the embedding and
/// model-parallel groups. Each waits at most the step's deadline (<see cref="Cancellation"/>,
/// set by the trainer) on top of the group's per-chunk one. Backward runs inside libtorch's engine, where an
/// exception would end the process, so a failure there is kept (<see cref="ThrowIfFailed"/>), and every later
/// all-reduce of that pass returns at once instead of waiting for a peer that is gone.
/// </summary>
public sealed class TensorParallelGroup(IProcessGroup group)
{
    Exception? _failure;

    public IProcessGroup Group { get; } = group;
    public int Rank => Group.Rank;
    public int Size => Group.Size;

    /// <summary>The deadline of the collectives of the current step (or evaluation).</summary>
    public CancellationToken Cancellation { get; set; }

    /// <summary>All-reduces issued, and their bytes (what bench/tensor-parallel and the collective-count test read).</summary>
    public long AllReduces { get; private set; }
    public long Bytes { get; private set; }

    /// <summary>Time spent waiting in all-reduces (the communication share of a step).</summary>
    public TimeSpan Elapsed { get; private set; }

    /// <summary>Reduces <paramref name="t"/> (contiguous float32 on the CPU) in place over the group.</summary>
    public unsafe void AllReduce(Tensor t, ReduceOp op)
    {
        if (t.dtype != ScalarType.Float32 || t.device_type != DeviceType.CPU || !t.is_contiguous())
            throw new ArgumentException($"a tensor-parallel all-reduce needs a contiguous float32 CPU tensor, got {t.dtype} on {t.device_type}");
        if (_failure is not null) return;
        AllReduces++;
        Bytes += t.NumberOfElements * sizeof(float);
        long started = System.Diagnostics.Stopwatch.GetTimestamp();
        try
        {
            fixed (byte* data = t.bytes)
            {
                var memory = new NativeMemory<float>((float*)data, checked((int)t.NumberOfElements), owner: t);
                Group.AllReduceAsync(memory.Memory, op, Cancellation).GetAwaiter().GetResult();
            }
        }
        finally
        {
            Elapsed += System.Diagnostics.Stopwatch.GetElapsedTime(started);
        }
    }

    /// <summary>For backward: runs <paramref name="reduce"/>, keeping its failure instead of throwing into libtorch.</summary>
    internal void AllReduceInBackward(Tensor t, ReduceOp op)
    {
        try { AllReduce(t, op); }
        catch (Exception e) { _failure ??= e; }
    }

    /// <summary>After backward: a collective that failed inside it fails the step here.</summary>
    public void ThrowIfFailed()
    {
        if (_failure is not { } failure) return;
        _failure = null;
        throw failure is PeerFailedException or OperationCanceledException
            ? failure
            : new InvalidOperationException($"a tensor-parallel all-reduce failed in backward: {failure.Message}", failure);
    }
}
