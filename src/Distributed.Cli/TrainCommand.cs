using System.CommandLine;
using System.Diagnostics;
using Distributed.Cluster.Config;
using Distributed.Core;
using Distributed.Training;
using Distributed.Training.Checkpoints;
using Distributed.Training.Data;
using Microsoft.Extensions.Logging;

namespace Distributed.Cli;

static class TrainCommand
{
    public static Command Create()
    {
        var config = new Option<string>("--config") { Description = "job file (HOCON)", DefaultValueFactory = _ => "cluster-config/shakespeare-char.conf" };
        var set = new Option<string[]>("--set") { Description = "override a config key: --set train.max-iters=500", AllowMultipleArgumentsPerToken = false };
        var resume = new Option<string?>("--resume")
        {
            Description = "continue from the newest valid checkpoint of the run directory (or of the given run directory or checkpoint file)",
            Arity = ArgumentArity.ZeroOrOne,
        };
        var overwrite = new Option<bool>("--overwrite") { Description = "start over in a run directory that already holds checkpoints (deletes them)" };
        var stopAt = new Option<long?>("--stop-at") { Description = "stop after this step (writing a checkpoint), as if preempted (single process)" };
        var workers = new Option<int?>("--workers")
        {
            Description = "worker processes on loopback (default: cluster.workers); 0 trains in this process without a cluster",
        };

        var faults = new Option<string[]>("--fault") { Description = $"inject a fault (repeatable): {Faults.Kinds}" };
        var faultSeed = new Option<long>("--fault-seed") { Description = "seed that draws the faults of --fault random:COUNT", DefaultValueFactory = _ => 1 };

        var command = new Command("train", "train a model") { config, set, resume, overwrite, stopAt, workers, faults, faultSeed };
        command.SetAction((parse, cancellationToken) =>
        {
            bool resuming = parse.GetResult(resume) is not null;
            string? resumePath = parse.GetValue(resume);
            // A run directory remembers its job: --resume RUN_DIR continues that job unless --config says otherwise.
            string configFile = parse.GetValue(config)!;
            if (resumePath is not null && parse.GetResult(config) is null or { Implicit: true } && File.Exists(Path.Combine(resumePath, "job.conf")))
                configFile = Path.Combine(resumePath, "job.conf");
            var spec = JobConfigLoader.Load(configFile, parse.GetValue(set));
            int workerCount = parse.GetValue(workers) ?? spec.Cluster.Workers;
            if (workerCount < 0) throw new UserFacingException($"--workers must be 0 or more, got {workerCount}");
            if (workerCount == 0 && (spec.Parallel.Tp > 1 || spec.Parallel.Pp > 1))
                throw new UserFacingException($"parallel.tp = {spec.Parallel.Tp} and parallel.pp = {spec.Parallel.Pp} need worker processes: --workers 0 is the plain single process (tp = pp = 1)");
            if (workerCount > 0 && parse.GetValue(stopAt) is not null) throw new UserFacingException("--stop-at needs --workers 0 (single process) for now");
            string[] faultArguments = parse.GetValue(faults) ?? [];
            if (faultArguments.Length > 0 && workerCount == 0) throw new UserFacingException("--fault needs a cluster (--workers 1 or more)");
            Faults.Parse(faultArguments, parse.GetValue(faultSeed), Math.Max(1, workerCount), spec.Train.MaxIters, spec.Checkpoint.Every);   // errors before any process starts
            return RunAsync(spec, workerCount, resuming, resumePath, parse.GetValue(overwrite), parse.GetValue(stopAt), faultArguments,
                parse.GetValue(faultSeed), cancellationToken);
        });
        return command;
    }

