using Distributed.Core;
using Distributed.Training;
using Distributed.Training.Checkpoints;
using Distributed.Training.Data;
using static TorchSharp.torch;

namespace Distributed.Tests;

public class CheckpointTests
{
    sealed class Quiet : ITrainingObserver;

    static string Commit(string checkpoints, long step, params StateEntry[][] shards)
    {
        string dir = CheckpointFiles.DirectoryFor(checkpoints, step);
        var records = shards.Select((tensors, rank) => CheckpointFiles.WriteShard(dir, rank, shards.Length, tensors,
            new Dictionary<string, string> { ["step"] = step.ToString(), ["note"] = "x\"y" })).ToArray();
        CheckpointFiles.WriteManifest(dir, new CheckpointManifest(Trainer.CheckpointFormat, step, 1, records, "{}"));
        return dir;
    }

    [Fact]
    public void ShardsRoundTripAndMergeOnLoad()
    {
        string checkpoints = TestSupport.TempDir("roundtrip");
        using var a = randn(3, 5);
        using var b = arange(7, dtype: ScalarType.Int64);
        string dir = Commit(checkpoints, 12, [new StateEntry("a", a)], [new StateEntry("b", b)]);
        Assert.EndsWith("step-00000012", dir);
        var manifest = CheckpointFiles.ReadManifest(dir);
        Assert.Equal(["shard-0-of-2.safetensors", "shard-1-of-2.safetensors"], manifest.Shards.Select(s => s.File));
        foreach (var shard in manifest.Shards)
        {
            string path = Path.Combine(dir, shard.File);
            Assert.Equal(new FileInfo(path).Length, shard.Bytes);
            Assert.Equal(CheckpointFiles.Sha256Of(path), shard.Sha256);
        }
        using var loaded = CheckpointFiles.Load(dir);
        Assert.Equal("x\"y", loaded.Metadata["note"]);
        Assert.True(loaded.Tensors["a"].bytes.SequenceEqual(a.bytes));
        Assert.True(loaded.Tensors["b"].bytes.SequenceEqual(b.bytes));
        Assert.Empty(Directory.GetFiles(dir, "*.tmp"));
    }

    [Fact]
    public void ShardsSplitTheStateEvenlyAndCompletely()
    {
        var state = Enumerable.Range(0, 9).Select(i => new StateEntry($"t{i}", zeros(10 * (i + 1)))).ToList();
        var shards = Enumerable.Range(0, 3).Select(r => CheckpointFiles.ShardOf(state, r, 3)).ToList();
        Assert.Equal(state.Select(s => s.Name).Order(), shards.SelectMany(s => s.Select(t => t.Name)).Order());
        var bytes = shards.Select(s => s.Sum(t => t.Tensor.NumberOfElements * 4)).ToList();
        Assert.True(bytes.Max() - bytes.Min() <= 90 * 4, string.Join(", ", bytes));
        foreach (var entry in state) entry.Tensor.Dispose();
    }

    [Fact]
    public void CorruptCheckpointIsRejectedNamingTheFileAndBothHashesAndTheNewestValidOneIsUsed()
    {
        string checkpoints = TestSupport.TempDir("corrupt");
        using var t = ones(100);
        string older = Commit(checkpoints, 1, [new StateEntry("t", t)]);
        string newer = Commit(checkpoints, 2, [new StateEntry("t", t)]);
        string shard = Path.Combine(newer, CheckpointFiles.ShardName(0, 1));
        string sha = CheckpointFiles.ReadManifest(newer).Shards[0].Sha256;
        using (var f = new FileStream(shard, FileMode.Open)) { f.Position = f.Length - 3; f.WriteByte(0x7f); }
        var error = Assert.Throws<CheckpointException>(() => CheckpointFiles.Load(newer));
        Assert.Contains(shard, error.Message);
        Assert.Contains(sha, error.Message);
        Assert.Contains(CheckpointFiles.Sha256Of(shard), error.Message);
        Assert.Equal(older, CheckpointFiles.FindNewestValid(checkpoints, TestSupport.Logger));
    }

