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
///
/// ZeRO-1 (<c>parallel.shard-optimizer</c>): each bucket is cut into one contiguous run of whole parameters per
/// data-parallel rank (<see cref="BucketPlan"/>). A launch reduce-scatters the bucket instead of all-reducing it, so
/// each rank ends with the averaged gradients of the parameters it owns; it steps those, and
/// <see cref="GatherWeightsAsync"/> all-gathers the weights. The weights live in flat buffers of the buckets' layout
/// (each parameter's storage set to a view of its bucket's), so the all-gather writes them in place; the loss rides in
/// the last weight bucket, from the rank that owns the end of the last gradient bucket.
/// </summary>
sealed class GradientBuckets : IDisposable
{
    sealed class Bucket(Tensor flat, NativeMemory<float> memory, int[] parameters, (int Start, int Length)[] segments)
    {
        public Tensor Flat { get; } = flat;
        public NativeMemory<float> Memory { get; } = memory;
        public int[] Parameters { get; } = parameters;
        public (int Start, int Length)[] Segments { get; } = segments;   // ZeRO-1: data-parallel rank r owns segment r
        public Tensor? Weights;                                         // ZeRO-1: the weights, in this bucket's layout
        public NativeMemory<float>? WeightMemory;
        public int PendingUses;   // uses in this micro-batch's forward whose gradients have not arrived
        public Task? Reduction;
    }

    readonly Tensor[] _views;          // parameter i's gradient, inside its bucket
    readonly int[] _bucketOf;
    readonly Dictionary<IntPtr, int> _indexByData = [];
    readonly List<Bucket> _buckets = [];
    readonly IProcessGroup _gradients, _exact;
    readonly float[] _separateLoss = new float[1];
    readonly bool _overlap, _sharded;
    Task _launches = Task.CompletedTask;
    int _nextToLaunch;
    bool _finalMicroBatch;
    CancellationToken _cancellation;
    Exception? _failure;

    /// <param name="gradients">the group gradients are averaged over</param>
    /// <param name="exact">the group the loss is averaged over when <paramref name="gradients"/> compresses (and ZeRO-1's weights are gathered over)</param>
    /// <param name="plan">the buckets, and under ZeRO-1 each parameter's owner (<see cref="BucketPlan.Of"/>)</param>
    public GradientBuckets(ILanguageModel model, IProcessGroup gradients, IProcessGroup exact, BucketPlan plan, bool overlap)
    {
        _gradients = gradients;
        _exact = exact;
        _overlap = overlap;
        _sharded = plan.Sharded;
        var parameters = model.Parameters.Select(p => (Tensor)p.Tensor).ToArray();
        if (!plan.Elements.SequenceEqual(parameters.Select(p => p.NumberOfElements)))
            throw new ArgumentException("the bucket plan was made for other parameters than the model's", nameof(plan));
        _views = new Tensor[parameters.Length];
        _bucketOf = new int[parameters.Length];
        for (int b = 0; b < plan.Members.Length; b++) Seal(parameters, plan, b);
        // After sealing: under ZeRO-1 a parameter's storage moved into its weight bucket.
        for (int i = 0; i < parameters.Length; i++) _indexByData[DataPointer(parameters[i])] = i;
        Bytes = _buckets.Sum(b => b.Flat.NumberOfElements * sizeof(float));
        model.Use.Hook = Hook;
    }

