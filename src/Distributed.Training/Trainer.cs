using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using Distributed.Comm;
using Distributed.Core;
using Distributed.Model;
using Distributed.Model.Parallel;
using Distributed.Training.Checkpoints;
using Distributed.Training.Data;
using Distributed.Training.Optim;
using Distributed.Training.Schedules;
using Microsoft.Extensions.Logging;
using TorchSharp;
using static TorchSharp.torch;

namespace Distributed.Training;

/// <summary>
/// The training loop (nanoGPT's train.py): sample, forward, backward, clip, AdamW, evaluate, checkpoint. Everything
/// it does is a pure function of the job spec and the step, so a resumed run equals an uninterrupted one bit for bit.
/// In a layout (<see cref="TrainerGroups"/>), each data-parallel rank draws its slice of the global batch and
/// gradients are averaged over the data-parallel group in buckets; with tp > 1 the model is a
/// <see cref="ParallelGpt"/> whose layers communicate over the tensor-parallel group themselves. Every rank then
/// clips by the same global norm and takes the same step; global rank 0 writes the metrics.
/// </summary>
public sealed class Trainer : IDisposable
{
    public const string CheckpointFormat = "distributed-gpt-checkpoint/1";

    readonly JobSpec _spec;
    readonly ILogger _logger;
    readonly TextCorpus _corpus;
    readonly BatchSampler _trainSampler, _trainEvalSampler, _valSampler;
    readonly AdamW _optimizer;
    readonly IProcessGroup? _dataParallel, _gradients;
    readonly TrainerGroups? _groups;
    readonly TensorParallelGroup? _tensorParallel, _embedding, _modelParallel;
    readonly PipelineStage _stage;
    readonly PipelineEngine? _pipeline;
    // ZeRO-1: the data-parallel rank that keeps each parameter's moments and steps it (null: every rank steps all).
    readonly Dictionary<string, int>? _optimizerOwner;
    readonly ShardWriter _checkpoints;
    readonly LocalCommit? _localCommit;
    readonly GradientBuckets? _buckets;
    CancellationToken _cancellation;

