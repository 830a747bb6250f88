using Distributed.Comm;
using Distributed.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace Distributed.Training;

/// <summary>
/// Data-parallel gradients, fused into buckets of about <c>bucketBytes</c> (PyTorch DDP's 25 MB default) in reverse
/// parameter order, as DDP does (backward produces the last layers' gradients first). Each parameter's <c>.grad</c>
/// is a view into its bucket's flat tensor, set once: backward writes into the memory the all-reduce sends, and the
/// clipping and the optimizer read the averaged result from there, with no copies.
///
/// TorchSharp has no gradient hooks, so every parameter use in forward goes through <see cref="GradientReady"/>, an
/// identity autograd function whose backward receives that use's gradient: it adds it into the bucket itself and,
/// when a bucket has every gradient of the step, starts its all-reduce while backward goes on (overlap), or leaves
/// it for <see cref="FinishAsync"/> (no overlap). Either way the buckets start in index order on every rank, so the
/// ranks issue the same collectives in the same order, and the sums are the same, bit for bit, in both modes.
/// The step's loss rides in the last bucket, so logging costs no extra collective (unless gradients travel
/// compressed: then the loss takes the exact group).
/// </summary>
sealed class GradientBuckets : IDisposable
{
    sealed class Bucket(Tensor flat, NativeMemory<float> memory, int[] parameters)
    {
        public Tensor Flat { get; } = flat;
        public NativeMemory<float> Memory { get; } = memory;
        public int[] Parameters { get; } = parameters;
        public int PendingUses;   // uses in this micro-batch's forward whose gradients have not arrived
        public Task? Reduction;
    }

    readonly Tensor[] _views;          // parameter i's gradient, inside its bucket
    readonly int[] _bucketOf;
    readonly Dictionary<IntPtr, int> _indexByData = [];
    readonly List<Bucket> _buckets = [];
    readonly IProcessGroup _gradients, _exact;
    readonly float[] _separateLoss = new float[1];
    readonly bool _overlap;
    Task _launches = Task.CompletedTask;
    int _nextToLaunch;
    bool _finalMicroBatch;
    CancellationToken _cancellation;
    Exception? _failure;

    /// <param name="gradients">the group gradients are averaged over</param>
    /// <param name="exact">the group the loss is averaged over when <paramref name="gradients"/> compresses</param>
    public GradientBuckets(ILanguageModel model, IProcessGroup gradients, IProcessGroup exact, long bucketBytes, bool overlap)
    {
        _gradients = gradients;
        _exact = exact;
        _overlap = overlap;
        var parameters = model.Parameters.Select(p => (Tensor)p.Tensor).ToArray();
        _views = new Tensor[parameters.Length];
        _bucketOf = new int[parameters.Length];
        for (int i = 0; i < parameters.Length; i++) _indexByData[DataPointer(parameters[i])] = i;

        var current = new List<int>();
        long bytes = 0;
        for (int i = parameters.Length - 1; i >= 0; i--)
        {
            current.Add(i);
            bytes += parameters[i].NumberOfElements * sizeof(float);
            if (bytes >= bucketBytes && i > 0) { Seal(parameters, current, extra: 0); current = []; bytes = 0; }
        }
        Seal(parameters, current, extra: 1);   // one extra element carries the loss
        Bytes = _buckets.Sum(b => b.Flat.NumberOfElements * sizeof(float));
        model.Use.Hook = Hook;
    }

    unsafe void Seal(Tensor[] parameters, List<int> members, int extra)
    {
        long total = members.Sum(i => parameters[i].NumberOfElements) + extra;
        var flat = zeros(checked((int)total), dtype: ScalarType.Float32).DetachFromDisposeScope();
        var memory = new NativeMemory<float>(Pointer(flat), (int)total, owner: flat);
        long offset = 0;
        foreach (int i in members)
        {
            var p = parameters[i];
            _views[i] = flat.narrow(0, offset, p.NumberOfElements).view(p.shape).DetachFromDisposeScope();
            p.grad = _views[i];
            _bucketOf[i] = _buckets.Count;
            offset += p.NumberOfElements;
        }
        _buckets.Add(new Bucket(flat, memory, [.. members]));
    }

    static unsafe float* Pointer(Tensor t) => (float*)TensorBytes.Of(t).Address;

    // A parameter's identity across TorchSharp's wrappers (nn.Embedding hands out a new one per access): its storage.
    static unsafe IntPtr DataPointer(Tensor t) => (IntPtr)TensorBytes.Of(t).Address;

