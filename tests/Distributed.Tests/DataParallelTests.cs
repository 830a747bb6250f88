using System.Text.Json;
using System.Text.RegularExpressions;
using Distributed.Training;
using Distributed.Training.Checkpoints;

namespace Distributed.Tests;

/// <summary>
/// The simulation as a user runs it: `dtrain train --workers N` starts a real Akka cluster (coordinator plus N
/// worker processes on loopback) whose workers all-reduce gradients over real sockets. Its losses and weights must
/// match a single process training on the same global batch.
/// </summary>
public class DataParallelTests
{
    sealed class Quiet : ITrainingObserver;

    static readonly string[] Job =
    [
        "train.batch-size=12", "train.max-iters=20", "train.eval-interval=1000", "train.eval-iters=3",
        "optimizer.warmup-iters=5", "optimizer.lr-decay-iters=20", "checkpoint.every=1000",
    ];

    static double[] Losses(string runDir) => File.ReadAllLines(Path.Combine(runDir, "metrics.jsonl"))
        .Select(l => JsonDocument.Parse(l).RootElement.GetProperty("loss").GetDouble()).ToArray();

    [Theory]
    [InlineData(2, "shm")]
    [InlineData(3, "grpc")]
    [InlineData(4, "tcp")]
    public void DataParallelRunMatchesASingleProcessOfTheSameGlobalBatch(int workers, string transport)
    {
        string single = TestSupport.TempDir("dp1"), parallel = TestSupport.TempDir($"dp{workers}");
        using (var trainer = new Trainer(TestSupport.TinyJob(single, Job), TestSupport.Logger)) trainer.Run(new Quiet());

        var run = TestSupport.RunCli(parallel, TestSupport.TrainArgs(parallel, workers, Job.Append($"cluster.transport={transport}")));
        Assert.True(run.ExitCode == 0, $"exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        Assert.Contains("val loss", run.Stdout);

        var expected = Losses(single);
        var actual = Losses(parallel);
        Assert.Equal(20, actual.Length);
        for (int i = 0; i < expected.Length; i++)
            Assert.True(Math.Abs(actual[i] - expected[i]) <= 1e-5 * Math.Abs(expected[i]), $"step {i + 1}: loss {actual[i]} vs single-process {expected[i]}");

        using var a = CheckpointFiles.Load(Path.Combine(single, "checkpoints", CheckpointFiles.DirectoryName(20)));
        using var b = CheckpointFiles.Load(Path.Combine(parallel, "checkpoints", CheckpointFiles.DirectoryName(20)));
        foreach (var (name, tensor) in a.Tensors.Where(t => t.Key.StartsWith("model.", StringComparison.Ordinal)))
        {
            double diff = (tensor - b.Tensors[name]).abs().max().item<float>();
            Assert.True(diff <= 1e-4, $"{name} differs by {diff}");
        }

        // Every step's metrics carry the all-reduce's share.
        var last = JsonDocument.Parse(File.ReadAllLines(Path.Combine(parallel, "metrics.jsonl"))[^1]).RootElement;
        Assert.True(last.GetProperty("allreduce_bytes").GetInt64() > 0);
        Assert.True(last.GetProperty("allreduce_ms").GetDouble() > 0);
    }

    /// <summary>
    /// Overlapping the gradient all-reduce with backward changes when buckets start, never what they sum: with
    /// several buckets (small and large, so both all-reduce algorithms run), overlapped and non-overlapped runs end
    /// with the same bits, on every transport.
    /// </summary>
    [Fact]
    public void OverlappedGradientsEndBitIdenticalToTheNonOverlappedRunOnEveryTransport()
    {
        // 3 ranks, 128 wide: buckets of about 0.3 MB take the ring; the last one (the embeddings, 41 KB) takes the
        // one-shot (up to 256 KiB for more than 2 ranks).
        string[] buckets = ["model.n-embd=128", "model.n-head=4", "cluster.bucket-mb=0.3", "train.batch-size=6", "train.grad-accum=2", "checkpoint.every=1000", "train.max-iters=12"];
        var runs = new (string Transport, bool Overlap)[] { ("shm", false), ("shm", true), ("tcp", true), ("grpc", true) };
        var directories = new List<string>();
        foreach (var (transport, overlap) in runs)
        {
            string dir = TestSupport.TempDir($"overlap-{transport}-{overlap}");
            var run = TestSupport.RunCli(dir, TestSupport.TrainArgs(dir, 3,
                buckets.Concat([$"cluster.transport={transport}", $"cluster.overlap={(overlap ? "true" : "false")}"])));
            Assert.True(run.ExitCode == 0, $"{transport} overlap={overlap}: exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
            directories.Add(dir);
        }
        var reference = Path.Combine(directories[0], "checkpoints", "step-00000012");
        foreach (var dir in directories.Skip(1))
        {
            var compare = TestSupport.RunCli(dir, "inspect", Path.Combine(dir, "checkpoints", "step-00000012"), "--same-as", reference);
            Assert.True(compare.ExitCode == 0 && compare.Stdout.Contains("identical"), $"{dir}:\n{compare.Stdout}\n{compare.Stderr}");
        }
        Assert.Equal(Losses(directories[0]), Losses(directories[1]));
    }

    [Fact]
    public void Bf16CompressedGradientsTrainCloseToTheExactRun()
    {
        string single = TestSupport.TempDir("bf16-1"), parallel = TestSupport.TempDir("bf16-2");
        using (var trainer = new Trainer(TestSupport.TinyJob(single, Job), TestSupport.Logger)) trainer.Run(new Quiet());
        var run = TestSupport.RunCli(parallel, TestSupport.TrainArgs(parallel, 2, Job.Append("cluster.compression=bf16")));
        Assert.True(run.ExitCode == 0, $"exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        var expected = Losses(single);
        var actual = Losses(parallel);
        Assert.Equal(expected[0], actual[0], 4);   // step 1's loss comes before any compressed gradient
        for (int i = 0; i < expected.Length; i++)
            Assert.True(Math.Abs(actual[i] - expected[i]) <= 0.02 * expected[i], $"step {i + 1}: {actual[i]} vs exact {expected[i]}");
        Assert.NotEqual(expected, actual);   // the compression really happened
        var last = JsonDocument.Parse(File.ReadAllLines(Path.Combine(parallel, "metrics.jsonl"))[^1]).RootElement;
        Assert.True(last.GetProperty("allreduce_bytes").GetInt64() > 0);
    }

    [Fact]
    public void AClusterRunResumesWithAnotherWorkerCount()
    {
        string resumed = TestSupport.TempDir("resume-dp"), straight = TestSupport.TempDir("straight-dp");
        foreach (var (dir, workers, iters, resume) in new[] { (resumed, 2, 10, false), (resumed, 3, 20, true), (straight, 2, 20, false) })
        {
            var run = TestSupport.RunCli(dir, TestSupport.TrainArgs(dir, workers, Job.Append($"train.max-iters={iters}"), resume));
            Assert.True(run.ExitCode == 0, $"exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        }
        var expected = Losses(straight);
        var actual = Losses(resumed);
        Assert.Equal(20, actual.Length);
        for (int i = 0; i < 20; i++)
            Assert.True(Math.Abs(actual[i] - expected[i]) <= 1e-5 * expected[i], $"step {i + 1}: {actual[i]} vs uninterrupted {expected[i]}");
        using var a = CheckpointFiles.Load(Path.Combine(resumed, "checkpoints", CheckpointFiles.DirectoryName(20)));
        using var b = CheckpointFiles.Load(Path.Combine(straight, "checkpoints", CheckpointFiles.DirectoryName(20)));
        foreach (var (name, tensor) in a.Tensors)
            Assert.True((tensor - b.Tensors[name]).abs().max().item<float>() <= 1e-4, $"{name} differs");
    }

    [Fact]
    public void AClusterResumingACheckpointOfAnotherShapeFailsNamingTheTensorAndBothShapes()
    {
        string dir = TestSupport.TempDir("shape-dp");
        var first = TestSupport.RunCli(dir, TestSupport.TrainArgs(dir, 2, Job.Append("train.max-iters=10")));
        Assert.True(first.ExitCode == 0, $"exit {first.ExitCode}\n{first.Stderr}\n{first.Stdout}");
        var wider = TestSupport.RunCli(dir, TestSupport.TrainArgs(dir, 2, Job.Append("train.max-iters=20").Append("model.n-embd=48"), resume: true));
        Assert.NotEqual(0, wider.ExitCode);
        Assert.Contains("tensor 'model.wte.weight' has shape [65, 32], the model needs [65, 48]", wider.Stderr);
        Assert.DoesNotContain("giving up after", wider.Stderr);   // retrying cannot help, so it is not retried
    }

    [Fact]
    public void IlgpuKernelsTrainBitIdenticalToSimdKernels()
    {
        var dirs = new Dictionary<string, string>();
        foreach (var kernels in new[] { "simd", "ilgpu" })
        {
            string dir = dirs[kernels] = TestSupport.TempDir($"kernels-{kernels}");
            var run = TestSupport.RunCli(dir, TestSupport.TrainArgs(dir, 2, Job.Append($"cluster.kernels={kernels}")));
            Assert.True(run.ExitCode == 0, $"exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        }
        // Each rank logs the kernels that reduced its gradients: the ILGPU run really ran ILGPU (on its CPU
        // accelerator on a machine without a CUDA GPU), or the comparison below would prove nothing.
        Assert.Equal(2, Regex.Count(WorkerLogs(dirs["simd"]), @"Rank [01] reduces with simd kernels \(cluster\.kernels = simd\)"));
        Assert.Equal(2, Regex.Count(WorkerLogs(dirs["ilgpu"]), @"Rank [01] reduces with ilgpu on (CPU|Cuda) \(.+\) kernels \(cluster\.kernels = ilgpu\)"));

        string final = CheckpointFiles.DirectoryName(20);
        var comparison = CheckpointFiles.Compare(Path.Combine(dirs["simd"], "checkpoints", final), Path.Combine(dirs["ilgpu"], "checkpoints", final));
        Assert.True(comparison.Identical, comparison.Difference);
        Assert.True(comparison.Tensors > 10, $"only {comparison.Tensors} tensors compared");
        Assert.Equal(Losses(dirs["simd"]), Losses(dirs["ilgpu"]));
    }

    static string WorkerLogs(string runDir) =>
        string.Concat(Directory.GetFiles(Path.Combine(runDir, "logs"), "worker-*.log").Select(File.ReadAllText));
}