    /// <param name="groups">this rank's layout and process groups; none for the plain single process</param>
    /// <param name="checkpoints">writes this rank's checkpoint shards and reports them to the commit; a single process commits its own</param>
    /// <param name="cancellationToken">cancels the initial state broadcast (an aborted generation); <see cref="Run"/> takes its own</param>
    public Trainer(JobSpec spec, ILogger logger, string? resumeFrom = null, TrainerGroups? groups = null, ShardWriter? checkpoints = null,
        CancellationToken cancellationToken = default)
    {
        _spec = spec;
        _cancellation = cancellationToken;
        _logger = logger;
        _groups = groups;
        _dataParallel = groups?.Data;
        _gradients = groups?.Gradients;
        _stage = groups?.Layout.StageOf(groups.Rank, spec.Model.Layers) ?? PipelineStage.Whole;
        if (groups is { Layout.Tp: > 1 } or { Layout.Pp: > 1 })
        {
            _tensorParallel = new TensorParallelGroup(groups.Tensor);
            // Without a pipeline the model-parallel group is the TP group: the norm's all-reduce counts among TP traffic.
            _modelParallel = groups.Layout.Pp > 1 ? new TensorParallelGroup(groups.ModelParallel) : _tensorParallel;
            if (groups.Embedding is { } embedding) _embedding = new TensorParallelGroup(embedding);
        }
        spec.ValidateDataParallel(DataParallelSize);
        if (checkpoints is null)
        {
            if (WorldSize > 1) throw new ArgumentException("a parallel trainer needs a checkpoint commit that collects every rank's shard", nameof(checkpoints));
            _localCommit = new LocalCommit(CheckpointDirectory, spec.Checkpoint.Keep, spec);
            checkpoints = new ShardWriter(_localCommit);
        }
        _checkpoints = checkpoints;
        torch.set_num_threads(spec.Threads > 0 ? spec.Threads : Environment.ProcessorCount);

        var loading = Stopwatch.StartNew();
        LoadedCheckpoint? checkpoint = resumeFrom is null ? null : CheckpointFiles.Load(resumeFrom);
        var verifying = loading.Elapsed;
        try
        {
            var tokenizer = checkpoint is null ? null : CheckpointVocabulary.Read(checkpoint);
            _corpus = TextCorpus.Load(spec.Data, spec.Model.BlockSize, tokenizer);
            _trainSampler = new BatchSampler(_corpus.Train, spec.Model.BlockSize, spec.Seed, Seeds.TrainStream);
            // Evaluation draws its own windows: not the ones training steps 0..eval-iters saw.
            _trainEvalSampler = new BatchSampler(_corpus.Train, spec.Model.BlockSize, spec.Seed, Seeds.EvalStream);
            _valSampler = new BatchSampler(_corpus.Validation, spec.Model.BlockSize, spec.Seed, Seeds.ValidationStream);
            Model = _tensorParallel is null
                ? new Gpt(spec.Model, _corpus.Tokenizer.Size, spec.Seed)
                : new ParallelGpt(spec.Model, _corpus.Tokenizer.Size, spec.Seed, _tensorParallel, _stage);
            if (groups is { Layout.Pp: > 1 })
                _pipeline = new PipelineEngine((ParallelGpt)Model, groups.Pipeline, _tensorParallel!, spec.Parallel.Schedule, spec.Parallel.MicroBatches);
            // A group of one has nothing to average: it trains exactly as the plain loop does (no buckets).
            var plan = _dataParallel is { Size: > 1 }
                ? BucketPlan.Of(Model, (long)(_spec.Cluster.BucketMegabytes * 1_000_000), spec.Parallel.ShardOptimizer ? DataParallelSize : 1)
                : null;
            if (plan is { Sharded: true }) _optimizerOwner = plan.OwnerByName(Model);
            _optimizer = new AdamW(Model.Parameters.Where(Steps).Select(p => (p.Name, p.Tensor)), spec.Optimizer);
            if (checkpoint is not null)
            {
                loading.Restart();
                Restore(checkpoint);
                _logger.LogInformation("Resumed from {Path} at step {Step}: shards verified in {VerifyMs:F0} ms, {Bytes:N0} bytes of state read in {ReadMs:F0} ms",
                    checkpoint.Path, Step, verifying.TotalMilliseconds, StateTensors().Sum(s => s.Tensor.NumberOfElements * s.Tensor.ElementSize),
                    loading.Elapsed.TotalMilliseconds);
            }
            _logger.LogInformation("Rank {Rank} holds {Bytes:N0} bytes of weights and AdamW moments ({Moments:N0} of moments; {Elements:N0} parameters of the model's {Total:N0})",
                Rank, (Model.Parameters.Sum(p => p.Tensor.NumberOfElements) + 2 * _optimizer.State.Sum(s => s.ExpAvg.NumberOfElements)) * sizeof(float),
                2 * _optimizer.State.Sum(s => s.ExpAvg.NumberOfElements) * sizeof(float), Model.Parameters.Sum(p => p.Tensor.NumberOfElements),
                Model.Parameters.Sum(p => p.Slice is { } s ? s.GlobalShape.Aggregate(1L, (a, b) => a * b) : p.Tensor.NumberOfElements));
            if (plan is not null)
            {
                SynchronizeWithRankZero();
                // A pipeline interleaves micro-batches' forwards and backwards: its buckets start after the schedule.
                _buckets = new GradientBuckets(Model, _gradients!, _dataParallel!, plan, _spec.Cluster.Overlap && _pipeline is null);
            }
        }
        catch
        {
            // A start that fails or is cancelled (an aborted generation, mid-broadcast) leaves no native tensors behind in the worker process.
            _optimizer?.Dispose();
            Model?.Dispose();
            throw;
        }
        finally
        {
            checkpoint?.Dispose();
        }
    }

    public ILanguageModel Model { get; }
    public int DataParallelRank => _dataParallel?.Rank ?? 0;
    public int DataParallelSize => _dataParallel?.Size ?? 1;
    public int TensorParallelRank => _tensorParallel?.Rank ?? 0;
    public PipelineStage Stage => _stage;
    public int Rank => _groups?.Rank ?? 0;
    public int WorldSize => _groups?.Layout.World ?? 1;

