using Prometheus;

namespace Distributed.Cluster;

/// <summary>
/// The job's Prometheus metrics (prometheus-net, a registry of their own: only dtrain_* series), every name in one
/// place. Gauges are set from the <see cref="StatusBoard"/>'s view just before each scrape, so one scrape shows one
/// consistent moment (a step with its own loss); the commit latency histogram is observed as commits happen.
/// </summary>
public sealed class JobMetrics
{
    static readonly string[] States = ["waiting", "starting", "running", "recovering", "completed", "failed"];
    static readonly string[] WorkerLabels = ["rank", "host", "dp", "tp", "pp"];
    static readonly string[] Phases = ["compute", "communication", "waiting", "optimizer"];

    // Published once set: a loss that does not exist yet is absent, not 0.
    static readonly GaugeConfiguration Absent = new() { SuppressInitialValue = true };

    readonly StatusBoard _board;
    readonly Gauge _info, _state, _generation, _step, _maxSteps, _loss, _lr, _gradNorm, _tokens, _evalTrain, _valLoss, _perplexity, _restarts,
        _commitStep, _commitBytes, _workers, _checkpointVerified;
    readonly Counter _commits;
    readonly Gauge _workerStep, _stepSeconds, _phaseSeconds, _busBandwidth, _linkCapacity, _efficiency, _rss, _tensorBytes, _cpu, _gpuUtil, _gpuMemory, _lastReport;
    readonly Counter _sent, _received;
    readonly HashSet<string[]> _published = new(new LabelsComparer());
    readonly Dictionary<string, (long Sent, long Received)> _traffic = [];

