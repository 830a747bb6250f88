using System.Text.Json;
using Distributed.Training;
using Distributed.Training.Checkpoints;

namespace Distributed.Tests;

/// <summary>
/// The single process, a dp=2 x tp=2 cluster, a tp=2 x pp=2 cluster and a dp=2 x pp=2 cluster with ZeRO-1 of the
/// same job, each run once: the references of the model-parallel equivalence, resharding and fault tests.
/// </summary>
public sealed class ModelParallelReference
{
    public static readonly string[] Job =
    [
        "model.n-layer=4", "model.n-head=4", "model.n-embd=32", "train.batch-size=12", "train.max-iters=50", "train.eval-interval=25", "train.eval-iters=2",
        "optimizer.warmup-iters=5", "optimizer.lr-decay-iters=50", "checkpoint.every=25", "checkpoint.keep=3",
    ];

    sealed class Quiet : ITrainingObserver;

    public ModelParallelReference()
    {
        Single = TestSupport.TempDir("tp-single");
        using (var trainer = new Trainer(TestSupport.TinyJob(Single, Job), TestSupport.Logger)) trainer.Run(new Quiet());
        Grid = TestSupport.TempDir("dp2-tp2");
        var run = TestSupport.RunCli(Grid, TestSupport.TrainArgs(Grid, 4, Job.Append("parallel.tp=2")));
        Assert.True(run.ExitCode == 0, $"dp2 x tp2: exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        Pipeline = TestSupport.TempDir("tp2-pp2");
        run = TestSupport.RunCli(Pipeline, TestSupport.TrainArgs(Pipeline, 4, Job.Concat(PipelineJob)));
        Assert.True(run.ExitCode == 0, $"tp2 x pp2: exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        ShardedPipeline = TestSupport.TempDir("dp2-pp2-zero1");
        run = TestSupport.RunCli(ShardedPipeline, TestSupport.TrainArgs(ShardedPipeline, 4, Job.Concat(ShardedPipelineJob)));
        Assert.True(run.ExitCode == 0, $"dp2 x pp2 ZeRO-1: exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
    }

    public static readonly string[] ShardedPipelineJob = ["parallel.pp=2", "parallel.micro-batches=3", "parallel.shard-optimizer=true"];

    /// <summary>The run dir of a reference layout by the name the tests use.</summary>
    public string Of(string layout) => layout switch
    {
        "dp2 x tp2" => Grid,
        "tp2 x pp2" => Pipeline,
        "dp2 x pp2 ZeRO-1" => ShardedPipeline,
        _ => throw new ArgumentException($"no reference run of {layout}"),
    };

    public static readonly string[] PipelineJob = ["parallel.tp=2", "parallel.pp=2", "parallel.micro-batches=4"];

    public string Single { get; }
    public string Grid { get; }
    public string Pipeline { get; }
    public string ShardedPipeline { get; }

    public static string Checkpoint(string runDir, long step) => Path.Combine(runDir, "checkpoints", CheckpointFiles.DirectoryName(step));
}

/// <summary>
/// Tensor parallelism as a user runs it: `dtrain train --workers N --set parallel.tp=T` on real worker processes.
/// Losses and (gathered) weights match a single process of the same global batch; a checkpoint of one layout resumes
/// on another; a killed rank of a dp x tp job costs nothing but time.
/// </summary>
public class ModelParallelClusterTests(ModelParallelReference reference) : IClassFixture<ModelParallelReference>
{
    static double[] Losses(string runDir) => File.ReadAllLines(Path.Combine(runDir, "metrics.jsonl"))
        .Select(l => JsonDocument.Parse(l).RootElement.GetProperty("loss").GetDouble()).ToArray();

    static void AssertMatches(string expectedRun, string actualRun, string what, int fromStep = 1, int lastStep = 50)
    {
        var expected = Losses(expectedRun)[..lastStep];
        var actual = Losses(actualRun);
        Assert.Equal(expected.Length - (fromStep - 1), actual.Length);
        for (int i = 0; i < actual.Length; i++)
        {
            double e = expected[i + fromStep - 1];
            Assert.True(Math.Abs(actual[i] - e) <= 1e-5 * Math.Abs(e), $"{what}, step {i + fromStep}: loss {actual[i]} vs single-process {e}");
        }
        using var a = CheckpointFiles.Load(ModelParallelReference.Checkpoint(expectedRun, lastStep));
        using var b = CheckpointFiles.Load(ModelParallelReference.Checkpoint(actualRun, lastStep));
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
        var run = TestSupport.RunCli(dir, TestSupport.TrainArgs(dir, workers, ModelParallelReference.Job.Append($"parallel.tp={tp}")));
        Assert.True(run.ExitCode == 0, $"tp={tp}: exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        AssertMatches(reference.Single, dir, $"tp={tp}");
    }

    [Fact]
    public void TensorAndPipelineParallelGridMatchesASingleProcess() => AssertMatches(reference.Single, reference.Pipeline, "tp=2 x pp=2");

    [Theory]
    [InlineData(2, "parallel.pp=2", "parallel.schedule=gpipe", "parallel.micro-batches=4")]
    [InlineData(2, "parallel.pp=2", "parallel.schedule=1f1b", "parallel.micro-batches=4")]
    [InlineData(4, "parallel.pp=4", "parallel.schedule=1f1b", "parallel.micro-batches=4")]
    [InlineData(4, "parallel.pp=2", "parallel.schedule=1f1b", "parallel.micro-batches=3", "parallel.stage-layers=3,1")]   // dp=2 x pp=2, uneven stages
    public void PipelineRunMatchesASingleProcess(int workers, params string[] layout)
    {
        string dir = TestSupport.TempDir("pp");
        var run = TestSupport.RunCli(dir, TestSupport.TrainArgs(dir, workers, ModelParallelReference.Job.Concat(layout)));
        Assert.True(run.ExitCode == 0, $"{string.Join(" ", layout)}: exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        AssertMatches(reference.Single, dir, $"{workers} workers, {string.Join(" ", layout)}");
        if (layout.Contains("parallel.stage-layers=3,1"))
            Assert.Contains("stage 0 of 2 (blocks 0..2)", string.Join("\n", Directory.GetFiles(Path.Combine(dir, "logs"), "worker-*.log").Select(File.ReadAllText)));
    }

    /// <summary>
    /// ZeRO-1: each data-parallel rank keeps and steps the moments of its share of the parameters. The same result as
    /// one process, each rank holding about half the moments (its checkpoints resume on any layout: the matrix below).
    /// </summary>
    [Theory]
    [InlineData(2)]
    [InlineData(4, "parallel.tp=2")]
    public void AShardedOptimizerMatchesASingleProcess(int workers, params string[] layout)
    {
        string dir = TestSupport.TempDir("zero1");
        var run = TestSupport.RunCli(dir, TestSupport.TrainArgs(dir, workers, ModelParallelReference.Job.Concat(layout).Append("parallel.shard-optimizer=true")));
        Assert.True(run.ExitCode == 0, $"ZeRO-1 on {workers} workers: exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        AssertMatches(reference.Single, dir, $"ZeRO-1, {workers} workers {string.Join(" ", layout)}");
        // Each rank logs the bytes of moments it keeps and the parameters it holds: unsharded, the moments are 2 floats a parameter.
        var held = Directory.GetFiles(Path.Combine(dir, "logs"), "worker-*.log").SelectMany(File.ReadLines)
            .Select(l => System.Text.RegularExpressions.Regex.Match(l, @"Rank (\d+) holds [\d,]+ bytes of weights and AdamW moments \(([\d,]+) of moments; ([\d,]+) parameters"))
            .Where(m => m.Success).GroupBy(m => m.Groups[1].Value)
            .Select(g => (Moments: long.Parse(g.First().Groups[2].Value.Replace(",", "")), Parameters: long.Parse(g.First().Groups[3].Value.Replace(",", "")))).ToList();
        Assert.Equal(workers, held.Count);
        foreach (var (moments, parameters) in held)
            Assert.True(moments < 0.65 * 2 * parameters * sizeof(float), $"a rank keeps {moments:N0} bytes of moments for {parameters:N0} parameters: not sharded over dp=2");
    }

    [Fact]
    public void TheFullGridDp2Tp2Pp2MatchesASingleProcess()
    {
        string dir = TestSupport.TempDir("dp2-tp2-pp2");
        var run = TestSupport.RunCli(dir, TestSupport.TrainArgs(dir, 8, ModelParallelReference.Job.Concat(ModelParallelReference.PipelineJob)
            .Concat(["parallel.micro-batches=2", "train.max-iters=25"])));
        Assert.True(run.ExitCode == 0, $"dp2 x tp2 x pp2: exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        AssertMatches(reference.Single, dir, "dp=2 x tp=2 x pp=2", lastStep: 25);
    }

    /// <summary>Two faults in one run (one run of 4 workers is the costly part): the last stage killed, then the link between the stages cut.</summary>
    [Fact]
    public void FaultsInATp2Pp2JobRecoverAndItEndsByteIdentical()
    {
        string dir = TestSupport.TempDir("pp-fault");
        var run = TestSupport.RunCli(dir, [.. TestSupport.TrainArgs(dir, 4, ModelParallelReference.Job.Concat(ModelParallelReference.PipelineJob)),
            "--fault", "kill-worker:3@30", "--fault", "drop-link:1-3@40", "--fault", "kill-coordinator@45"]);
        Assert.True(run.ExitCode == 0, $"exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        Assert.Contains("Recovering from the last commit (restart 2 of", run.Stdout + run.Stderr);
        // The coordinator's loss near the end is adopted, not a restart (the ranks may finish while it is down).
        Assert.DoesNotContain("restart 3 of", run.Stdout + run.Stderr);
        Assert.Contains("Adopted generation 3 as it runs", FaultTests.CoordinatorLogs(dir));
        var comparison = CheckpointFiles.Compare(ModelParallelReference.Checkpoint(reference.Pipeline, 50), ModelParallelReference.Checkpoint(dir, 50));
        Assert.True(comparison.Identical, comparison.Difference);
    }

    [Fact]
    public void AShardedOptimizerInAPipelineMatchesASingleProcess() => AssertMatches(reference.Single, reference.ShardedPipeline, "ZeRO-1, dp=2 x pp=2");

    /// <summary>
    /// The resharding matrix: a step-25 checkpoint of each layout (ZeRO-1's moment shards included) resumed as one
    /// process, as dp=4 and as tp=2 x pp=2 continues as the uninterrupted single process does.
    /// </summary>
    [Theory]
    [InlineData("dp2 x tp2", 1)]
    [InlineData("dp2 x tp2", 4, "parallel.tp=1")]
    [InlineData("dp2 x tp2", 4, "parallel.tp=2", "parallel.pp=2", "parallel.micro-batches=4")]
    [InlineData("tp2 x pp2", 1)]
    [InlineData("tp2 x pp2", 4, "parallel.tp=1")]
    [InlineData("tp2 x pp2", 4, "parallel.tp=2", "parallel.pp=2", "parallel.micro-batches=4")]
    [InlineData("dp2 x pp2 ZeRO-1", 1)]
    [InlineData("dp2 x pp2 ZeRO-1", 4, "parallel.tp=1")]
    [InlineData("dp2 x pp2 ZeRO-1", 4, "parallel.tp=2", "parallel.pp=2", "parallel.micro-batches=4")]
    public void ACheckpointOfAnyLayoutResumesOnAnyOther(string written, int workers, params string[] layout)
    {
        string at25 = ModelParallelReference.Checkpoint(reference.Of(written), 25);
        string dir = TestSupport.TempDir("reshard");
        string what = $"{written} resumed {(workers == 1 ? "as one process" : $"on {workers} workers with {string.Join(" ", layout)}")}";
        if (workers == 1)
        {
            using var trainer = new Trainer(TestSupport.TinyJob(dir, ModelParallelReference.Job), TestSupport.Logger, at25);
            Assert.Equal(25, trainer.Step);
            trainer.Run(new Quiet());
        }
        else
        {
            var run = TestSupport.RunCli(dir, [.. TestSupport.TrainArgs(dir, workers, ModelParallelReference.Job.Concat(layout)), "--resume", at25]);
            Assert.True(run.ExitCode == 0, $"{what}: exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        }
        AssertMatches(reference.Single, dir, what, fromStep: 26);
    }

    [Fact]
    public void ExportOfATensorParallelCheckpointHoldsTheSingleProcessWeights()
    {
        string file = Path.Combine(TestSupport.TempDir("tp-export"), "model.safetensors");
        var export = TestSupport.RunCli(reference.Grid, "export", ModelParallelReference.Checkpoint(reference.Grid, 50), file);
        Assert.True(export.ExitCode == 0, export.Stderr + export.Stdout);
        using var single = CheckpointFiles.Load(ModelParallelReference.Checkpoint(reference.Single, 50));
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
