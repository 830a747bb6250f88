using System.Globalization;
using Akka.Configuration;
using Akka.Configuration.Hocon;
using Distributed.Core;

namespace Distributed.Cluster.Config;

/// <summary>
/// Reads a job's HOCON file (the format Akka reads, so one file can hold the job and its cluster settings),
/// applies <c>--set key=value</c> overrides, and binds the result to a <see cref="JobSpec"/>.
/// Every key is declared once in <see cref="Keys"/> with its type, range and default (nanoGPT's CPU recipe);
/// an unknown key, a wrong type or an out-of-range value is an error that names the key.
/// </summary>
public static class JobConfigLoader
{
    /// <summary>Top-level sections that belong to Akka or the cluster and are not job keys.</summary>
    static readonly string[] ForeignSections = ["akka"];

    enum Kind { Int, Long, Double, Bool, String }

    sealed record Key(string Path, Kind Kind, string Default, double Min = double.NegativeInfinity, double Max = double.PositiveInfinity);

    static readonly Key[] Keys =
    [
        new("run.name", Kind.String, "shakespeare-char"),
        new("run.dir", Kind.String, "runs/shakespeare-char"),
        new("run.seed", Kind.Long, "1337"),
        new("run.threads", Kind.Int, "0", 0, 1024),
        new("run.tensorboard", Kind.Bool, "true"),
        new("data.path", Kind.String, "data/tinyshakespeare.txt"),
        new("data.train-fraction", Kind.Double, "0.9", 0.01, 0.99),
        new("model.n-layer", Kind.Int, "4", 1, 1024),
        new("model.n-head", Kind.Int, "4", 1, 1024),
        new("model.n-embd", Kind.Int, "128", 1, 65536),
        new("model.block-size", Kind.Int, "64", 1, 65536),
        new("model.dropout", Kind.Double, "0.0", 0, 0.99),
        new("model.bias", Kind.Bool, "false"),
        new("optimizer.learning-rate", Kind.Double, "1e-3", 0, 10),
        new("optimizer.min-lr", Kind.Double, "1e-4", 0, 10),
        new("optimizer.warmup-iters", Kind.Int, "100", 0, int.MaxValue),
        new("optimizer.lr-decay-iters", Kind.Int, "2000", 1, int.MaxValue),
        new("optimizer.beta1", Kind.Double, "0.9", 0, 0.999999),
        new("optimizer.beta2", Kind.Double, "0.99", 0, 0.999999),
        new("optimizer.eps", Kind.Double, "1e-8", 1e-30, 1),
        new("optimizer.weight-decay", Kind.Double, "0.1", 0, 10),
        new("optimizer.grad-clip", Kind.Double, "1.0", 0, 1e9),
        new("train.batch-size", Kind.Int, "12", 1, 1 << 20),
        new("train.grad-accum", Kind.Int, "1", 1, 1 << 20),
        new("train.max-iters", Kind.Int, "2000", 1, int.MaxValue),
        new("train.eval-interval", Kind.Int, "250", 1, int.MaxValue),
        new("train.eval-iters", Kind.Int, "20", 1, 1 << 20),
        new("train.log-interval", Kind.Int, "10", 1, int.MaxValue),
        new("checkpoint.every", Kind.Int, "250", 1, int.MaxValue),
        new("checkpoint.keep", Kind.Int, "3", 1, 1 << 20),
        new("cluster.workers", Kind.Int, "2", 1, 1024),
        new("cluster.transport", Kind.String, "shm"),
        new("cluster.bucket-mb", Kind.Double, "25", 0.001, 4096),
        new("cluster.collective-timeout", Kind.Double, "30", 0.1, 86400),
        new("cluster.compression", Kind.String, "none"),
        new("cluster.kernels", Kind.String, "auto"),
        new("cluster.overlap", Kind.Bool, "true"),
        new("cluster.metrics-port", Kind.Int, "0", -1, 65535),
        new("cluster.status-port", Kind.Int, "0", -1, 65535),
        new("cluster.http-host", Kind.String, "127.0.0.1"),
        new("cluster.report-interval", Kind.Double, "1", 0.05, 3600),
        new("parallel.tp", Kind.Int, "1", 1, 1024),
        new("parallel.pp", Kind.Int, "1", 1, 1024),
        new("parallel.micro-batches", Kind.Int, "1", 1, 1 << 20),
        new("parallel.schedule", Kind.String, "1f1b"),
        new("parallel.shard-optimizer", Kind.Bool, "false"),
        new("parallel.stage-layers", Kind.String, ""),
        new("persistence.provider", Kind.String, "sqlite"),
        new("persistence.connection-string", Kind.String, ""),
        new("persistence.snapshot-every", Kind.Int, "20", 1, int.MaxValue),
        new("recovery.max-restarts", Kind.Int, "3", 0, 1000),
        new("recovery.worker-wait-timeout", Kind.Double, "120", 0.1, 86400),
        new("recovery.generation-start-timeout", Kind.Double, "300", 0.1, 86400),
        new("recovery.adopt-timeout", Kind.Double, "5", 0.1, 3600),
        new("security.mode", Kind.String, "none"),
        new("security.certificates", Kind.String, ""),
    ];

