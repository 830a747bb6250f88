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

    /// <summary>Averages every gradient over <paramref name="gradients"/> in place; returns the mean of <paramref name="loss"/> over <paramref name="exact"/>.</summary>
    public double AllReduceMean(IProcessGroup gradients, IProcessGroup exact, double loss, TimeSpan timeout)
    {
        foreach (var (parameters, staging) in _buckets)
        {
            int offset = 0;
            foreach (var p in parameters)
            {
                var grad = MemoryMarshal.Cast<byte, float>(p.grad!.bytes);
                grad.CopyTo(staging.AsSpan(offset));
                offset += grad.Length;
            }
        }
        _buckets[^1].Staging[^1] = (float)loss;
        var separateLoss = new[] { (float)loss };

        using var deadline = new CancellationTokenSource(timeout * 4);
        var reductions = _buckets.Select(b => gradients.AllReduceAsync(b.Staging, ReduceOp.Mean, deadline.Token)).ToList();
        if (!ReferenceEquals(gradients, exact)) reductions.Add(exact.AllReduceAsync(separateLoss, ReduceOp.Mean, deadline.Token));
        Task.WhenAll(reductions).GetAwaiter().GetResult();

        foreach (var (parameters, staging) in _buckets)
        {
            int offset = 0;
            foreach (var p in parameters)
            {
                var grad = MemoryMarshal.Cast<byte, float>(p.grad!.bytes);
                staging.AsSpan(offset, grad.Length).CopyTo(grad);
                offset += grad.Length;
            }
        }
        return ReferenceEquals(gradients, exact) ? _buckets[^1].Staging[^1] : separateLoss[0];
    }
}