    public JobMetrics(StatusBoard board)
    {
        _board = board;
        Registry = Metrics.NewCustomRegistry();
        var f = Metrics.WithCustomRegistry(Registry);
        _info = f.CreateGauge("dtrain_job_info", "The job: always 1, its name and layout as labels.", "job", "layout");
        _state = f.CreateGauge("dtrain_job_state", "1 for the job's current state, 0 for the others.", "state");
        _generation = f.CreateGauge("dtrain_generation", "The current generation (each start or recovery of the job is one).");
        _step = f.CreateGauge("dtrain_step", "Optimizer steps completed (the reporting rank's latest report: the last pipeline stage's).");
        _maxSteps = f.CreateGauge("dtrain_max_steps", "The step the job trains to (train.max-iters).");
        _loss = f.CreateGauge("dtrain_train_loss", "Training loss of the latest reported step (mean over the global batch).", Absent);
        _lr = f.CreateGauge("dtrain_learning_rate", "Learning rate of the latest reported step.", Absent);
        _gradNorm = f.CreateGauge("dtrain_grad_norm", "Global gradient norm of the latest reported step (before clipping).", Absent);
        _tokens = f.CreateGauge("dtrain_tokens_per_second", "Tokens per second of the latest reported step (global batch).", Absent);
        _evalTrain = f.CreateGauge("dtrain_eval_train_loss", "Training-split loss of the latest evaluation.", Absent);
        _valLoss = f.CreateGauge("dtrain_val_loss", "Validation loss of the latest evaluation.", Absent);
        _perplexity = f.CreateGauge("dtrain_val_perplexity", "Validation perplexity (exp of the loss) of the latest evaluation.", Absent);
        _restarts = f.CreateGauge("dtrain_restarts", "Generations lost and restarted in this submission of the job.");
        _commits = f.CreateCounter("dtrain_checkpoint_commits_total", "Checkpoints committed (durable in the journal).");
        _commitStep = f.CreateGauge("dtrain_checkpoint_last_step", "Step of the newest committed checkpoint.", Absent);
        _commitBytes = f.CreateGauge("dtrain_checkpoint_last_bytes", "Bytes of the newest committed checkpoint (all shards).", Absent);
        _checkpointVerified = f.CreateGauge("dtrain_checkpoint_last_verified", "1 when the newest commit's shards verify against their SHA-256, 0 when not (absent until checked).", Absent);
        CommitLatency = f.CreateHistogram("dtrain_checkpoint_commit_latency_seconds", "From the first shard's report to the commit being durable in the journal.",
            new HistogramConfiguration { Buckets = Histogram.ExponentialBuckets(0.001, 2, 16) });
        _workers = f.CreateGauge("dtrain_workers", "Ranks in the current generation.");

        _workerStep = f.CreateGauge("dtrain_worker_step", "The step this rank reported last.", WorkerLabels);
        _stepSeconds = f.CreateGauge("dtrain_worker_step_seconds", "Mean step time since the rank's previous report.", WorkerLabels);
        _phaseSeconds = f.CreateGauge("dtrain_worker_step_phase_seconds",
            "Mean step time by phase since the previous report: compute (forward and backward), communication (tensor-parallel all-reduces), " +
            "waiting (for the gradient all-reduce after backward), optimizer (clipping and AdamW); they add up to dtrain_worker_step_seconds.",
            [.. WorkerLabels, "phase"]);
        _sent = f.CreateCounter("dtrain_worker_sent_bytes_total", "Payload bytes this rank's data plane sent.", WorkerLabels);
        _received = f.CreateCounter("dtrain_worker_received_bytes_total", "Payload bytes this rank's data plane received.", WorkerLabels);
        _busBandwidth = f.CreateGauge("dtrain_worker_allreduce_bus_bandwidth_bytes_per_second",
            "All-reduce bus bandwidth (NCCL's: bytes x 2(n-1)/n over the time an all-reduce was in flight) since the previous report, by group (data, tensor).",
            [.. WorkerLabels, "group"]);
        _linkCapacity = f.CreateGauge("dtrain_worker_link_capacity_bytes_per_second", "One-way bandwidth to the ring neighbour, measured at the generation's start.", WorkerLabels);
        _efficiency = f.CreateGauge("dtrain_worker_network_efficiency_ratio", "All-reduce bus bandwidth over the measured link capacity, by group.", [.. WorkerLabels, "group"]);
        _rss = f.CreateGauge("dtrain_worker_resident_memory_bytes", "The worker process's resident set size.", WorkerLabels);
        _tensorBytes = f.CreateGauge("dtrain_worker_tensor_bytes", "Bytes of the weights, gradients and optimizer moments this rank holds.", WorkerLabels);
        _cpu = f.CreateGauge("dtrain_worker_cpu_utilisation_cores", "CPU time per second of the worker process since its previous report (1 = one core busy).", WorkerLabels);
        _gpuUtil = f.CreateGauge("dtrain_worker_gpu_utilisation_ratio", "GPU utilisation (0..1, nvidia-smi) where the worker uses a GPU.", WorkerLabels);
        _gpuMemory = f.CreateGauge("dtrain_worker_gpu_memory_bytes", "GPU memory used (nvidia-smi) where the worker uses a GPU.", WorkerLabels);
        _lastReport = f.CreateGauge("dtrain_worker_last_report_timestamp_seconds", "When the rank's latest report was made (seconds since 1970).", WorkerLabels);
        Registry.AddBeforeCollectCallback(Update);
    }

    public CollectorRegistry Registry { get; }

    public Histogram CommitLatency { get; }

