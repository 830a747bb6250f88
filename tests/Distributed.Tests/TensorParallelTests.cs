using Distributed.Comm;
using Distributed.Core;
using Distributed.Model;
using Distributed.Model.Parallel;
using TorchSharp;
using static TorchSharp.torch;

namespace Distributed.Tests;

/// <summary>
/// The tensor-parallel model against the single-process one, with its ranks on threads of this process talking over
/// real shared-memory links: the same loss, the same gradients (gathered from the slices), and exactly Megatron's
/// communication. Whole jobs across worker processes are in the cluster tests.
/// </summary>
public class TensorParallelTests
{
    /// <summary>Records every all-reduce that crosses the group (op and floats), then forwards it.</summary>
    sealed class Recording(IProcessGroup inner) : IProcessGroup
    {
        public List<(ReduceOp Op, int Floats)> AllReduces { get; } = [];
        public int Rank => inner.Rank;
        public int Size => inner.Size;
        public Task AllReduceAsync(Memory<float> data, ReduceOp op, CancellationToken cancellationToken = default)
        {
            AllReduces.Add((op, data.Length));
            return inner.AllReduceAsync(data, op, cancellationToken);
        }
        public Task BroadcastAsync(Memory<byte> data, int root, CancellationToken ct = default) => throw Unexpected();
        public Task AllGatherAsync(ReadOnlyMemory<float> mine, Memory<float> all, CancellationToken ct = default) => throw Unexpected();
        public Task ReduceScatterAsync(ReadOnlyMemory<float> input, Memory<float> output, ReduceOp op, CancellationToken ct = default) => throw Unexpected();
        public Task ReduceScatterAsync(Memory<float> data, IReadOnlyList<(int Start, int Length)> segments, ReduceOp op, CancellationToken ct = default) => throw Unexpected();
        public Task AllGatherAsync(Memory<float> data, IReadOnlyList<(int Start, int Length)> segments, CancellationToken ct = default) => throw Unexpected();
        public Task SendAsync(int destination, ReadOnlyMemory<byte> data, CancellationToken ct = default) => throw Unexpected();
        public Task ReceiveAsync(int source, Memory<byte> data, CancellationToken ct = default) => throw Unexpected();
        public Task BarrierAsync(CancellationToken ct = default) => throw Unexpected();
        static InvalidOperationException Unexpected() => new("only all-reduces may cross the tensor-parallel group");
    }

    static readonly ModelSpec Spec = new(Layers: 2, Heads: 4, Embedding: 32, BlockSize: 16, Dropout: 0, Bias: true);
    const int Vocab = 65;   // the corpus's characters: tp=2 and tp=4 need padding
    const long Seed = 7;

    static (Tensor X, Tensor Y) Batch()
    {
        using var g = new Generator(11);
        var x = randint(0, Vocab, [3, Spec.BlockSize], generator: g);
        var y = randint(0, Vocab, [3, Spec.BlockSize], generator: g);
        return (x, y);
    }

    /// <summary>Runs <paramref name="work"/> on tp ranks, each on its own thread, joined over shared memory.</summary>
    static Task<T[]> OnRanks<T>(int tp, Func<TensorParallelGroup, Recording, T> work) => OnThreads(tp, (links, _) =>
    {
        var recording = new Recording(new ProcessGroup(links, ParallelLayout.GroupId(ParallelAxis.Tensor), Enumerable.Range(0, tp).ToArray()));
        var group = new TensorParallelGroup(recording) { Cancellation = new CancellationTokenSource(TimeSpan.FromSeconds(60)).Token };
        return work(group, recording);
    });

    /// <summary><paramref name="ranks"/> data-plane nodes of this process joined over real shared-memory links, each rank's work on its own thread.</summary>
    static async Task<T[]> OnThreads<T>(int ranks, Func<PeerLinks, int, T> work)
    {
        var nodes = await Task.WhenAll(Enumerable.Range(0, ranks).Select(_ => DataPlaneNode.StartAsync()));
        var endpoints = nodes.Select(n => n.Endpoint).ToArray();
        for (int r = 0; r < ranks; r++) nodes[r].BeginGeneration(1, r, ranks);
        var links = nodes.Select(n => new PeerLinks(n, 1, endpoints, TransportKind.SharedMemory)).ToArray();
        try
        {
            return await Task.WhenAll(links.Select((l, rank) => Task.Factory.StartNew(() => work(l, rank), TaskCreationOptions.LongRunning)));
        }
        finally
        {
            foreach (var l in links) await l.DisposeAsync();
            foreach (var n in nodes) await n.DisposeAsync();
        }
    }

