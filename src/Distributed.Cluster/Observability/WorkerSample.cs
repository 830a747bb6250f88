namespace Distributed.Cluster;

/// <summary>
/// What a worker reports about itself every cluster.report-interval (riding on a <see cref="StepDone"/>): where it
/// is, how its steps split, what its data plane moved, and what it uses. Step times are means over the steps since
/// the previous sample: compute (forward and backward, tensor-parallel collectives excluded), communication (the
/// tensor-parallel all-reduces inside forward and backward), waiting (for the gradient all-reduce after backward:
/// what backward did not hide) and optimizer (clipping and the AdamW step); they add up to the step. Bytes are totals
/// since the process started. Bus bandwidths (bytes per second, NCCL's definition: algorithm bandwidth x 2(n-1)/n) are
/// over the window, per group; LinkCapacity is the one-way bandwidth to the ring neighbour measured at the start of
/// the generation. CPU utilisation is in cores (1.0 = one core busy); GPU figures only where a GPU is used.
/// </summary>
public sealed record WorkerSample(
    string Host, int ProcessId, int Tp, int Dp, int Pp,
    int Steps, double StepMs, double ComputeMs, double CommunicationMs, double WaitingMs, double OptimizerMs,
    long BytesSent, long BytesReceived,
    double DataBusBandwidth, double TensorBusBandwidth, double LinkCapacity,
    long RssBytes, long TensorBytes, double CpuCores, double? GpuUtilisation, long? GpuMemoryBytes, DateTime At)
{
    /// <summary>The data-parallel all-reduce's bus bandwidth against the link's capacity (the seeds' "network efficiency"); null without either.</summary>
    public double? DataEfficiency => LinkCapacity > 0 && DataBusBandwidth > 0 ? DataBusBandwidth / LinkCapacity : null;

    public double? TensorEfficiency => LinkCapacity > 0 && TensorBusBandwidth > 0 ? TensorBusBandwidth / LinkCapacity : null;
}