    /// <summary>The rank that writes metrics and evaluations: TP rank 0 of DP rank 0 on the last stage, which has the loss (every rank writes its checkpoint shard).</summary>
    public bool IsLeader => Rank == (_groups?.Layout.ReportingRank ?? 0);
    public CharTokenizer Tokenizer => _corpus.Tokenizer;
    public AdamW Optimizer => _optimizer;

    /// <summary>Optimizer steps completed.</summary>
    public long Step { get; private set; }

    public string CheckpointDirectory => Path.Combine(_spec.RunDir, "checkpoints");

    /// <summary>Trains until max-iters (or <paramref name="stopAtStep"/>), then writes a final checkpoint.</summary>
    public EvalResult? Run(ITrainingObserver observer, long? stopAtStep = null, CancellationToken cancellationToken = default)
    {
        _cancellation = cancellationToken;
        long last = Math.Min(_spec.Train.MaxIters, stopAtStep ?? long.MaxValue);
        Directory.CreateDirectory(_spec.RunDir);
        // Flushed every line, so `tail -f metrics.jsonl` follows the run and a killed run keeps every step it logged.
        using var metrics = IsLeader ? new StreamWriter(Path.Combine(_spec.RunDir, "metrics.jsonl"), append: true) { AutoFlush = true } : StreamWriter.Null;
        using var evals = IsLeader ? new StreamWriter(Path.Combine(_spec.RunDir, "eval.jsonl"), append: true) : StreamWriter.Null;
        // Every stage's own timing (the bubble is per stage: bench/pipeline reads these).
        using var stageTimes = _pipeline is null ? StreamWriter.Null : OpenStageTimes();
        using var tensorBoard = Observability.TensorBoardLog.ForRun(_spec, IsLeader, _checkpoints);
        observer = Observability.TrainingObservers.Combine(observer, tensorBoard);
        // Read on this thread: OpenMP's thread count is a per-thread setting, and this is the thread that trains.
        _logger.LogInformation("Training on thread '{Thread}' with {IntraOp} intra-op and {InterOp} inter-op torch threads",
            Thread.CurrentThread.Name ?? "main", torch.get_num_threads(), torch.get_num_interop_threads());
        observer.OnStart(Step, last);
        EvalResult? lastEval = null;
        while (Step < last)
        {
            cancellationToken.ThrowIfCancellationRequested();
            _checkpoints.ThrowIfFailed();   // a shard that could not be written stops training now, not at the next checkpoint
            var m = TrainStep();
            metrics.WriteLine(JsonSerializer.Serialize(new
            {
                step = m.Step, loss = m.Loss, lr = m.LearningRate, grad_norm = m.GradNorm,
                tokens_per_s = Math.Round(m.TokensPerSecond, 1), step_ms = Math.Round(m.StepMs, 3),
                compute_ms = Math.Round(m.ComputeMs, 3), allreduce_ms = Math.Round(m.AllReduceMs, 3), allreduce_bytes = m.AllReduceBytes,
                tp_allreduce_ms = Math.Round(m.TensorParallelMs, 3), tp_allreduce_bytes = m.TensorParallelBytes, tp_allreduces = m.TensorParallelAllReduces,
                wall_time = Math.Round((DateTime.UtcNow - DateTime.UnixEpoch).TotalSeconds, 6),   // when the step ended, seconds since 1970 (UTC)
            }));
            observer.OnStep(m);
            if (_pipeline is not null)
                stageTimes.WriteLine(JsonSerializer.Serialize(new
                {
                    step = m.Step, stage = _stage.Index, step_ms = Math.Round(m.StepMs, 3), wait_ms = Math.Round(_pipeline.Waiting.TotalMilliseconds, 3),
                    peak_in_flight = _pipeline.PeakInFlight, peak_rss_bytes = PeakResidentBytes(),
                    // Each pass: name, then start, input in hand, compute done, output handed on, in microseconds of the
                    // host's monotonic clock (shared by its processes, so stages line up).
                    passes = _pipeline.Timeline.Select(t => new object[]
                        { t.Pass.ToString(), Microseconds(t.Start), Microseconds(t.Ready), Microseconds(t.Done), Microseconds(t.End) }),
                }));

            if (Step % _spec.Train.EvalInterval == 0 || Step == _spec.Train.MaxIters)
            {
                lastEval = Evaluate();
                evals.WriteLine(JsonSerializer.Serialize(new
                {
                    step = lastEval.Step, train_loss = lastEval.TrainLoss, val_loss = lastEval.ValLoss, val_perplexity = lastEval.ValPerplexity,
                }));
                evals.Flush();
                observer.OnEval(lastEval);
            }
            // The last one needs no copy of the state: nothing changes it before the Wait below.
            if (Step % _spec.Checkpoint.Every == 0 || Step == last) BeginCheckpoint(copy: Step != last);
            AnnounceCommits(observer);
        }
        _checkpoints.Wait();
        AnnounceCommits(observer);
        return lastEval;
    }

