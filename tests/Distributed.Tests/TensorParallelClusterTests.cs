using System.Text.Json;
using Distributed.Training;
using Distributed.Training.Checkpoints;

namespace Distributed.Tests;

/// <summary>
/// The single process and a dp=2 x tp=2 cluster of the same job, each run once: the references of the
/// tensor-parallel equivalence, resharding and fault tests.
/// </summary>
public sealed class TensorParallelReference
{
    public static readonly string[] Job =
    [
        "model.n-head=4", "model.n-embd=32", "train.batch-size=12", "train.max-iters=50", "train.eval-interval=25", "train.eval-iters=2",
        "optimizer.warmup-iters=5", "optimizer.lr-decay-iters=50", "checkpoint.every=25", "checkpoint.keep=3",
    ];

    sealed class Quiet : ITrainingObserver;

    public TensorParallelReference()
    {
        Single = TestSupport.TempDir("tp-single");
        using (var trainer = new Trainer(TestSupport.TinyJob(Single, Job), TestSupport.Logger)) trainer.Run(new Quiet());
        Grid = TestSupport.TempDir("dp2-tp2");
        var run = TestSupport.RunCli(Grid, TestSupport.TrainArgs(Grid, 4, Job.Append("parallel.tp=2")));
        Assert.True(run.ExitCode == 0, $"dp2 x tp2: exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
    }

    public string Single { get; }
    public string Grid { get; }

    public static string Checkpoint(string runDir, long step) => Path.Combine(runDir, "checkpoints", CheckpointFiles.DirectoryName(step));
}

/// <summary>
/// Tensor parallelism as a user runs it: `dtrain train --workers N --set parallel.tp=T` on real worker processes.
/// Losses and (gathered) weights match a single process of the same global batch; a checkpoint of one layout resumes
/// on another; a killed rank of a dp x tp job costs nothing but time.
/// </summary>
public class TensorParallelClusterTests(TensorParallelReference reference) : IClassFixture<TensorParallelReference>
{
    static double[] Losses(string runDir) => File.ReadAllLines(Path.Combine(runDir, "metrics.jsonl"))
        .Select(l => JsonDocument.Parse(l).RootElement.GetProperty("loss").GetDouble()).ToArray();

    static void AssertMatches(string expectedRun, string actualRun, string what, int fromStep = 1)
    {
        var expected = Losses(expectedRun);
        var actual = Losses(actualRun);
        Assert.Equal(expected.Length - (fromStep - 1), actual.Length);
        for (int i = 0; i < actual.Length; i++)
        {
            double e = expected[i + fromStep - 1];
            Assert.True(Math.Abs(actual[i] - e) <= 1e-5 * Math.Abs(e), $"{what}, step {i + fromStep}: loss {actual[i]} vs single-process {e}");
        }
        using var a = CheckpointFiles.Load(TensorParallelReference.Checkpoint(expectedRun, 50));
        using var b = CheckpointFiles.Load(TensorParallelReference.Checkpoint(actualRun, 50));
        foreach (var (name, tensor) in a.Tensors.Where(t => t.Key.StartsWith("model.", StringComparison.Ordinal)))
        {
            Assert.True(b.Tensors.ContainsKey(name), $"{what}: the checkpoint lacks {name}");
            Assert.Equal(tensor.shape, b.Tensors[name].shape);
            double diff = (tensor - b.Tensors[name]).abs().max().item<float>();
            Assert.True(diff <= 1e-4, $"{what}: {name} differs by {diff}");
        }
    }

    [Fact]
    public void DataAndTensorParallelGridMatchesASingleProcess() => AssertMatches(reference.Single, reference.Grid, "dp=2 x tp=2");

    [Theory]
    [InlineData(2, 2)]
    [InlineData(4, 4)]
    public void TensorParallelRunMatchesASingleProcess(int workers, int tp)
    {
        string dir = TestSupport.TempDir($"tp{tp}");
        var run = TestSupport.RunCli(dir, TestSupport.TrainArgs(dir, workers, TensorParallelReference.Job.Append($"parallel.tp={tp}")));
        Assert.True(run.ExitCode == 0, $"tp={tp}: exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        AssertMatches(reference.Single, dir, $"tp={tp}");
    }

    [Fact]
    public void ACheckpointOfDp2Tp2ResumesAsOneProcessAndAsTp4()
    {
        string at25 = TensorParallelReference.Checkpoint(reference.Grid, 25);
        string single = TestSupport.TempDir("reshard-tp1");
        using (var trainer = new Trainer(TestSupport.TinyJob(single, TensorParallelReference.Job), TestSupport.Logger, at25))
        {
            Assert.Equal(25, trainer.Step);
            trainer.Run(new Quiet());
        }
        AssertMatches(reference.Single, single, "dp=2 x tp=2 resumed as one process", fromStep: 26);

        string tp4 = TestSupport.TempDir("reshard-tp4");
        var run = TestSupport.RunCli(tp4, [.. TestSupport.TrainArgs(tp4, 4, TensorParallelReference.Job.Append("parallel.tp=4")), "--resume", at25]);
        Assert.True(run.ExitCode == 0, $"resumed as tp=4: exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        AssertMatches(reference.Single, tp4, "dp=2 x tp=2 resumed as tp=4", fromStep: 26);
    }

    [Fact]
    public void AKilledRankOfADp2Tp2JobRecoversAndEndsByteIdentical()
    {
        string dir = TestSupport.TempDir("tp-fault");
        var run = TestSupport.RunCli(dir, [.. TestSupport.TrainArgs(dir, 4, TensorParallelReference.Job.Append("parallel.tp=2")), "--fault", "kill-worker:1@30"]);
        Assert.True(run.ExitCode == 0, $"exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        Assert.Contains("Recovering from the last commit", run.Stdout + run.Stderr);
        var comparison = CheckpointFiles.Compare(TensorParallelReference.Checkpoint(reference.Grid, 50), TensorParallelReference.Checkpoint(dir, 50));
        Assert.True(comparison.Identical, comparison.Difference);
    }

    [Fact]
    public void ExportOfATensorParallelCheckpointHoldsTheSingleProcessWeights()
    {
        string file = Path.Combine(TestSupport.TempDir("tp-export"), "model.safetensors");
        var export = TestSupport.RunCli(reference.Grid, "export", TensorParallelReference.Checkpoint(reference.Grid, 50), file);
        Assert.True(export.ExitCode == 0, export.Stderr + export.Stdout);
        using var single = CheckpointFiles.Load(TensorParallelReference.Checkpoint(reference.Single, 50));
        var (_, exported) = CheckpointSliceTests.PlainSafetensors(file);
        foreach (var (name, tensor) in single.Tensors.Where(t => t.Key.StartsWith("model.", StringComparison.Ordinal)))
        {
            var (dtype, shape, data) = exported[name["model.".Length..]];
            Assert.Equal("F32", dtype);
            Assert.Equal(tensor.shape, shape);
            var values = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(data).ToArray();
            var expected = tensor.contiguous().data<float>().ToArray();
            double diff = expected.Zip(values, (x, y) => Math.Abs(x - y)).Max();
            Assert.True(diff <= 1e-4, $"exported {name} differs by {diff}");
        }
    }

    sealed class Quiet : ITrainingObserver;
}
