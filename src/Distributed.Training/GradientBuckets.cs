using System.Runtime.InteropServices;
using Distributed.Comm;
using TorchSharp;
using static TorchSharp.torch;

namespace Distributed.Training;

/// <summary>
/// Gradients fused into buckets of about <c>bucketBytes</c> (PyTorch DDP's 25 MB default), in reverse parameter
/// order as DDP does (the last layers' gradients are ready first). Each bucket is averaged over the data-parallel
/// group; buckets go out concurrently. The step's loss rides in the last bucket, so logging costs no extra collective
/// (unless gradients travel compressed: then the loss takes the exact group).
/// TorchSharp 0.107 has no per-parameter gradient hooks, so buckets start after backward, not during it.
/// </summary>
sealed class GradientBuckets
{
    readonly List<(List<Tensor> Parameters, float[] Staging)> _buckets = [];

    public GradientBuckets(IReadOnlyList<Tensor> parameters, long bucketBytes)
    {
        var current = new List<Tensor>();
        long bytes = 0;
        foreach (var p in parameters.Reverse())
        {
            current.Add(p);
            bytes += p.NumberOfElements * sizeof(float);
            if (bytes >= bucketBytes) { Seal(current); current = []; bytes = 0; }
        }
        if (current.Count > 0 || _buckets.Count == 0) Seal(current);
        // One extra element in the last bucket carries the loss.
        var (lastParams, lastStaging) = _buckets[^1];
        _buckets[^1] = (lastParams, new float[lastStaging.Length + 1]);
        Bytes = _buckets.Sum(b => (long)b.Staging.Length * sizeof(float));
    }

    void Seal(List<Tensor> parameters) =>
        _buckets.Add((parameters, new float[parameters.Sum(p => p.NumberOfElements)]));

    /// <summary>Bytes all-reduced per step.</summary>
    public long Bytes { get; }

    public int Count => _buckets.Count;

    readonly float[] _separateLoss = new float[1];

    // Pack and Unpack touch tensors, so they run on the training thread (TorchSharp's dispose scopes are per
    // thread); only Reduce crosses threads, and it touches nothing but the bucket arrays.

    /// <summary>Copies the gradients and this rank's loss into the buckets.</summary>
    public void Pack(double loss)
    {
        CopyGradients(toStaging: true);
        _buckets[^1].Staging[^1] = _separateLoss[0] = (float)loss;
    }

    /// <summary>Averages the buckets over <paramref name="gradients"/>, and the loss over <paramref name="exact"/> when they differ.</summary>
    public Task ReduceAsync(IProcessGroup gradients, IProcessGroup exact, CancellationToken cancellationToken)
    {
        _lossTravelsExact = !ReferenceEquals(gradients, exact);
        var reductions = _buckets.Select(b => gradients.AllReduceAsync(b.Staging, ReduceOp.Mean, cancellationToken)).ToList();
        if (_lossTravelsExact) reductions.Add(exact.AllReduceAsync(_separateLoss, ReduceOp.Mean, cancellationToken));
        return Task.WhenAll(reductions);
    }

    bool _lossTravelsExact;

    /// <summary>Copies the averaged gradients back; returns the group's mean loss.</summary>
    public double Unpack()
    {
        CopyGradients(toStaging: false);
        return _lossTravelsExact ? _separateLoss[0] : _buckets[^1].Staging[^1];
    }

    /// <summary>Gradients into the bucket buffers, or back out of them.</summary>
    void CopyGradients(bool toStaging)
    {
        foreach (var (parameters, staging) in _buckets)
        {
            int offset = 0;
            foreach (var p in parameters)
            {
                var grad = MemoryMarshal.Cast<byte, float>(p.grad!.bytes);
                if (toStaging) grad.CopyTo(staging.AsSpan(offset));
                else staging.AsSpan(offset, grad.Length).CopyTo(grad);
                offset += grad.Length;
            }
        }
    }
}