    /// <summary>Loads <paramref name="path"/> and applies overrides of the form <c>key=value</c>.</summary>
    public static JobSpec Load(string path, IEnumerable<string>? overrides = null)
    {
        if (!File.Exists(path)) throw new ConfigException($"config file '{path}' does not exist");
        Akka.Configuration.Config fileConfig;
        try { fileConfig = ConfigurationFactory.ParseString(File.ReadAllText(path)); }
        catch (Exception e) { throw new ConfigException($"config file '{path}' is not valid HOCON: {FirstLine(e.Message)}"); }
        return Bind(fileConfig, overrides ?? [], path);
    }

    /// <summary>Binds HOCON text (used by tests and by workers that receive the job as text).</summary>
    public static JobSpec Parse(string hocon, IEnumerable<string>? overrides = null, string origin = "<inline>")
    {
        Akka.Configuration.Config config;
        try { config = ConfigurationFactory.ParseString(hocon); }
        catch (Exception e) { throw new ConfigException($"config '{origin}' is not valid HOCON: {FirstLine(e.Message)}"); }
        return Bind(config, overrides ?? [], origin);
    }

    static JobSpec Bind(Akka.Configuration.Config fileConfig, IEnumerable<string> overrides, string origin)
    {
        var values = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var (key, value) in Flatten(fileConfig.Root, ""))
        {
            if (ForeignSections.Any(s => key == s || key.StartsWith(s + ".", StringComparison.Ordinal))) continue;
            values[key] = value;
        }
        foreach (var assignment in overrides)
        {
            int eq = assignment.IndexOf('=');
            if (eq <= 0) throw new ConfigException($"--set '{assignment}' must have the form key=value");
            values[assignment[..eq].Trim()] = assignment[(eq + 1)..].Trim().Trim('"');
        }

        var known = Keys.ToDictionary(k => k.Path);
        foreach (var key in values.Keys)
            if (!known.ContainsKey(key))
                throw new ConfigException($"unknown config key '{key}' in {origin}{Suggest(key)}");

        string Raw(string key) => values.TryGetValue(key, out var v) ? v : known[key].Default;
        int I(string key) => (int)Number(known[key], Raw(key));
        long L(string key) => (long)Number(known[key], Raw(key));
        double D(string key) => Number(known[key], Raw(key));
        bool B(string key) => Raw(key) switch
        {
            "true" or "on" or "yes" => true,
            "false" or "off" or "no" => false,
            var v => throw new ConfigException($"config key '{key}' must be true or false, got '{v}'"),
        };
        string S(string key) => Raw(key).Length > 0 ? Raw(key) : throw new ConfigException($"config key '{key}' must not be empty");

