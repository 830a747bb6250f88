using Distributed.Core;
using Distributed.Training;
using Distributed.Training.Checkpoints;
using static TorchSharp.torch;

namespace Distributed.Tests;

public class CheckpointTests
{
    sealed class Quiet : ITrainingObserver;

    [Fact]
    public void SafeTensorsRoundTrip()
    {
        string dir = TestSupport.TempDir("roundtrip");
        using var a = randn(3, 5);
        using var b = arange(7, dtype: ScalarType.Int64);
        var (path, sha, bytes) = CheckpointFiles.Write(dir, 12, [("a", a), ("b", b)], new Dictionary<string, string> { ["step"] = "12", ["note"] = "x\"y" });
        Assert.EndsWith("step-00000012.safetensors", path);
        Assert.Equal(new FileInfo(path).Length, bytes);
        Assert.Equal($"{sha}  step-00000012.safetensors\n", File.ReadAllText(path + ".sha256"));
        using var loaded = CheckpointFiles.Load(path);
        Assert.Equal("x\"y", loaded.Metadata["note"]);
        Assert.True(loaded.Tensors["a"].bytes.SequenceEqual(a.bytes));
        Assert.True(loaded.Tensors["b"].bytes.SequenceEqual(b.bytes));
        Assert.False(File.Exists(path + ".tmp"));
    }

    [Fact]
    public void CorruptCheckpointIsRejectedAndTheNewestValidOneIsUsed()
    {
        string dir = TestSupport.TempDir("corrupt");
        using var t = ones(100);
        var (older, _, _) = CheckpointFiles.Write(dir, 1, [("t", t)], new Dictionary<string, string>());
        var (newer, sha, _) = CheckpointFiles.Write(dir, 2, [("t", t)], new Dictionary<string, string>());
        using (var f = new FileStream(newer, FileMode.Open)) { f.Position = f.Length - 3; f.WriteByte(0x7f); }
        var error = Assert.Throws<CheckpointException>(() => CheckpointFiles.Load(newer));
        Assert.Contains(newer, error.Message);
        Assert.Contains(sha, error.Message);
        Assert.Equal(older, CheckpointFiles.FindNewestValid(dir, TestSupport.Logger));
    }

    [Fact]
    public void RetentionKeepsTheNewest()
    {
        string dir = TestSupport.TempDir("retain");
        using var t = ones(1);
        foreach (var step in new[] { 10, 20, 30, 40 }) CheckpointFiles.Write(dir, step, [("t", t)], new Dictionary<string, string>());
        CheckpointFiles.Retain(dir, keep: 2);
        Assert.Equal(new long[] { 40, 30 }, CheckpointFiles.List(dir).Select(c => c.Step));
        Assert.Equal(2, Directory.GetFiles(dir, "*.sha256").Length);
    }

    [Fact]
    public void ResumedRunEqualsUninterruptedRunBitForBit()
    {
        string interrupted = TestSupport.TempDir("resume-a"), straight = TestSupport.TempDir("resume-b");
        var specA = TestSupport.TinyJob(interrupted, "checkpoint.every=10", "model.dropout=0.1");
        var specB = TestSupport.TinyJob(straight, "checkpoint.every=10", "model.dropout=0.1");

        using (var first = new Trainer(specA, TestSupport.Logger)) first.Run(new Quiet(), stopAtStep: 10);
        string at10 = Path.Combine(interrupted, "checkpoints", CheckpointFiles.FileName(10));
        using (var resumed = new Trainer(specA, TestSupport.Logger, at10))
        {
            Assert.Equal(10, resumed.Step);
            resumed.Run(new Quiet());
        }
        using (var whole = new Trainer(specB, TestSupport.Logger)) whole.Run(new Quiet());

        using var a = CheckpointFiles.Load(Path.Combine(interrupted, "checkpoints", CheckpointFiles.FileName(20)));
        using var b = CheckpointFiles.Load(Path.Combine(straight, "checkpoints", CheckpointFiles.FileName(20)));
        Assert.Equal(b.Tensors.Keys.Order(), a.Tensors.Keys.Order());
        Assert.Contains(a.Tensors.Keys, k => k.StartsWith("optim.exp_avg_sq.", StringComparison.Ordinal));
        foreach (var (name, tensor) in b.Tensors)
            Assert.True(tensor.bytes.SequenceEqual(a.Tensors[name].bytes), $"tensor {name} differs after resume");
        Assert.Equal(b.Metadata["optimizer_step"], a.Metadata["optimizer_step"]);

        // The losses of steps 11..20 are the same numbers too.
        static string[] Losses(string dir) => File.ReadAllLines(Path.Combine(dir, "metrics.jsonl"))
            .Select(l => System.Text.Json.JsonDocument.Parse(l).RootElement.GetProperty("loss").GetRawText()).ToArray();
        Assert.Equal(Losses(straight), Losses(interrupted));
    }

    [Fact]
    public void CheckpointOfAnotherShapeNamesTheTensorAndBothShapes()
    {
        string dir = TestSupport.TempDir("shape");
        using (var trainer = new Trainer(TestSupport.TinyJob(dir, "train.max-iters=1"), TestSupport.Logger)) trainer.Run(new Quiet());
        string path = Path.Combine(dir, "checkpoints", CheckpointFiles.FileName(1));
        var wider = TestSupport.TinyJob(dir, "model.n-embd=48");
        var error = Assert.Throws<CheckpointException>(() => new Trainer(wider, TestSupport.Logger, path));
        Assert.Contains("tensor 'model.wte.weight' has shape [65, 32], the model needs [65, 48]", error.Message);
    }

    [Fact]
    public void TrainingLowersTheLossAndWritesMetrics()
    {
        string dir = TestSupport.TempDir("metrics");
        using var trainer = new Trainer(TestSupport.TinyJob(dir, "train.max-iters=30", "optimizer.lr-decay-iters=30", "train.eval-interval=30", "train.eval-iters=4"), TestSupport.Logger);
        var initial = trainer.Evaluate();
        var final = trainer.Run(new Quiet())!;
        Assert.True(final.ValLoss < initial.ValLoss - 0.3, $"val loss {initial.ValLoss} -> {final.ValLoss}");
        var lines = File.ReadAllLines(Path.Combine(dir, "metrics.jsonl"));
        Assert.Equal(30, lines.Length);
        var last = System.Text.Json.JsonDocument.Parse(lines[^1]).RootElement;
        foreach (var key in new[] { "step", "loss", "lr", "grad_norm", "tokens_per_s", "step_ms" }) Assert.True(last.TryGetProperty(key, out _), key);
        Assert.Equal(30, last.GetProperty("step").GetInt32());
    }
}