    unsafe void Seal(Tensor[] parameters, BucketPlan plan, int index)
    {
        var members = plan.Members[index];
        long total = plan.Length(index);
        var flat = zeros(checked((int)total), dtype: ScalarType.Float32).DetachFromDisposeScope();
        var memory = new NativeMemory<float>(Pointer(flat), (int)total, owner: flat);
        var bucket = new Bucket(flat, memory, members, plan.Segments(index));
        if (_sharded)
        {
            bucket.Weights = zeros(checked((int)total), dtype: ScalarType.Float32).DetachFromDisposeScope();
            bucket.WeightMemory = new NativeMemory<float>(Pointer(bucket.Weights), (int)total, owner: bucket.Weights);
        }
        long offset = 0;
        foreach (int i in members)
        {
            var p = parameters[i];
            _views[i] = flat.narrow(0, offset, p.NumberOfElements).view(p.shape).DetachFromDisposeScope();
            p.grad = _views[i];
            if (bucket.Weights is { } weights)
                using (no_grad())
                using (var place = weights.narrow(0, offset, p.NumberOfElements).view(p.shape))
                {
                    place.copy_(p);
                    p.set_(place);
                }
            _bucketOf[i] = _buckets.Count;
            offset += p.NumberOfElements;
        }
        _buckets.Add(bucket);
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
        _launches = _launches.ContinueWith(_ => bucket.Reduction = _sharded
                ? _gradients.ReduceScatterAsync(bucket.Memory.Memory, bucket.Segments, ReduceOp.Mean, token)
                : _gradients.AllReduceAsync(bucket.Memory.Memory, ReduceOp.Mean, token),
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

    /// <summary>
    /// ZeRO-1, after this rank stepped its parameters: every rank's weights from their owners, bucket by bucket (in
    /// order on every rank), with the mean loss from the owner of the last bucket's end.
    /// </summary>
    public Task GatherWeightsAsync(CancellationToken cancellationToken)
    {
        if (!_sharded) throw new InvalidOperationException("the weights are gathered only under ZeRO-1: every rank stepped them all");
        var last = _buckets[^1];
        if (last.Segments[_gradients.Rank] is { Length: > 0 } mine && mine.Start + mine.Length == last.Flat.NumberOfElements)
            last.WeightMemory!.GetSpan()[^1] = last.Memory.GetSpan()[^1];
        return Task.WhenAll(_buckets.Select(b => _exact.AllGatherAsync(b.WeightMemory!.Memory, b.Segments, cancellationToken)).ToList());
    }

    /// <summary>The group's mean loss of this step (after <see cref="FinishAsync"/>; under ZeRO-1 after <see cref="GatherWeightsAsync"/>).</summary>
    public double MeanLoss => !ReferenceEquals(_gradients, _exact) ? _separateLoss[0]
        : _sharded ? _buckets[^1].WeightMemory!.GetSpan()[^1] : _buckets[^1].Memory.GetSpan()[^1];

    public void Dispose()
    {
        foreach (var v in _views) v?.Dispose();
        foreach (var b in _buckets) { b.Flat.Dispose(); b.Weights?.Dispose(); }
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

/// <summary>
/// The gradient buckets as a pure function of the parameters' sizes: parameters in reverse order (DDP's), a bucket
/// sealed once it reaches the byte target, one extra element at the end of the last for the loss. Under ZeRO-1
/// (<paramref name="ranks"/> &gt; 1) each bucket is cut into contiguous runs of whole parameters, one per
/// data-parallel rank in rank order: a parameter goes to the rank whose even share holds its middle. Whole
/// parameters keep the moments whole tensors, so a ZeRO-1 checkpoint loads into any layout (a cut inside a
/// parameter could cross the dimension tensor parallelism splits it along). The end of the last bucket (parameter 0:
/// the token embedding, whose pipeline copies must stay bit-identical, and the loss) always belongs to the last rank,
/// so every stage reduces it in the same order.
/// </summary>
public sealed record BucketPlan(long[] Elements, int[][] Members, int[][] Owners, int Ranks)
{
    public bool Sharded => Ranks > 1;

    public static BucketPlan Of(IReadOnlyList<long> elements, long bucketBytes, int ranks)
    {
        var members = new List<int[]>();
        var current = new List<int>();
        long bytes = 0;
        for (int i = elements.Count - 1; i >= 0; i--)
        {
            current.Add(i);
            bytes += elements[i] * sizeof(float);
            if (bytes >= bucketBytes && i > 0) { members.Add([.. current]); current = []; bytes = 0; }
        }
        members.Add([.. current]);
        var owners = new int[members.Count][];
        for (int b = 0; b < members.Count; b++)
        {
            long total = members[b].Sum(i => elements[i]) + (b == members.Count - 1 ? 1 : 0), offset = 0;
            owners[b] = new int[members[b].Length];
            for (int k = 0; k < members[b].Length; k++)
            {
                long size = elements[members[b][k]];
                owners[b][k] = (int)Math.Min(ranks - 1, (offset + size / 2) * ranks / Math.Max(1, total));
                offset += size;
            }
        }
        if (owners[^1].Length > 0) owners[^1][^1] = ranks - 1;
        return new BucketPlan([.. elements], [.. members], owners, ranks);
    }

    public static BucketPlan Of(ILanguageModel model, long bucketBytes, int ranks) =>
        Of(model.Parameters.Select(p => p.Tensor.NumberOfElements).ToList(), bucketBytes, ranks);

    /// <summary>The data-parallel rank that steps each parameter (by name).</summary>
    public Dictionary<string, int> OwnerByName(ILanguageModel model)
    {
        var owner = new Dictionary<string, int>();
        for (int b = 0; b < Members.Length; b++)
            for (int k = 0; k < Members[b].Length; k++) owner[model.Parameters[Members[b][k]].Name] = Owners[b][k];
        return owner;
    }

    /// <summary>Elements of bucket <paramref name="index"/> (the loss's included).</summary>
    public long Length(int index) => Members[index].Sum(i => Elements[i]) + (index == Members.Length - 1 ? 1 : 0);

    /// <summary>Rank r's run of bucket <paramref name="index"/>: from its first parameter to the next rank's (the loss at the end goes with the last).</summary>
    public (int Start, int Length)[] Segments(int index)
    {
        var starts = new long[Ranks + 1];
        long total = Length(index), offset = 0;
        Array.Fill(starts, total);
        starts[0] = 0;
        for (int k = 0; k < Members[index].Length; k++)
        {
            for (int r = Owners[index][k]; r >= 1 && starts[r] == total; r--) starts[r] = offset;
            offset += Elements[Members[index][k]];
        }
        return Enumerable.Range(0, Ranks).Select(r => ((int)starts[r], (int)(starts[r + 1] - starts[r]))).ToArray();
    }
}
