namespace Distributed.Core;

/// <summary>The GPT's shape (nanoGPT's GPTConfig). VocabSize comes from the corpus, not from the config.</summary>
public sealed record ModelSpec(int Layers, int Heads, int Embedding, int BlockSize, double Dropout, bool Bias);

/// <summary>AdamW and its learning-rate schedule: linear warm-up, then cosine decay to MinLearningRate.</summary>
public sealed record OptimizerSpec(
    double LearningRate, double MinLearningRate, int WarmupIters, int DecayIters,
    double Beta1, double Beta2, double Eps, double WeightDecay, double GradClip);

/// <summary>
/// The loop. BatchSize is the global batch of one optimizer step (all data-parallel ranks and all
/// accumulation micro-steps together), so changing dp or GradAccum never changes what is learned.
/// </summary>
public sealed record TrainSpec(int BatchSize, int GradAccum, int MaxIters, int EvalInterval, int EvalIters, int LogInterval);

public sealed record DataSpec(string Path, double TrainFraction);

public sealed record CheckpointSpec(int Every, int Keep);

/// <summary>
/// How the job spreads over worker processes. Transport picks what carries the bytes of collectives ("tcp": raw
/// sockets negotiated over gRPC, "grpc": gRPC streams only); BucketMegabytes is the gradient bucket size (PyTorch
/// DDP's 25 MB default); CollectiveTimeoutSeconds is how long a collective waits for a peer before naming it failed;
/// Compression "bf16" sends gradients as bfloat16 (half the bytes, lossy), "none" sends float32. Kernels picks the
/// reduction arithmetic ("auto": ILGPU's CUDA accelerator where a GPU is present, SIMD otherwise; "simd"; "ilgpu").
/// Overlap starts each gradient bucket's all-reduce while backward still runs (DDP's way); false reduces after backward.
/// </summary>
public sealed record ClusterSpec(int Workers, string Transport, double BucketMegabytes, double CollectiveTimeoutSeconds, string Compression,
    string Kernels = "auto", bool Overlap = true);

/// <summary>
/// Where the coordinator journals the job: "sqlite" (a file in the run directory unless ConnectionString names one)
/// or "postgresql" (ConnectionString, or the DTRAIN_POSTGRES environment variable). SnapshotEvery: events between snapshots.
/// </summary>
public sealed record PersistenceSpec(string Provider, string ConnectionString, int SnapshotEvery);

/// <summary>
/// How often a job may lose a generation (a worker, a link, the coordinator) and start a new one before it fails, and
/// how long the coordinator waits for each stage of a start: WorkerWaitSeconds for the expected workers to register
/// (then the job fails, naming who is missing), GenerationStartSeconds from the choice of checkpoint until every rank
/// has built its model (then the generation is aborted, naming the ranks that did not report), AdoptSeconds for every
/// rank of the running generation to answer a restarted coordinator (then it aborts the generation instead of adopting it).
/// </summary>
public sealed record RecoverySpec(int MaxRestarts, double WorkerWaitSeconds = 120, double GenerationStartSeconds = 300, double AdoptSeconds = 5);

/// <summary>
/// How a running job shows itself. TensorBoard: the leader writes event files under run.dir/tensorboard. MetricsPort
/// and StatusPort: where the coordinator serves Prometheus' /metrics and its status page (0 = off, -1 = any free
/// port, written to run.dir/endpoints.json), on HttpHost. ReportIntervalSeconds: how often each worker reports its
/// timings, traffic and resources to the coordinator.
/// </summary>
public sealed record ObservabilitySpec(bool TensorBoard, int MetricsPort, int StatusPort, string HttpHost, double ReportIntervalSeconds)
{
    public static readonly ObservabilitySpec Default = new(true, 0, 0, "127.0.0.1", 1.0);

    /// <summary>Whether the coordinator serves anything over HTTP (and so whether workers send their reports).</summary>
    public bool Serves => MetricsPort != 0 || StatusPort != 0;
}