    /// <summary>A sliced tensor's part of the global one (padding rows dropped), to compare with the single process.</summary>
    static Tensor Part(Tensor global, TensorSlice? slice) =>
        slice is null ? global : cat(slice.Segments.Select(s => global.narrow(slice.Dim, s.Start, s.Length)).ToList(), slice.Dim);

    static Tensor Held(Tensor local, TensorSlice? slice) => slice is null ? local : local.narrow(slice.Dim, 0, slice.Held);

    [Theory]
    [InlineData(2, true)]
    [InlineData(2, false)]
    [InlineData(4, false)]
    public async Task LossAndGradientsMatchTheSingleProcessAndOnlyMegatronsAllReducesCrossTheGroup(int tp, bool bias)
    {
        var spec = Spec with { Bias = bias };
        var (x, y) = Batch();
        using var reference = new Gpt(spec, Vocab, Seed);
        var expectedLoss = reference.Loss(x, y);
        expectedLoss.backward();
        var expectedGrads = reference.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!.clone());
        var expectedWeights = reference.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());

        var results = await OnRanks(tp, (group, recording) =>
        {
            using var model = new ParallelGpt(spec, Vocab, Seed, group);
            Assert.Equal(expectedWeights.Keys, model.Parameters.Select(p => p.Name));
            // Same start as one process: every slice is the single process's weights, bit for bit.
            foreach (var p in model.Parameters)
                Assert.True(Held(p.Tensor, p.Slice).eq(Part(expectedWeights[p.Name], p.Slice)).all().item<bool>(), $"rank {group.Rank}: {p.Name} does not start as one process's");
            var loss = model.Loss(x, y);
            var forward = recording.AllReduces.ToList();
            recording.AllReduces.Clear();
            loss.backward();
            group.ThrowIfFailed();
            var backward = recording.AllReduces.ToList();
            var missing = model.Parameters.Where(p => p.Tensor.grad is null).Select(p => p.Name).ToList();
            Assert.True(missing.Count == 0, $"rank {group.Rank}: no gradient for {string.Join(", ", missing)}");
            var worst = model.Parameters.Select(p =>
                (p.Name, Diff: (Held(p.Tensor.grad!, p.Slice) - Part(expectedGrads[p.Name], p.Slice)).abs().max().item<float>())).MaxBy(d => d.Diff);
            return (Loss: loss.item<float>(), forward, backward, worst);
        });

        long activations = 3L * Spec.BlockSize * Spec.Embedding, tokens = 3L * Spec.BlockSize;
        foreach (var (loss, forward, backward, worst) in results)
        {
            Assert.True(Math.Abs(loss - expectedLoss.item<float>()) <= 1e-5 * expectedLoss.item<float>(), $"tp={tp}: loss {loss} vs one process {expectedLoss.item<float>()}");
            Assert.True(worst.Diff <= 1e-5, $"tp={tp}: gradient of {worst.Name} differs by {worst.Diff}");
            // Forward: the embedding's g, then per block g after attention and after the MLP, then the loss's max, target logit and sum of exponentials.
            (ReduceOp, int)[] expectedForward =
            [
                (ReduceOp.Sum, (int)activations),
                .. Enumerable.Repeat((ReduceOp.Sum, (int)activations), 2 * Spec.Layers),
                (ReduceOp.Max, (int)tokens), (ReduceOp.Sum, (int)tokens), (ReduceOp.Sum, (int)tokens),
            ];
            Assert.Equal(expectedForward, forward);
            // Backward: per block f before attention and before the MLP, and the head's f; the loss's backward needs none.
            Assert.Equal(Enumerable.Repeat((ReduceOp.Sum, (int)activations), 2 * Spec.Layers + 1), backward);
        }
    }

    sealed class NoCommit : Distributed.Training.Checkpoints.ICheckpointCommit
    {
        public void ShardWritten(long step, string directory, Distributed.Training.Checkpoints.ShardRecord shard) { }
    }

    /// <summary>
    /// Three Trainer steps at tp=2 against one process. With dropout the masks differ from one process's (attention
    /// dropout draws a stream per TP rank), so only the replicated parameters are compared: the residual and embedding
    /// dropout draw the shared stream, so they must stay bit-identical on both TP ranks, and a rerun draws the same.
    /// </summary>
    [Theory]
    [InlineData(0.0)]
    [InlineData(0.2)]
    public async Task TrainerStepsMatchTheSingleProcessAndReplicatedParametersStayIdentical(double dropout)
    {
        string dir = TestSupport.TempDir("tp-trainer");
        var spec = TestSupport.TinyJob(dir, "model.n-head=4", "parallel.tp=2", $"model.dropout={dropout.ToString(System.Globalization.CultureInfo.InvariantCulture)}");
        var first = await TrainTensorParallel(spec);
        var again = await TrainTensorParallel(spec);
        Assert.Equal(first[0].values, again[0].values);   // a pure function of (seed, step, coordinates)
        // Replicated parameters (LayerNorms, position embeddings) get the same gradients on every TP rank and stay bit-identical.
        Assert.NotEmpty(first[0].replicated);
        foreach (var (name, tensor) in first[0].replicated)
            Assert.True(tensor.eq(first[1].replicated[name]).all().item<bool>(), $"{name} differs between the TP ranks");
        if (dropout > 0) return;
        double[] single;
        using (var t = new Distributed.Training.Trainer(spec with { Parallel = ParallelSpec.None }, TestSupport.Logger))
            single = Enumerable.Range(0, 3).SelectMany(_ => { var m = t.TrainStep(); return new[] { m.Loss, m.GradNorm }; }).ToArray();
        foreach (var (values, _) in first)
            for (int i = 0; i < single.Length; i++) Assert.True(Math.Abs(values[i] - single[i]) <= 1e-5 * Math.Abs(single[i]), $"value {i}: {values[i]} vs one process {single[i]}");
    }

    static async Task<(double[] values, Dictionary<string, Tensor> replicated)[]> TrainTensorParallel(JobSpec spec) =>
        await TrainInProcess(spec, 2, t =>
        {
            var values = Enumerable.Range(0, 3).SelectMany(_ => { var m = t.TrainStep(); return new[] { m.Loss, m.GradNorm }; }).ToArray();
            return (values, t.Model.Parameters.Where(p => p.IsReplicated).ToDictionary(p => p.Name, p => p.Tensor.detach().clone()));
        });

    /// <summary>Trainers of every rank of the layout, each on its own thread, joined over shared memory as the worker joins them.</summary>
    internal static Task<T[]> TrainInProcess<T>(JobSpec spec, int world, Func<Distributed.Training.Trainer, T> work)
    {
        var layout = ParallelLayout.For(spec, world);
        return OnThreads(world, (links, rank) =>
        {
            var groups = Distributed.Training.TrainerGroups.Create(links, layout, rank, new CollectiveOptions());
            using var t = new Distributed.Training.Trainer(spec, TestSupport.Logger, null, groups, new Distributed.Training.Checkpoints.ShardWriter(new NoCommit()));
            return work(t);
        });
    }

    /// <summary>
    /// The tied embedding lives on the first stage (lookup) and the last (head); its two copies start equal and must
    /// stay bit-identical after every step (their gradients are summed over the embedding group). Also under ZeRO-1
    /// at dp=3, where each stage's data-parallel group reduce-scatters its own buckets: the copies' owner and
    /// reduction order must agree across the stages.
    /// </summary>
    [Theory]
    [InlineData(2)]
    [InlineData(6, "train.batch-size=12", "parallel.shard-optimizer=true")]
    public async Task TheTiedEmbeddingsTwoCopiesStayBitIdenticalAfterEveryStep(int world, params string[] extra)
    {
        var spec = TestSupport.TinyJob(TestSupport.TempDir("pp-tied"), ["parallel.pp=2", "parallel.micro-batches=2", .. extra]);
        var copies = await TrainInProcess(spec, world, t => Enumerable.Range(0, 4).Select(_ =>
        {
            t.TrainStep();
            return t.Model.Parameters.SingleOrDefault(p => p.Name == "wte.weight")?.Tensor.detach().clone();
        }).ToList());
        int dp = world / 2;
        for (int d = 0; d < dp; d++)
            for (int step = 0; step < 4; step++)
                Assert.True(copies[d][step]!.eq(copies[d + dp][step]!).all().item<bool>(), $"dp rank {d}, step {step + 1}: the first and the last stage's wte differ");
        Assert.False(copies[0][0]!.eq(copies[0][3]!).all().item<bool>(), "the embedding did not train");
    }

    [Fact]
    public async Task AMaximumAllReduceGivesEveryRankTheElementwiseMaximum()
    {
        var results = await OnRanks(3, (group, _) =>
        {
            // Sizes on both sides of the one-shot limit, so both algorithms take the maximum.
            return new[] { 5, 300_000 }.Select(length =>
            {
                var t = arange(length, dtype: ScalarType.Float32).remainder(7).add(group.Rank == 1 ? 0.5f : 0f).mul(group.Rank == 2 ? -1f : 1f).contiguous();
                group.AllReduce(t, ReduceOp.Max);
                return t.data<float>().ToArray();
            }).ToArray();
        });
        foreach (var perRank in results)
            foreach (var values in perRank)
                for (int i = 0; i < values.Length; i++) Assert.Equal(i % 7 + 0.5f, values[i]);
    }
}