    static async Task<int> RunAsync(JobSpec spec, int workers, bool resuming, string? resumePath, bool overwrite, long? stopAt,
        IReadOnlyList<string> faults, long faultSeed, CancellationToken cancellationToken)
    {
        TextCorpus.RequireFile(spec.Data);   // before any worker starts
        using var loggerFactory = Logging.CreateFactory();
        var logger = loggerFactory.CreateLogger("dtrain");
        string checkpoints = Path.Combine(spec.RunDir, "checkpoints");
        string? from = null;
        bool sameRun = resumePath is null || Path.GetFullPath(resumePath) == Path.GetFullPath(spec.RunDir);
        if (resuming && (workers == 0 || !sameRun))
        {
            from = ResolveResume(resumePath ?? spec.RunDir, logger);
        }
        else if (resuming && !HoldsAJob(spec.RunDir))
        {
            throw new CheckpointException($"no checkpoint to resume from in '{resumePath ?? spec.RunDir}'");
        }
        else if (!resuming && HoldsAJob(spec.RunDir))
        {
            if (!overwrite)
                throw new UserFacingException(
                    $"run directory '{spec.RunDir}' already holds a job: pass --resume to continue it, --overwrite to start over, or --set run.dir=...");
            Directory.Delete(spec.RunDir, recursive: true);
        }
        if (!resuming && Directory.Exists(spec.RunDir))
        {
            File.Delete(Path.Combine(spec.RunDir, "metrics.jsonl"));
            File.Delete(Path.Combine(spec.RunDir, "eval.jsonl"));
            File.Delete(RunFiles.In(spec.RunDir, RunFiles.Commits));
            // A fresh run's curves start over; a resumed one appends to them.
            string tensorBoard = RunFiles.In(spec.RunDir, RunFiles.TensorBoard);
            if (Directory.Exists(tensorBoard)) Directory.Delete(tensorBoard, recursive: true);
        }

        var clock = Stopwatch.StartNew();
        EvalResult? result;
        long steps;
        if (workers == 0)
        {
            using var trainer = new Trainer(spec, logger, from);
            logger.LogInformation("{Name}: {Params:N0} parameters, vocabulary {Vocab}, {Threads} threads, run directory {Dir}",
                spec.Name, trainer.Model.Parameters.Sum(p => p.Tensor.numel()), trainer.Tokenizer.Size,
                TorchSharp.torch.get_num_threads(), spec.RunDir);
            long startStep = trainer.Step;
            result = ProgressDisplay.Run(spec, logger, observer => trainer.Run(observer, stopAt, cancellationToken));
            steps = trainer.Step - startStep;
        }
        else
        {
            Core.ParallelLayout.For(spec, workers);   // names every degree that does not fit, before any process starts
            // Workers share this host's cores unless the job says how many threads each takes.
            if (spec.Threads == 0) spec = spec with { Threads = Math.Max(1, Environment.ProcessorCount / workers) };
            // Resuming its own run directory, the coordinator continues from its journal (or the run's newest commit).
            (result, steps) = ProgressDisplay.Run(spec, logger, observer =>
                ClusterJob.RunAsync(spec, workers, faults, faultSeed, from, observer, logger, cancellationToken).GetAwaiter().GetResult());
        }

        RunPlot.TryWrite(spec.RunDir, logger);
        double seconds = clock.Elapsed.TotalSeconds;
        double tokensPerSecond = steps * spec.Train.BatchSize * spec.Model.BlockSize / Math.Max(seconds, 1e-9);
        if (result is not null)
            Console.WriteLine($"step {result.Step}: train loss {result.TrainLoss:F4}, val loss {result.ValLoss:F4} (perplexity {result.ValPerplexity:F2})");
        Console.WriteLine($"{steps} steps in {seconds:F1} s, {tokensPerSecond:N0} tokens/s (including evaluation and checkpoints)");
        Console.WriteLine($"metrics: {Path.Combine(spec.RunDir, "metrics.jsonl")}; checkpoints: {checkpoints}");
        return 0;
    }

    static bool HoldsAJob(string runDir) =>
        CheckpointFiles.List(Path.Combine(runDir, "checkpoints")).Count > 0 || File.Exists(Path.Combine(runDir, Cluster.CoordinatorPersistence.RunIdFile));

    /// <summary>A run directory, a checkpoints directory or a checkpoint directory: the newest committed checkpoint that verifies.</summary>
    static string ResolveResume(string target, ILogger logger)
    {
        if (File.Exists(Path.Combine(target, CheckpointFiles.ManifestName))) return target;
        foreach (var dir in new[] { Path.Combine(target, "checkpoints"), target })
        {
            if (CheckpointFiles.List(dir).Count == 0) continue;
            return CheckpointFiles.FindNewestValid(dir, logger)
                ?? throw new CheckpointException($"no checkpoint in '{dir}' verifies against its recorded SHA-256");
        }
        throw new CheckpointException($"no checkpoint to resume from in '{target}'");
    }
}

/// <summary>Plain log lines for CI and redirected output.</summary>
sealed class LogLineObserver(ILogger logger, int logInterval) : ITrainingObserver
{
    readonly Stopwatch _clock = new();
    long _first, _last, _logged;

    public void OnStart(long firstStep, long lastStep)
    {
        (_first, _last, _logged) = (firstStep, lastStep, firstStep);
        _clock.Start();
        logger.LogInformation("Training steps {First}..{Last}", firstStep + 1, lastStep);
    }

    public void OnStep(StepMetrics m)
    {
        // Cluster reports arrive throttled, not every step: log whenever a log-interval boundary was crossed.
        if (m.Step / logInterval == _logged / logInterval && m.Step != _last) return;
        _logged = m.Step;
        double perStep = _clock.Elapsed.TotalSeconds / Math.Max(1, m.Step - _first);
        var left = TimeSpan.FromSeconds(perStep * (_last - m.Step));
        logger.LogInformation("step {Step}/{Last} loss {Loss:F4} lr {Lr:E2} grad-norm {Norm:F3} {Tps:N0} tok/s {Ms:F1} ms/step, {Left:mm\\:ss} left",
            m.Step, _last, m.Loss, m.LearningRate, m.GradNorm, m.TokensPerSecond, m.StepMs, left);
    }

    public void OnEval(EvalResult r) =>
        logger.LogInformation("eval at step {Step}: train loss {Train:F4}, val loss {Val:F4}, val perplexity {Ppl:F2}", r.Step, r.TrainLoss, r.ValLoss, r.ValPerplexity);

    public void OnCheckpoint(long step, string path) => logger.LogInformation("checkpoint {Path}", path);
}
