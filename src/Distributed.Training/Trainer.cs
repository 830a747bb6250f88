using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
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
/// The single-process training loop (nanoGPT's train.py): sample, forward, backward, clip, AdamW, evaluate,
/// checkpoint. Everything it does is a pure function of the job spec and the step, so a resumed run equals an
/// uninterrupted one bit for bit.
/// </summary>
public sealed class Trainer : IDisposable
{
    public const string CheckpointFormat = "distributed-gpt-checkpoint/1";

    readonly JobSpec _spec;
    readonly ILogger _logger;
    readonly TextCorpus _corpus;
    readonly BatchSampler _trainSampler, _trainEvalSampler, _valSampler;
    readonly AdamW _optimizer;

    public Trainer(JobSpec spec, ILogger logger, string? resumeFrom = null)
    {
        _spec = spec;
        _logger = logger;
        torch.set_num_threads(spec.Threads > 0 ? spec.Threads : Environment.ProcessorCount);

        LoadedCheckpoint? checkpoint = resumeFrom is null ? null : CheckpointFiles.Load(resumeFrom);
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
                Restore(checkpoint);
                _logger.LogInformation("Resumed from {Path} at step {Step}", checkpoint.Path, Step);
            }
        }
        finally
        {
            checkpoint?.Dispose();
        }
    }

    public Gpt Model { get; }
    public CharTokenizer Tokenizer => _corpus.Tokenizer;
    public AdamW Optimizer => _optimizer;

    /// <summary>Optimizer steps completed.</summary>
    public long Step { get; private set; }

    public string CheckpointDirectory => Path.Combine(_spec.RunDir, "checkpoints");

    /// <summary>Trains until max-iters (or <paramref name="stopAtStep"/>), then writes a final checkpoint.</summary>
    public EvalResult? Run(ITrainingObserver observer, long? stopAtStep = null, CancellationToken cancellationToken = default)
    {
        long last = Math.Min(_spec.Train.MaxIters, stopAtStep ?? long.MaxValue);
        Directory.CreateDirectory(_spec.RunDir);
        using var metrics = new StreamWriter(Path.Combine(_spec.RunDir, "metrics.jsonl"), append: true);
        using var evals = new StreamWriter(Path.Combine(_spec.RunDir, "eval.jsonl"), append: true);
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
            if (Step % _spec.Checkpoint.Every == 0 || Step == last)
            {
                metrics.Flush();
                string path = SaveCheckpoint();
                observer.OnCheckpoint(Step, path);
            }
        }
        return lastEval;
    }

    /// <summary>One optimizer step over the whole global batch (accumulating micro-batches).</summary>
    public StepMetrics TrainStep()
    {
        var clock = Stopwatch.StartNew();
        using var scope = NewDisposeScope();
        Model.train();
        // Dropout masks are a pure function of (seed, step), so a resumed run draws the same ones.
        torch.manual_seed((long)(Seeds.Derive(_spec.Seed, Seeds.DropoutStream, Step) >> 1));
        double learningRate = LearningRateSchedule.At(_spec.Optimizer, Step);
        int accum = _spec.Train.GradAccum;
        double loss = 0;
        for (int micro = 0; micro < accum; micro++)
        {
            var (first, count) = BatchSampler.Slice(_spec.Train.BatchSize, dpRank: 0, dpSize: 1, micro, accum);
            var (x, y) = Batch(_trainSampler, Step, first, count);
            var microLoss = Model.Loss(x, y) / accum;
            microLoss.backward();
            loss += microLoss.item<float>();
        }
        double gradNorm = GradientClipping.ClipByGlobalNorm(Model.parameters(), _spec.Optimizer.GradClip);
        _optimizer.Step(learningRate);
        Model.zero_grad();
        double ms = clock.Elapsed.TotalMilliseconds;
        var result = new StepMetrics(Step + 1, loss, learningRate, gradNorm,
            _spec.Train.BatchSize * _spec.Model.BlockSize / (ms / 1000.0), ms);
        Step++;
        return result;
    }

    /// <summary>Mean loss over eval-iters fixed batches of each split (the same batches at every evaluation).</summary>
    public EvalResult Evaluate()
    {
        Model.eval();
        using var noGrad = no_grad();
        double Mean(BatchSampler sampler)
        {
            double sum = 0;
            for (int i = 0; i < _spec.Train.EvalIters; i++)
            {
                using var scope = NewDisposeScope();
                var (x, y) = Batch(sampler, i, 0, _spec.Train.BatchSize);
                sum += Model.Loss(x, y).item<float>();
            }
            return sum / _spec.Train.EvalIters;
        }
        var result = new EvalResult(Step, Mean(_trainEvalSampler), Mean(_valSampler));
        Model.train();
        return result;
    }

    static (Tensor X, Tensor Y) Batch(BatchSampler sampler, long step, int first, int count)
    {
        var (x, y) = sampler.Draw(step, first, count);
        long[] shape = [count, sampler.BlockSize];
        return (tensor(x, shape), tensor(y, shape));
    }

    /// <summary>Everything needed to continue: weights, moments, step, and what makes the data order reproducible.</summary>
    public IReadOnlyList<(string Name, Tensor Tensor)> StateTensors()
    {
        var list = new List<(string, Tensor)>();
        foreach (var (name, p) in Model.named_parameters()) list.Add(("model." + name, p));
        foreach (var (name, m, v) in _optimizer.State)
        {
            list.Add(("optim.exp_avg." + name, m));
            list.Add(("optim.exp_avg_sq." + name, v));
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

    public string SaveCheckpoint()
    {
        var (path, sha, bytes) = CheckpointFiles.Write(CheckpointDirectory, Step, StateTensors(), StateMetadata());
        CheckpointFiles.Retain(CheckpointDirectory, _spec.Checkpoint.Keep);
        _logger.LogDebug("Checkpoint {Path} ({Bytes} bytes, sha256 {Sha})", path, bytes, sha);
        return path;
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
        _optimizer.Dispose();
        Model.Dispose();
    }
}