    static long PeakResidentBytes()
    {
        using var self = Process.GetCurrentProcess();
        return self.PeakWorkingSet64;
    }

    StreamWriter OpenStageTimes()
    {
        string dir = Path.Combine(_spec.RunDir, "pipeline");
        Directory.CreateDirectory(dir);
        return new StreamWriter(Path.Combine(dir, $"rank-{Rank}.jsonl"), append: true) { AutoFlush = true };
    }

    static long Microseconds(long ticks) => (long)(ticks * (1e6 / Stopwatch.Frequency));

    /// <summary>One optimizer step over the whole global batch (this rank's slice, accumulating micro-batches).</summary>
    public StepMetrics TrainStep()
    {
        var clock = Stopwatch.StartNew();
        var (tpTime, tpBytes, tpCount) = (_tensorParallel?.Elapsed ?? TimeSpan.Zero, _tensorParallel?.Bytes ?? 0, _tensorParallel?.AllReduces ?? 0);
        using var scope = NewDisposeScope();
        Model.Module.train();
        // Dropout masks are a pure function of (seed, step, coordinates), so a resumed run draws the same ones: replicated
        // regions by the data-parallel rank (alike on every TP rank), TP-split regions by the TP rank too.
        long stageAndDp = ((long)_stage.Index << 32) | (uint)DataParallelRank;   // the data-parallel rank alone without a pipeline
        Model.SeedDropout((long)(Seeds.Derive(_spec.Seed, Seeds.DropoutStream, Step, stageAndDp) >> 1),
            (long)(Seeds.Derive(_spec.Seed, Seeds.TensorParallelDropoutStream, Step, stageAndDp ^ ((long)TensorParallelRank << 48)) >> 1));
        double learningRate = LearningRateSchedule.At(_spec.Optimizer, Step);
        int accum = _spec.Train.GradAccum;
        double loss = 0;
        // One deadline for the step's gradient collectives, which may start while backward runs.
        using var deadline = CollectiveDeadline();
        SetDeadline(deadline.Token);
        if (_pipeline is not null)
        {
            _buckets?.BeginMicroBatch(final: true, deadline.Token);
            int micro = _pipeline.MicroBatches;
            loss = _pipeline.TrainStep(m =>
            {
                var (first, count) = BatchSampler.Slice(_spec.Train.BatchSize, DataParallelRank, DataParallelSize, m, micro);
                return Batch(_trainSampler, Step, first, count);
            }, deadline.Token);
            _buckets?.SetLoss(loss);
        }
        else for (int micro = 0; micro < accum; micro++)
        {
            var (first, count) = BatchSampler.Slice(_spec.Train.BatchSize, DataParallelRank, DataParallelSize, micro, accum);
            var (x, y) = Batch(_trainSampler, Step, first, count);
            _buckets?.BeginMicroBatch(final: micro == accum - 1, deadline.Token);
            var microLoss = Model.Loss(x, y) / accum;
            loss += microLoss.item<float>();
            if (micro == accum - 1) _buckets?.SetLoss(loss);
            microLoss.backward();
            _tensorParallel?.ThrowIfFailed();
        }
        double computeMs = clock.Elapsed.TotalMilliseconds;
        double allReduceMs = 0;
        long allReduceBytes = 0;
        if (_buckets is not null)
        {
            // Waits for what backward has not hidden (everything, without overlap).
            var reduceClock = Stopwatch.StartNew();
            Wait(_buckets.FinishAsync());
            allReduceMs = reduceClock.Elapsed.TotalMilliseconds;
            allReduceBytes = _buckets.Bytes;
        }
        // Under ZeRO-1 only the owner's copy is averaged: the same data-parallel rank owns it on both stages (BucketPlan).
        SumTiedEmbeddingGradients();
        double gradNorm = ClipGradients(deadline.Token);
        _optimizer.Step(learningRate);
        if (_optimizerOwner is not null)
        {
            var gatherClock = Stopwatch.StartNew();
            Wait(_buckets!.GatherWeightsAsync(deadline.Token));
            allReduceMs += gatherClock.Elapsed.TotalMilliseconds;
        }
        if (_buckets is not null)
        {
            loss = _buckets.MeanLoss;
            _buckets.ZeroGradients();   // in place: the gradients stay views of their buckets
        }
        else Model.Module.zero_grad();
        double ms = clock.Elapsed.TotalMilliseconds;
        var result = new StepMetrics(Step + 1, loss, learningRate, gradNorm,
            _spec.Train.BatchSize * _spec.Model.BlockSize / (ms / 1000.0), ms, computeMs, allReduceMs, allReduceBytes,
            ((_tensorParallel?.Elapsed ?? TimeSpan.Zero) - tpTime).TotalMilliseconds, (_tensorParallel?.Bytes ?? 0) - tpBytes, (_tensorParallel?.AllReduces ?? 0) - tpCount);
        Step++;
        return result;
    }