        var spec = new JobSpec(
            Name: S("run.name"), RunDir: S("run.dir"), Seed: L("run.seed"), Threads: I("run.threads"),
            Data: new DataSpec(S("data.path"), D("data.train-fraction")),
            Model: new ModelSpec(I("model.n-layer"), I("model.n-head"), I("model.n-embd"), I("model.block-size"), D("model.dropout"), B("model.bias")),
            Optimizer: new OptimizerSpec(D("optimizer.learning-rate"), D("optimizer.min-lr"), I("optimizer.warmup-iters"), I("optimizer.lr-decay-iters"),
                D("optimizer.beta1"), D("optimizer.beta2"), D("optimizer.eps"), D("optimizer.weight-decay"), D("optimizer.grad-clip")),
            Train: new TrainSpec(I("train.batch-size"), I("train.grad-accum"), I("train.max-iters"), I("train.eval-interval"), I("train.eval-iters"), I("train.log-interval")),
            Checkpoint: new CheckpointSpec(I("checkpoint.every"), I("checkpoint.keep")),
            Cluster: new ClusterSpec(I("cluster.workers"), S("cluster.transport"), D("cluster.bucket-mb"), D("cluster.collective-timeout"), S("cluster.compression"),
                S("cluster.kernels"), B("cluster.overlap")),
            Persistence: new PersistenceSpec(S("persistence.provider"), Raw("persistence.connection-string"), I("persistence.snapshot-every")),
            Recovery: new RecoverySpec(I("recovery.max-restarts"), D("recovery.worker-wait-timeout"), D("recovery.generation-start-timeout"), D("recovery.adopt-timeout")))
        {
            Parallel = new ParallelSpec(I("parallel.tp"), I("parallel.pp"), I("parallel.micro-batches"), S("parallel.schedule"), B("parallel.shard-optimizer"),
                Raw("parallel.stage-layers").Length == 0 ? "" : string.Join(",", ParallelSpec.ParseStageLayers(Raw("parallel.stage-layers")))),
            Observability = new ObservabilitySpec(B("run.tensorboard"), I("cluster.metrics-port"), I("cluster.status-port"), S("cluster.http-host"),
                D("cluster.report-interval")),
            Security = new SecuritySpec(S("security.mode"), Raw("security.certificates")),
        };
        spec.Validate();
        return spec;
    }

    /// <summary>The job as HOCON text with every key, so a checkpoint or a worker carries the whole job.</summary>
    public static string ToHocon(JobSpec spec)
    {
        static string F(double d) => d.ToString("R", CultureInfo.InvariantCulture);
        static string Q(string s) => "\"" + s.Replace("\\", "\\\\").Replace("\"", "\\\"") + "\"";
        var (m, o, t, w) = (spec.Model, spec.Optimizer, spec.Train, spec.Observability);
        return string.Join('\n',
            $"run {{ name = {Q(spec.Name)}, dir = {Q(spec.RunDir)}, seed = {spec.Seed}, threads = {spec.Threads}, tensorboard = {(w.TensorBoard ? "true" : "false")} }}",
            $"data {{ path = {Q(spec.Data.Path)}, train-fraction = {F(spec.Data.TrainFraction)} }}",
            $"model {{ n-layer = {m.Layers}, n-head = {m.Heads}, n-embd = {m.Embedding}, block-size = {m.BlockSize}, dropout = {F(m.Dropout)}, bias = {(m.Bias ? "true" : "false")} }}",
            $"optimizer {{ learning-rate = {F(o.LearningRate)}, min-lr = {F(o.MinLearningRate)}, warmup-iters = {o.WarmupIters}, lr-decay-iters = {o.DecayIters}, " +
            $"beta1 = {F(o.Beta1)}, beta2 = {F(o.Beta2)}, eps = {F(o.Eps)}, weight-decay = {F(o.WeightDecay)}, grad-clip = {F(o.GradClip)} }}",
            $"train {{ batch-size = {t.BatchSize}, grad-accum = {t.GradAccum}, max-iters = {t.MaxIters}, eval-interval = {t.EvalInterval}, eval-iters = {t.EvalIters}, log-interval = {t.LogInterval} }}",
            $"checkpoint {{ every = {spec.Checkpoint.Every}, keep = {spec.Checkpoint.Keep} }}",
            $"cluster {{ workers = {spec.Cluster.Workers}, transport = {Q(spec.Cluster.Transport)}, bucket-mb = {F(spec.Cluster.BucketMegabytes)}, collective-timeout = {F(spec.Cluster.CollectiveTimeoutSeconds)}, compression = {Q(spec.Cluster.Compression)}, " +
            $"kernels = {Q(spec.Cluster.Kernels)}, overlap = {(spec.Cluster.Overlap ? "true" : "false")}, " +
            $"metrics-port = {w.MetricsPort}, status-port = {w.StatusPort}, http-host = {Q(w.HttpHost)}, report-interval = {F(w.ReportIntervalSeconds)} }}",
            $"parallel {{ tp = {spec.Parallel.Tp}, pp = {spec.Parallel.Pp}, micro-batches = {spec.Parallel.MicroBatches}, schedule = {Q(spec.Parallel.Schedule)}, shard-optimizer = {(spec.Parallel.ShardOptimizer ? "true" : "false")}, stage-layers = {Q(spec.Parallel.StageLayers)} }}",
            $"persistence {{ provider = {Q(spec.Persistence.Provider)}, connection-string = {Q(spec.Persistence.ConnectionString)}, snapshot-every = {spec.Persistence.SnapshotEvery} }}",
            $"recovery {{ max-restarts = {spec.Recovery.MaxRestarts}, worker-wait-timeout = {F(spec.Recovery.WorkerWaitSeconds)}, " +
            $"generation-start-timeout = {F(spec.Recovery.GenerationStartSeconds)}, adopt-timeout = {F(spec.Recovery.AdoptSeconds)} }}",
            $"security {{ mode = {Q(spec.Security.Mode)}, certificates = {Q(spec.Security.Certificates)} }}") + "\n";
    }

    static double Number(Key key, string raw)
    {
        double value;
        bool integral = key.Kind is Kind.Int or Kind.Long;
        if (integral)
        {
            if (!long.TryParse(raw, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out long l))
                throw new ConfigException($"config key '{key.Path}' must be an integer, got '{raw}'");
            if (key.Kind == Kind.Int && (l < int.MinValue || l > int.MaxValue))
                throw new ConfigException($"config key '{key.Path}' is out of range: {raw}");
            value = l;
        }
        else if (!double.TryParse(raw, NumberStyles.Float, CultureInfo.InvariantCulture, out value) || !double.IsFinite(value))
        {
            throw new ConfigException($"config key '{key.Path}' must be a number, got '{raw}'");
        }
        if (value < key.Min || value > key.Max)
            throw new ConfigException($"config key '{key.Path}' is out of range: {raw} (allowed {Range(key)})");
        return value;
    }

    static string Range(Key key)
    {
        string Fmt(double d) => d.ToString(CultureInfo.InvariantCulture);
        if (double.IsPositiveInfinity(key.Max) || key.Max >= int.MaxValue) return $">= {Fmt(key.Min)}";
        return $"{Fmt(key.Min)} to {Fmt(key.Max)}";
    }

    static IEnumerable<(string Key, string Value)> Flatten(HoconValue value, string prefix)
    {
        if (value.IsObject())
        {
            foreach (var (name, child) in value.GetObject().Items)
                foreach (var pair in Flatten(child, prefix.Length == 0 ? name : prefix + "." + name))
                    yield return pair;
        }
        else if (value.IsArray())
        {
            yield return (prefix, "[" + string.Join(", ", value.GetArray().Select(v => v.GetString())) + "]");
        }
        else
        {
            yield return (prefix, value.GetString() ?? "");
        }
    }

    static string Suggest(string key)
    {
        var best = Keys.Select(k => (k.Path, Distance: Levenshtein(k.Path, key))).MinBy(p => p.Distance);
        return best.Distance <= 3 ? $" (did you mean '{best.Path}'?)" : "";
    }

    static int Levenshtein(string a, string b)
    {
        var d = new int[a.Length + 1, b.Length + 1];
        for (int i = 0; i <= a.Length; i++) d[i, 0] = i;
        for (int j = 0; j <= b.Length; j++) d[0, j] = j;
        for (int i = 1; i <= a.Length; i++)
            for (int j = 1; j <= b.Length; j++)
                d[i, j] = Math.Min(Math.Min(d[i - 1, j] + 1, d[i, j - 1] + 1), d[i - 1, j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1));
        return d[a.Length, b.Length];
    }

    static string FirstLine(string s) => s.Split('\n')[0].Trim();
}