    [Fact]
    public void RetentionKeepsTheNewestCommitsAndDropsAbandonedOnes()
    {
        string checkpoints = TestSupport.TempDir("retain");
        using var t = ones(1);
        foreach (var step in new[] { 10, 20, 30, 40 }) Commit(checkpoints, step, [new StateEntry("t", t)]);
        // Shards of an aborted generation that never committed: older than the newest commit, so abandoned.
        CheckpointFiles.WriteShard(CheckpointFiles.DirectoryFor(checkpoints, 35), 0, 2, [new StateEntry("t", t)], new Dictionary<string, string>());
        CheckpointFiles.WriteShard(CheckpointFiles.DirectoryFor(checkpoints, 50), 0, 2, [new StateEntry("t", t)], new Dictionary<string, string>());
        CheckpointFiles.Retain(checkpoints, keep: 2);
        Assert.Equal(new long[] { 40, 30 }, CheckpointFiles.List(checkpoints).Select(c => c.Step));
        Assert.Equal(["step-00000030", "step-00000040", "step-00000050"], Directory.GetDirectories(checkpoints).Select(Path.GetFileName).Order());

        // With the journal's commits as the authority, a commit whose manifest is not written yet is kept, not abandoned.
        CheckpointFiles.WriteShard(CheckpointFiles.DirectoryFor(checkpoints, 60), 0, 1, [new StateEntry("t", t)], new Dictionary<string, string>());
        CheckpointFiles.Retain(checkpoints, keep: 2, committedSteps: [30, 40, 60]);
        Assert.Equal(["step-00000040", "step-00000060"], Directory.GetDirectories(checkpoints).Select(Path.GetFileName).Order());
    }

    [Fact]
    public void VocabulariesAreStoredAsCodePointsAndOlderOnesLoadWhereTheyCan()
    {
        string checkpoints = TestSupport.TempDir("vocab");
        using var t = ones(1);
        string Write(long step, string key, string value)
        {
            string dir = CheckpointFiles.DirectoryFor(checkpoints, step);
            var shard = CheckpointFiles.WriteShard(dir, 0, 1, [new StateEntry("t", t)], new Dictionary<string, string> { [key] = value });
            CheckpointFiles.WriteManifest(dir, new CheckpointManifest(Trainer.CheckpointFormat, step, 1, [shard], "{}"));
            return dir;
        }
        var tokenizer = CharTokenizer.FromCorpus("ab 😀 𠀀 ！ 你好");
        using (var loaded = CheckpointFiles.Load(Write(1, CheckpointVocabulary.Key, CheckpointVocabulary.Encode(tokenizer))))
            Assert.Equal(tokenizer.Symbols, CheckpointVocabulary.Read(loaded).Symbols);
        // Written before code points: a BMP-only vocabulary means the same ids.
        using (var older = CheckpointFiles.Load(Write(2, CheckpointVocabulary.LegacyKey, "\n !ab")))
            Assert.Equal("\n !ab", CheckpointVocabulary.Read(older).Vocabulary);
        // How that version stored 😀 and 𠀀: their UTF-16 halves sorted apart, which the header's JSON cannot keep.
        string lost = Write(3, CheckpointVocabulary.LegacyKey, "ab" + new string([(char)0xD83D, (char)0xD840, (char)0xDC00, (char)0xDE00]));
        using var broken = CheckpointFiles.Load(lost);
        var error = Assert.Throws<CheckpointException>(() => CheckpointVocabulary.Read(broken));
        Assert.Contains($"checkpoint '{lost}' stores its vocabulary the old way", error.Message);
    }