    /// <summary>
    /// Clips by the global gradient norm. Under tensor parallelism every parameter counts once: each rank adds its
    /// slices, TP rank 0 adds the replicated parameters (identical on every TP rank), and the squared sum is
    /// all-reduced over the TP group, so every rank clips by the same norm. Under ZeRO-1 a rank holds the averaged
    /// gradients of its own parameters only: it adds and clips those, and the sum goes over the data-parallel group too.
    /// </summary>
    double ClipGradients(CancellationToken deadline)
    {
        var held = Model.Parameters.Where(Steps).ToList();
        var all = held.Select(p => (Tensor)p.Tensor).ToList();
        if (_modelParallel is null && _optimizerOwner is null) return GradientClipping.ClipByGlobalNorm(all, _spec.Optimizer.GradClip);
        var counted = held.Where(p => (!p.IsReplicated || TensorParallelRank == 0) && !IsTiedCopy(p)).Select(p => (Tensor)p.Tensor);
        double Reduce(double squared)
        {
            var sum = new[] { (float)squared };
            if (_optimizerOwner is not null) Wait(_dataParallel!.AllReduceAsync(sum, ReduceOp.Sum, deadline));
            if (_modelParallel is { } group)
            {
                using var across = tensor(sum);
                group.AllReduce(across, ReduceOp.Sum);
                return across.item<float>();
            }
            return sum[0];
        }
        return GradientClipping.ClipByGlobalNorm(all, _spec.Optimizer.GradClip, Reduce, counted);
    }

    /// <summary>Whether this rank steps <paramref name="p"/> (all of them, except under ZeRO-1: the ones it owns).</summary>
    bool Steps(ModelParameter p) => _optimizerOwner is null || _optimizerOwner[p.Name] == DataParallelRank;

    /// <summary>The last stage's copy of the tied embedding (the first stage's counts in the norm and is written to checkpoints).</summary>
    bool IsTiedCopy(ModelParameter p) => _stage is { IsLast: true, IsFirst: false } && p.Name == TiedEmbedding;

    const string TiedEmbedding = "wte.weight";
    const string OptimizerPrefix = "optim.";

    /// <summary>
    /// The tied embedding lives on the first stage (lookup) and the last (head): each copy got part of the gradient,
    /// so the pair sums them (Megatron's embedding group) and both take the same step, staying bit-identical.
    /// </summary>
    void SumTiedEmbeddingGradients()
    {
        if (_embedding is null) return;
        var grad = Model.Parameters.Single(p => p.Name == TiedEmbedding).Tensor.grad
            ?? throw new InvalidOperationException($"the tied embedding on {_stage} has no gradient");
        _embedding.AllReduce(grad, ReduceOp.Sum);
    }

    void SetDeadline(CancellationToken token)
    {
        foreach (var group in new[] { _tensorParallel, _modelParallel, _embedding }) if (group is not null) group.Cancellation = token;
    }