/// <summary>
/// How the job's nodes talk: Mode none (plain sockets: loopback or a trusted network) or tls (mutual TLS on Akka
/// remoting and on every data-plane connection). Certificates: the directory with ca.crt, tls.crt and tls.key; empty
/// under tls means the local simulation creates a CA of its own in run.dir/certs.
/// </summary>
public sealed record SecuritySpec(string Mode, string Certificates)
{
    public static readonly SecuritySpec None = new("none", "");

    public bool Tls => Mode == "tls";
}

/// <summary>Everything that defines one training job. Built from HOCON by the config loader.</summary>
public sealed record JobSpec(
    string Name, string RunDir, long Seed, int Threads,
    DataSpec Data, ModelSpec Model, OptimizerSpec Optimizer, TrainSpec Train, CheckpointSpec Checkpoint, ClusterSpec Cluster,
    PersistenceSpec Persistence, RecoverySpec Recovery)
{
    /// <summary>Model-parallel degrees (a property with a default: job specs stored before it existed read as tp = pp = 1).</summary>
    public ParallelSpec Parallel { get; init; } = ParallelSpec.None;

    /// <summary>TensorBoard, Prometheus and the status page (a property with a default, as <see cref="Parallel"/>).</summary>
    public ObservabilitySpec Observability { get; init; } = ObservabilitySpec.Default;

    /// <summary>Plain or mutual-TLS connections (a property with a default, as <see cref="Parallel"/>).</summary>
    public SecuritySpec Security { get; init; } = SecuritySpec.None;

    /// <summary>Checks the relations between keys that one key alone cannot check.</summary>
    public void Validate()
    {
        if (Model.Embedding % Model.Heads != 0)
            throw new ConfigException($"config key 'model.n-embd' ({Model.Embedding}) must be divisible by 'model.n-head' ({Model.Heads})");
        if (Parallel.Tp < 1 || Parallel.Pp < 1)
            throw new ConfigException($"config keys 'parallel.tp' ({Parallel.Tp}) and 'parallel.pp' ({Parallel.Pp}) must be 1 or more");
        if (Train.BatchSize % Train.GradAccum != 0)
            throw new ConfigException($"config key 'train.batch-size' ({Train.BatchSize}) must be divisible by 'train.grad-accum' ({Train.GradAccum})");
        if (Cluster.Transport is not ("shm" or "tcp" or "grpc"))
            throw new ConfigException($"config key 'cluster.transport' must be shm, tcp or grpc, got '{Cluster.Transport}'");
        if (Cluster.Compression is not ("none" or "bf16"))
            throw new ConfigException($"config key 'cluster.compression' must be none or bf16, got '{Cluster.Compression}'");
        if (Cluster.Kernels is not ("auto" or "simd" or "ilgpu"))
            throw new ConfigException($"config key 'cluster.kernels' must be auto, simd or ilgpu, got '{Cluster.Kernels}'");
        if (Persistence.Provider is not ("sqlite" or "postgresql"))
            throw new ConfigException($"config key 'persistence.provider' must be sqlite or postgresql, got '{Persistence.Provider}'");
        if (Security.Mode is not ("none" or "tls"))
            throw new ConfigException($"config key 'security.mode' must be none or tls, got '{Security.Mode}'");
        if (Optimizer.MinLearningRate > Optimizer.LearningRate)
            throw new ConfigException($"config key 'optimizer.min-lr' ({Optimizer.MinLearningRate}) must not exceed 'optimizer.learning-rate' ({Optimizer.LearningRate})");
    }

    /// <summary>Checks that the global batch splits evenly over data-parallel ranks and accumulation steps.</summary>
    public void ValidateDataParallel(int dataParallelSize)
    {
        if (dataParallelSize < 1) throw new ConfigException($"the data-parallel size must be 1 or more, got {dataParallelSize}");
        if (Train.BatchSize % (dataParallelSize * Train.GradAccum) != 0)
            throw new ConfigException(
                $"config key 'train.batch-size' ({Train.BatchSize}) must be divisible by data-parallel size x 'train.grad-accum' ({dataParallelSize} x {Train.GradAccum})");
    }
}