    void Update()
    {
        var v = _board.Current;
        lock (_published)
        {
            _info.WithLabels(v.Job, v.Layout ?? "").Set(1);
            foreach (var s in States) _state.WithLabels(s).Set(s == v.State ? 1 : 0);
            _generation.Set(v.Generation);
            _step.Set(v.Step);
            _maxSteps.Set(v.LastStep);
            SetIf(_loss, v.Loss);
            SetIf(_lr, v.LearningRate);
            SetIf(_gradNorm, v.GradNorm);
            SetIf(_tokens, v.TokensPerSecond);
            SetIf(_evalTrain, v.LastEval?.TrainLoss);
            SetIf(_valLoss, v.LastEval?.ValLoss);
            SetIf(_perplexity, v.LastEval?.ValPerplexity);
            _restarts.Set(v.Restarts);
            _commits.IncTo(v.Commits);
            if (v.LastCheckpoint is { } c)
            {
                _commitStep.Set(c.Step);
                _commitBytes.Set(c.Bytes);
                if (c.Verified is { } ok) _checkpointVerified.Set(ok ? 1 : 0);
            }
            _workers.Set(v.Workers.Length);

            // Ranks move between hosts across generations: series of a placement that no longer exists go.
            var current = v.Workers.Select(Labels).ToHashSet(new LabelsComparer());
            foreach (var stale in _published.Where(l => !current.Contains(l)).ToList())
            {
                foreach (var g in new[] { _workerStep, _stepSeconds, _linkCapacity, _rss, _tensorBytes, _cpu, _gpuUtil, _gpuMemory, _lastReport }) g.RemoveLabelled(stale);
                foreach (var counter in new[] { _sent, _received }) counter.RemoveLabelled(stale);
                foreach (var p in Phases) _phaseSeconds.RemoveLabelled([.. stale, p]);
                foreach (var g in new[] { "data", "tensor" }) { _busBandwidth.RemoveLabelled([.. stale, g]); _efficiency.RemoveLabelled([.. stale, g]); }
                _published.Remove(stale);
            }
            foreach (var w in v.Workers)
            {
                var labels = Labels(w);
                _published.Add(labels);
                _workerStep.WithLabels(labels).Set(w.Step);
                if (w.Sample is not { } s) continue;
                _stepSeconds.WithLabels(labels).Set(s.StepMs / 1000);
                _phaseSeconds.WithLabels([.. labels, "compute"]).Set(s.ComputeMs / 1000);
                _phaseSeconds.WithLabels([.. labels, "communication"]).Set(s.CommunicationMs / 1000);
                _phaseSeconds.WithLabels([.. labels, "waiting"]).Set(s.WaitingMs / 1000);
                _phaseSeconds.WithLabels([.. labels, "optimizer"]).Set(s.OptimizerMs / 1000);
                AddTraffic(labels, s);
                _busBandwidth.WithLabels([.. labels, "data"]).Set(s.DataBusBandwidth);
                _busBandwidth.WithLabels([.. labels, "tensor"]).Set(s.TensorBusBandwidth);
                _linkCapacity.WithLabels(labels).Set(s.LinkCapacity);
                if (s.DataEfficiency is { } de) _efficiency.WithLabels([.. labels, "data"]).Set(de);
                if (s.TensorEfficiency is { } te) _efficiency.WithLabels([.. labels, "tensor"]).Set(te);
                _rss.WithLabels(labels).Set(s.RssBytes);
                _tensorBytes.WithLabels(labels).Set(s.TensorBytes);
                _cpu.WithLabels(labels).Set(s.CpuCores);
                if (s.GpuUtilisation is { } gu) _gpuUtil.WithLabels(labels).Set(gu);
                if (s.GpuMemoryBytes is { } gm) _gpuMemory.WithLabels(labels).Set(gm);
                _lastReport.WithLabels(labels).Set((s.At - DateTime.UnixEpoch).TotalSeconds);
            }
        }
    }

    /// <summary>Workers report process totals; a replaced process starts again from 0, the counter goes on from where it was.</summary>
    void AddTraffic(string[] labels, WorkerSample s)
    {
        string key = string.Join('/', labels) + "/" + s.ProcessId;
        var last = _traffic.GetValueOrDefault(key);
        _sent.WithLabels(labels).Inc(Math.Max(0, s.BytesSent - last.Sent));
        _received.WithLabels(labels).Inc(Math.Max(0, s.BytesReceived - last.Received));
        _traffic[key] = (Math.Max(last.Sent, s.BytesSent), Math.Max(last.Received, s.BytesReceived));
    }

    static string[] Labels(WorkerView w) => [w.Rank.ToString(), w.Host, w.Dp.ToString(), w.Tp.ToString(), w.Pp.ToString()];

    static void SetIf(Gauge gauge, double? value)
    {
        if (value is { } v) gauge.Set(v);
    }

    sealed class LabelsComparer : IEqualityComparer<string[]>
    {
        public bool Equals(string[]? a, string[]? b) => a is not null && b is not null && a.SequenceEqual(b);
        public int GetHashCode(string[] labels) => string.Join('\u0001', labels).GetHashCode(StringComparison.Ordinal);
    }
}