    /// <summary>
    /// Mean loss over eval-iters fixed batches of each split (the same batches at every evaluation). Data-parallel
    /// ranks share the batches out and sum their losses.
    /// </summary>
    public EvalResult Evaluate()
    {
        Model.Module.eval();
        using var deadline = CollectiveDeadline(Math.Max(1, _spec.Train.EvalIters * 2 * (5 + 2 * _spec.Model.Layers)));
        SetDeadline(deadline.Token);
        double Sum(BatchSampler sampler)
        {
            using var noGrad = no_grad();
            double sum = 0;
            for (int i = DataParallelRank; i < _spec.Train.EvalIters; i += DataParallelSize)
            {
                using var scope = NewDisposeScope();
                var (x, y) = Batch(sampler, i, 0, _spec.Train.BatchSize);
                sum += _pipeline is null ? Model.Loss(x, y).item<float>() : _pipeline.Loss(x, y, deadline.Token);
            }
            return sum;
        }
        var sums = new[] { (float)Sum(_trainEvalSampler), (float)Sum(_valSampler) };
        if (_dataParallel is not null) Collective(ct => _dataParallel.AllReduceAsync(sums, ReduceOp.Sum, ct));
        Model.Module.train();
        return new EvalResult(Step, sums[0] / _spec.Train.EvalIters, sums[1] / _spec.Train.EvalIters);
    }

    /// <summary>
    /// Runs collectives from the training thread (which may block: it is not an actor's), bounded by a deadline
    /// for the whole operation on top of the per-chunk one the process group enforces; an operation made of
    /// several collectives gets that deadline once per collective.
    /// </summary>
    void Collective(Func<CancellationToken, Task> operation, int collectives = 1)
    {
        using var deadline = CollectiveDeadline(collectives);
        Wait(operation(deadline.Token));
    }

    CancellationTokenSource CollectiveDeadline(int collectives = 1)
    {
        var deadline = CancellationTokenSource.CreateLinkedTokenSource(_cancellation);
        deadline.CancelAfter(TimeSpan.FromSeconds(_spec.Cluster.CollectiveTimeoutSeconds * 4 * collectives));
        return deadline;
    }

    static void Wait(Task task) => task.GetAwaiter().GetResult();

    /// <summary>
    /// Makes every data-parallel rank start from DP rank 0's state (weights, optimizer moments and step counters, as DDP broadcasts
    /// its module; under TP each TP rank's DP group broadcasts its slices), tensor by tensor in pieces straight between the tensors' memory, then checks by SHA-256 that
    /// they really are identical.
    /// </summary>
    void SynchronizeWithRankZero()
    {
        // Under ZeRO-1 each rank's moments are its own (loaded from the checkpoint by their owner): only weights are shared.
        var tensors = StateTensors().Where(s => _optimizerOwner is null || !s.Name.StartsWith(OptimizerPrefix, StringComparison.Ordinal))
            .Select(s => TensorBytes.Of(s.Tensor, s.Name)).ToList();
        long[] counters = [Step, _optimizer.StepCount];
        var clock = Stopwatch.StartNew();
        byte[] hash = [];
        Collective(async ct => hash = await StateBroadcast.RunAsync(_dataParallel!, counters, tensors, root: 0, cancellationToken: ct),
            StateBroadcast.Collectives(tensors));
        (Step, _optimizer.StepCount) = (counters[0], counters[1]);
        _logger.LogInformation("Rank {Rank} starts from rank 0's state at step {Step}: {Bytes:N0} bytes in {Tensors} tensors, broadcast and verified in {Ms:F0} ms, sha256 {Hash}",
            DataParallelRank, Step, tensors.Sum(t => t.Length), tensors.Count, clock.Elapsed.TotalMilliseconds, Convert.ToHexStringLower(hash));
    }

    static (Tensor X, Tensor Y) Batch(BatchSampler sampler, long step, int first, int count)
    {
        var (x, y) = sampler.Draw(step, first, count);
        long[] shape = [count, sampler.BlockSize];
        return (tensor(x, shape), tensor(y, shape));
    }