    /// <summary>Bytes all-reduced per step.</summary>
    public long Bytes { get; }

    /// <summary>Clears the gradients for a new step (in place: <c>.grad</c> stays a view of its bucket).</summary>
    public void ZeroGradients()
    {
        foreach (var b in _buckets) b.Flat.zero_();
    }

    /// <summary>Before each micro-batch's forward: whether its backward completes the step's gradients.</summary>
    public void BeginMicroBatch(bool final, CancellationToken cancellationToken)
    {
        _finalMicroBatch = final;
        _cancellation = cancellationToken;
        foreach (var b in _buckets) b.PendingUses = 0;   // a backward that did not happen (an error) leaves nothing behind
        if (final) { _nextToLaunch = 0; _launches = Task.CompletedTask; }
    }

    /// <summary>The step's loss on this rank (before the last backward: it travels in the last bucket).</summary>
    public void SetLoss(double loss) => _buckets[^1].Memory.GetSpan()[^1] = _separateLoss[0] = (float)loss;

    Tensor Hook(Tensor parameter)
    {
        if (!is_grad_enabled() || !parameter.requires_grad) return parameter;
        int index = _indexByData[DataPointer(parameter)];
        _buckets[_bucketOf[index]].PendingUses++;
        return GradientReady.apply(parameter, this, index);
    }

    /// <summary>Backward produced one use's gradient of parameter <paramref name="index"/> (on the training thread).</summary>
    void Arrived(int index, Tensor gradient)
    {
        using (no_grad()) _views[index].add_(gradient);
        var bucket = _buckets[_bucketOf[index]];
        if (--bucket.PendingUses == 0 && _finalMicroBatch && _overlap) LaunchReady();
    }

    /// <summary>Starts, in index order, every bucket whose gradients are all in.</summary>
    void LaunchReady()
    {
        while (_nextToLaunch < _buckets.Count && _buckets[_nextToLaunch].PendingUses == 0) Launch(_buckets[_nextToLaunch++]);
    }

    /// <summary>
    /// Issues the bucket's all-reduce off the training thread (its first chunks are copied out synchronously), one
    /// launch after the other so every rank numbers its collectives alike.
    /// </summary>
    void Launch(Bucket bucket)
    {
        var token = _cancellation;
        _launches = _launches.ContinueWith(_ => bucket.Reduction = _gradients.AllReduceAsync(bucket.Memory.Memory, ReduceOp.Mean, token),
            CancellationToken.None, TaskContinuationOptions.None, TaskScheduler.Default);
    }

    /// <summary>After the last backward: starts what has not started and waits for every bucket.</summary>
    public async Task FinishAsync()
    {
        if (_failure is { } failure) { _failure = null; throw new InvalidOperationException($"a gradient could not be bucketed: {failure.Message}", failure); }
        while (_nextToLaunch < _buckets.Count) Launch(_buckets[_nextToLaunch++]);
        await _launches.ConfigureAwait(false);
        var reductions = _buckets.Select(b => b.Reduction!).ToList();
        bool lossTravelsExact = !ReferenceEquals(_gradients, _exact);
        if (lossTravelsExact) reductions.Add(_exact.AllReduceAsync(_separateLoss, ReduceOp.Mean, _cancellation));
        await Task.WhenAll(reductions).ConfigureAwait(false);
    }

    /// <summary>The group's mean loss of this step (after <see cref="FinishAsync"/>).</summary>
    public double MeanLoss => ReferenceEquals(_gradients, _exact) ? _buckets[^1].Memory.GetSpan()[^1] : _separateLoss[0];

    public void Dispose()
    {
        foreach (var v in _views) v?.Dispose();
        foreach (var b in _buckets) b.Flat.Dispose();
    }

    /// <summary>Identity in forward; in backward hands the parameter's gradient to its bucket and lets autograd add nothing more.</summary>
    sealed class GradientReady : autograd.SingleTensorFunction<GradientReady>
    {
        public override string Name => nameof(GradientReady);

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            ctx.save_data("buckets", vars[1]);
            ctx.save_data("index", vars[2]);
            return ((Tensor)vars[0]).alias();
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad)
        {
            var buckets = (GradientBuckets)ctx.get_data("buckets");
            // An exception escaping into libtorch's engine would end the process: keep it for FinishAsync to throw.
            try { buckets.Arrived((int)ctx.get_data("index"), grad); }
            catch (Exception e) { buckets._failure ??= e; }
            return [null!, null!, null!];   // the gradient is in its bucket (the parameter's .grad) already; autograd adds nothing
        }
    }
}
