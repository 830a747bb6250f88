using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using Distributed.Comm;
using Distributed.Core;
using Distributed.Model;
using Distributed.Training.Checkpoints;
using Distributed.Training.Data;
using Distributed.Training.Optim;
using Microsoft.Extensions.Logging;
using TorchSharp;
using static TorchSharp.torch;

namespace Distributed.Training;

/// <summary>
/// The training loop (nanoGPT's train.py): sample, forward, backward, clip, AdamW, evaluate, checkpoint. Everything
/// it does is a pure function of the job spec and the step, so a resumed run equals an uninterrupted one bit for bit.
/// With a data-parallel group, each rank draws its slice of the global batch, gradients are averaged over the group
/// in buckets, and every rank then clips by the same norm and takes the same step; rank 0 writes files.
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
    readonly ShardWriter _checkpoints;
    readonly LocalCommit? _localCommit;
    readonly GradientBuckets? _buckets;
    CancellationToken _cancellation;

    /// <param name="dataParallel">the data-parallel group (exact float32 collectives)</param>
    /// <param name="gradients">the group gradients are averaged over; defaults to <paramref name="dataParallel"/> (a compressed one may be given)</param>
    /// <param name="checkpoints">writes this rank's checkpoint shards and reports them to the commit; a single process commits its own</param>
    public Trainer(JobSpec spec, ILogger logger, string? resumeFrom = null, IProcessGroup? dataParallel = null, IProcessGroup? gradients = null,
        ShardWriter? checkpoints = null)
    {
        _spec = spec;
        _logger = logger;
        _dataParallel = dataParallel;
        _gradients = gradients ?? dataParallel;
        spec.ValidateDataParallel(DataParallelSize);
        if (checkpoints is null)
        {
            if (DataParallelSize > 1) throw new ArgumentException("a data-parallel trainer needs a checkpoint commit that collects every rank's shard", nameof(checkpoints));
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
            var tokenizer = checkpoint is null ? null : new CharTokenizer(checkpoint.Require("vocab"));
            _corpus = TextCorpus.Load(spec.Data, spec.Model.BlockSize, tokenizer);
            _trainSampler = new BatchSampler(_corpus.Train, spec.Model.BlockSize, spec.Seed, Seeds.TrainStream);
            // Evaluation draws its own windows: not the ones training steps 0..eval-iters saw.
            _trainEvalSampler = new BatchSampler(_corpus.Train, spec.Model.BlockSize, spec.Seed, Seeds.EvalStream);
            _valSampler = new BatchSampler(_corpus.Validation, spec.Model.BlockSize, spec.Seed, Seeds.ValidationStream);
            Model = new Gpt(spec.Model, _corpus.Tokenizer.Size, spec.Seed);
            _optimizer = new AdamW(Model.named_parameters(), spec.Optimizer);
            if (checkpoint is not null)
            {
                loading.Restart();
                Restore(checkpoint);
                _logger.LogInformation("Resumed from {Path} at step {Step}: shards verified in {VerifyMs:F0} ms, {Bytes:N0} bytes of state read in {ReadMs:F0} ms",
                    checkpoint.Path, Step, verifying.TotalMilliseconds, StateTensors().Sum(s => s.Tensor.NumberOfElements * s.Tensor.ElementSize),
                    loading.Elapsed.TotalMilliseconds);
            }
            if (_dataParallel is not null) SynchronizeWithRankZero();
            // A group of one has nothing to average: it trains exactly as the plain loop does.
            if (_dataParallel is { Size: > 1 })
            {
                _buckets = new GradientBuckets(Model, _gradients!, _dataParallel, (long)(_spec.Cluster.BucketMegabytes * 1_000_000), _spec.Cluster.Overlap);
            }
        }
        finally
        {
            checkpoint?.Dispose();
        }
    }

    public Gpt Model { get; }
    public int DataParallelRank => _dataParallel?.Rank ?? 0;
    public int DataParallelSize => _dataParallel?.Size ?? 1;

    /// <summary>The rank that writes metrics and checkpoints.</summary>
    public bool IsLeader => DataParallelRank == 0;
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
        // Read on this thread: OpenMP's thread count is a per-thread setting, and this is the thread that trains.
        _logger.LogInformation("Training on thread '{Thread}' with {IntraOp} intra-op and {InterOp} inter-op torch threads",
            Thread.CurrentThread.Name ?? "main", torch.get_num_threads(), torch.get_num_interop_threads());
        observer.OnStart(Step, last);
        EvalResult? lastEval = null;
        while (Step < last)
        {
            cancellationToken.ThrowIfCancellationRequested();
            var m = TrainStep();
            metrics.WriteLine(JsonSerializer.Serialize(new
            {
                step = m.Step, loss = m.Loss, lr = m.LearningRate, grad_norm = m.GradNorm,
                tokens_per_s = Math.Round(m.TokensPerSecond, 1), step_ms = Math.Round(m.StepMs, 3),
                compute_ms = Math.Round(m.ComputeMs, 3), allreduce_ms = Math.Round(m.AllReduceMs, 3), allreduce_bytes = m.AllReduceBytes,
                wall_time = Math.Round((DateTime.UtcNow - DateTime.UnixEpoch).TotalSeconds, 6),   // when the step ended, seconds since 1970 (UTC)
            }));
            observer.OnStep(m);

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

    /// <summary>One optimizer step over the whole global batch (this rank's slice, accumulating micro-batches).</summary>
    public StepMetrics TrainStep()
    {
        var clock = Stopwatch.StartNew();
        using var scope = NewDisposeScope();
        Model.train();
        // Dropout masks are a pure function of (seed, step, rank), so a resumed run draws the same ones.
        torch.manual_seed((long)(Seeds.Derive(_spec.Seed, Seeds.DropoutStream, Step, DataParallelRank) >> 1));
        double learningRate = LearningRateSchedule.At(_spec.Optimizer, Step);
        int accum = _spec.Train.GradAccum;
        double loss = 0;
        // One deadline for the step's gradient collectives, which may start while backward runs.
        using var deadline = CollectiveDeadline();
        for (int micro = 0; micro < accum; micro++)
        {
            var (first, count) = BatchSampler.Slice(_spec.Train.BatchSize, DataParallelRank, DataParallelSize, micro, accum);
            var (x, y) = Batch(_trainSampler, Step, first, count);
            _buckets?.BeginMicroBatch(final: micro == accum - 1, deadline.Token);
            var microLoss = Model.Loss(x, y) / accum;
            loss += microLoss.item<float>();
            if (micro == accum - 1) _buckets?.SetLoss(loss);
            microLoss.backward();
        }
        double computeMs = clock.Elapsed.TotalMilliseconds;
        double allReduceMs = 0;
        long allReduceBytes = 0;
        if (_buckets is not null)
        {
            // Waits for what backward has not hidden (everything, without overlap).
            var reduceClock = Stopwatch.StartNew();
            Wait(_buckets.FinishAsync());
            loss = _buckets.MeanLoss;
            allReduceMs = reduceClock.Elapsed.TotalMilliseconds;
            allReduceBytes = _buckets.Bytes;
        }
        double gradNorm = GradientClipping.ClipByGlobalNorm(Model.parameters(), _spec.Optimizer.GradClip);
        _optimizer.Step(learningRate);
        if (_buckets is not null) _buckets.ZeroGradients();   // in place: the gradients stay views of their buckets
        else Model.zero_grad();
        double ms = clock.Elapsed.TotalMilliseconds;
        var result = new StepMetrics(Step + 1, loss, learningRate, gradNorm,
            _spec.Train.BatchSize * _spec.Model.BlockSize / (ms / 1000.0), ms, computeMs, allReduceMs, allReduceBytes);
        Step++;
        return result;
    }

    /// <summary>
    /// Mean loss over eval-iters fixed batches of each split (the same batches at every evaluation). Data-parallel
    /// ranks share the batches out and sum their losses.
    /// </summary>
    public EvalResult Evaluate()
    {
        Model.eval();
        double Sum(BatchSampler sampler)
        {
            using var noGrad = no_grad();
            double sum = 0;
            for (int i = DataParallelRank; i < _spec.Train.EvalIters; i += DataParallelSize)
            {
                using var scope = NewDisposeScope();
                var (x, y) = Batch(sampler, i, 0, _spec.Train.BatchSize);
                sum += Model.Loss(x, y).item<float>();
            }
            return sum;
        }
        var sums = new[] { (float)Sum(_trainEvalSampler), (float)Sum(_valSampler) };
        if (_dataParallel is not null) Collective(ct => _dataParallel.AllReduceAsync(sums, ReduceOp.Sum, ct));
        Model.train();
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
    /// Makes every rank start from rank 0's state (weights, optimizer moments and step counters, as DDP broadcasts
    /// its module), tensor by tensor in pieces straight between the tensors' memory, then checks by SHA-256 that
    /// they really are identical.
    /// </summary>
    void SynchronizeWithRankZero()
    {
        var tensors = StateTensors().Select(s => TensorBytes.Of(s.Tensor, s.Name)).ToList();
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
    public IReadOnlyList<StateEntry> StateTensors()
    {
        var list = new List<StateEntry>();
        foreach (var (name, p) in Model.named_parameters()) list.Add(new("model." + name, p));
        foreach (var (name, m, v) in _optimizer.State)
        {
            list.Add(new("optim.exp_avg." + name, m));
            list.Add(new("optim.exp_avg_sq." + name, v));
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
        ["vocab"] = _corpus.Tokenizer.Vocabulary,
    };

    /// <summary>
    /// Starts writing this rank's shard of the state at this step (ranks split the tensors between them); the write
    /// overlaps the following steps, and the commit happens when every shard has been reported.
    /// </summary>
    /// <param name="copy">false writes from the live tensors: only when nothing changes them before <see cref="FinishCheckpoint"/></param>
    public void BeginCheckpoint(bool copy = true)
    {
        var metadata = StateMetadata();
        metadata["shard"] = $"{DataParallelRank}/{DataParallelSize}";
        _checkpoints.Begin(Step, CheckpointFiles.DirectoryFor(CheckpointDirectory, Step), DataParallelRank, DataParallelSize,
            CheckpointFiles.ShardOf(StateTensors(), DataParallelRank, DataParallelSize), metadata, copy);
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