    /// <summary>Everything needed to continue: weights, moments, step, and what makes the data order reproducible.</summary>
    /// <summary>
    /// This rank's part of the state under global names: its slices of sharded parameters and their moments (which
    /// have the parameter's slice), and the replicated ones.
    /// </summary>
    public IReadOnlyList<StateEntry> StateTensors()
    {
        var slices = Model.Parameters.ToDictionary(p => p.Name, p => p.Slice);
        var list = new List<StateEntry>();
        foreach (var p in Model.Parameters) list.Add(new StateEntry(CheckpointFiles.ModelPrefix + p.Name, p.Tensor, p.Slice));
        foreach (var (name, m, v) in _optimizer.State)
        {
            list.Add(new StateEntry(OptimizerPrefix + "exp_avg." + name, m, slices[name]));
            list.Add(new StateEntry(OptimizerPrefix + "exp_avg_sq." + name, v, slices[name]));
        }
        return list;
    }

    public Dictionary<string, string> StateMetadata() => new()
    {
        ["format"] = CheckpointFormat,
        ["step"] = Step.ToString(CultureInfo.InvariantCulture),
        ["optimizer_step"] = _optimizer.StepCount.ToString(CultureInfo.InvariantCulture),
        ["seed"] = _spec.Seed.ToString(CultureInfo.InvariantCulture),
        // The sampler and dropout are counter-based: (seed, step) is their whole state.
        ["sampler_position"] = Step.ToString(CultureInfo.InvariantCulture),
        ["job"] = JsonSerializer.Serialize(_spec),
        [CheckpointVocabulary.Key] = CheckpointVocabulary.Encode(_corpus.Tokenizer),
    };

    /// <summary>
    /// Starts writing this rank's shard of the state at this step (ranks split the tensors between them); the write
    /// overlaps the following steps, and the commit happens when every shard has been reported.
    /// </summary>
    /// <param name="copy">false writes from the live tensors: only when nothing changes them before <see cref="FinishCheckpoint"/></param>
    public void BeginCheckpoint(bool copy = true)
    {
        var metadata = StateMetadata();
        metadata["shard"] = $"{Rank}/{WorldSize}";
        // Replicated tensors are written by TP rank 0 only; each DP group deals its TP rank's tensors between its ranks.
        // ... and the first stage alone writes the tied embedding (and its moments): the last stage's is the same.
        bool tiedCopy = _stage is { IsLast: true, IsFirst: false };
        var mine = StateTensors().Where(e => (e.Slice is not null || TensorParallelRank == 0) && !(tiedCopy && e.Name.EndsWith("." + TiedEmbedding, StringComparison.Ordinal))).ToList();
        _checkpoints.Begin(Step, CheckpointFiles.DirectoryFor(CheckpointDirectory, Step), Rank, WorldSize,
            _optimizerOwner is null
                ? CheckpointFiles.ShardOf(mine, DataParallelRank, DataParallelSize)
                // ZeRO-1: the weights dealt as always, each rank's moments written by that rank (the only one holding them).
                : [.. CheckpointFiles.ShardOf(mine.Where(e => !e.Name.StartsWith(OptimizerPrefix, StringComparison.Ordinal)).ToList(), DataParallelRank, DataParallelSize),
                   .. mine.Where(e => e.Name.StartsWith(OptimizerPrefix, StringComparison.Ordinal))],
            metadata, copy);
    }

    /// <summary>Waits for the shard being written, if any.</summary>
    public void FinishCheckpoint() => _checkpoints.Wait();

    void AnnounceCommits(ITrainingObserver observer)
    {
        while (_localCommit is not null && _localCommit.TryTake(out var committed)) observer.OnCheckpoint(committed.Step, committed.Directory);
    }

    void Restore(LoadedCheckpoint checkpoint)
    {
        if (checkpoint.Require("format") != CheckpointFormat)
            throw new CheckpointException($"checkpoint '{checkpoint.Path}' has format '{checkpoint.Metadata["format"]}', expected '{CheckpointFormat}'");
        checkpoint.CopyInto(StateTensors());
        Step = long.Parse(checkpoint.Require("step"), CultureInfo.InvariantCulture);
        _optimizer.StepCount = long.Parse(checkpoint.Require("optimizer_step"), CultureInfo.InvariantCulture);
    }

    public void Dispose()
    {
        _checkpoints.Dispose();
        _buckets?.Dispose();
        _optimizer.Dispose();
        Model.Dispose();
    }
}