    [Fact]
    public void ResumedRunEqualsUninterruptedRunBitForBit()
    {
        string interrupted = TestSupport.TempDir("resume-a"), straight = TestSupport.TempDir("resume-b");
        var specA = TestSupport.TinyJob(interrupted, "checkpoint.every=10", "model.dropout=0.1");
        var specB = TestSupport.TinyJob(straight, "checkpoint.every=10", "model.dropout=0.1");

        using (var first = new Trainer(specA, TestSupport.Logger)) first.Run(new Quiet(), stopAtStep: 10);
        string at10 = Path.Combine(interrupted, "checkpoints", CheckpointFiles.DirectoryName(10));
        using (var resumed = new Trainer(specA, TestSupport.Logger, at10))
        {
            Assert.Equal(10, resumed.Step);
            resumed.Run(new Quiet());
        }
        using (var whole = new Trainer(specB, TestSupport.Logger)) whole.Run(new Quiet());

        using var a = CheckpointFiles.Load(Path.Combine(interrupted, "checkpoints", CheckpointFiles.DirectoryName(20)));
        using var b = CheckpointFiles.Load(Path.Combine(straight, "checkpoints", CheckpointFiles.DirectoryName(20)));
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
        string path = Path.Combine(dir, "checkpoints", CheckpointFiles.DirectoryName(1));
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
        foreach (var key in new[] { "step", "loss", "lr", "grad_norm", "tokens_per_s", "step_ms", "wall_time" }) Assert.True(last.TryGetProperty(key, out _), key);
        Assert.Equal(30, last.GetProperty("step").GetInt32());
    }

    [Fact]
    public void TensorsLargerThanAReadPieceLoadStraightIntoTheTargetsAndCompareByteForByte()
    {
        string checkpoints = TestSupport.TempDir("pieces");
        manual_seed(3);
        using var big = randn(25_000_003);   // 100 MB: more than one 64 MiB piece
        using var small = arange(5, dtype: ScalarType.Int64);
        string one = Commit(checkpoints, 1, [new StateEntry("big", big), new StateEntry("small", small)]);
        string split = Commit(checkpoints, 2, [new StateEntry("small", small)], [new StateEntry("big", big)]);   // the same tensors, other shards
        using var changed = big.clone();
        using (var last = changed.narrow(0, 25_000_002, 1)) last.add_(1);
        string other = Commit(checkpoints, 3, [new StateEntry("big", changed), new StateEntry("small", small)]);
        string fewer = Commit(checkpoints, 4, [new StateEntry("big", big)]);

        var same = CheckpointFiles.Compare(one, split);
        Assert.True(same.Identical, same.Difference);
        Assert.Equal(2, same.Tensors);
        Assert.Matches(@"^tensor 'big' differs \(first at byte 100,000,0(08|09|10|11)\)$", CheckpointFiles.Compare(one, other).Difference);
        Assert.Equal("tensor 'small' is in only one of them", CheckpointFiles.Compare(one, fewer).Difference);

        using var loaded = CheckpointFiles.Load(split);
        using var target = zeros(25_000_003);
        using var pairs = zeros(new long[] { 5, 2 }, dtype: ScalarType.Int64);
        using var column = pairs.select(1, 0);   // not contiguous: goes through a temporary tensor
        loaded.CopyInto([new StateEntry("big", target), new StateEntry("small", column)]);
        Assert.True(target.equal(big).all().item<bool>());
        Assert.True(column.equal(small).all().item<bool>());
        using var floats = zeros(5);
        Assert.Contains("tensor 'small' is I64, the target is Float32", Assert.Throws<CheckpointException>(() => loaded.CopyInto([new StateEntry("small", floats)])).Message);
        Directory.Delete(checkpoints, recursive: true);   // 400 MB
    }

    [LargeStateFact]
    public void ATensorOver2GiBRoundTripsThroughAShardFileOver2GiB()
    {
        string checkpoints = TestSupport.TempDir("over-2gib");
        long elements = (1L << 29) + 3;   // 2 GiB + 12 bytes
        using var big = arange(elements, dtype: ScalarType.Float32);
        string dir = Commit(checkpoints, 1, [new StateEntry("big", big)]);
        Assert.True(CheckpointFiles.ReadManifest(dir).Shards[0].Bytes > 1L << 31);
        using (var loaded = CheckpointFiles.Load(dir))
        {
            using var target = zeros(elements);
            loaded.CopyInto([new StateEntry("big", target)]);
            Assert.True(target.equal(big).all().item<bool>());
        }
        Assert.True(CheckpointFiles.Compare(dir, dir).Identical);
        Directory.Delete(checkpoints, recursive: true);
    }
}
