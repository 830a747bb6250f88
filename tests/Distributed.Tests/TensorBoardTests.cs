using System.Buffers.Binary;
using System.Text.Json;
using Distributed.Training;
using Distributed.Training.Checkpoints;
using Distributed.Training.Observability;
using Tensorboard;

namespace Distributed.Tests;

/// <summary>
/// TensorBoard event files read back as TensorBoard reads them: TFRecord framing (length, masked CRC-32C of the length,
/// the Event protobuf, masked CRC-32C of it), then every scalar at its step, for a run stopped and resumed.
/// </summary>
public class TensorBoardTests
{
    sealed class Quiet : ITrainingObserver;

    /// <summary>Every event of a TFRecord file, its framing checked.</summary>
    public static List<Event> ReadEvents(string file)
    {
        var bytes = File.ReadAllBytes(file);
        var events = new List<Event>();
        for (int at = 0; at < bytes.Length;)
        {
            Assert.True(bytes.Length - at >= 12, $"{file}: a truncated record header at byte {at}");
            var lengthBytes = bytes.AsSpan(at, 8);
            long length = BinaryPrimitives.ReadInt64LittleEndian(lengthBytes);
            Assert.Equal(MaskedCrc32C(lengthBytes), BinaryPrimitives.ReadUInt32LittleEndian(bytes.AsSpan(at + 8, 4)));
            Assert.True(at + 12 + length + 4 <= bytes.Length, $"{file}: record at byte {at} runs past the end");
            var data = bytes.AsSpan(at + 12, (int)length);
            Assert.Equal(MaskedCrc32C(data), BinaryPrimitives.ReadUInt32LittleEndian(bytes.AsSpan(at + 12 + (int)length, 4)));
            events.Add(Event.Parser.ParseFrom(data.ToArray()));
            at += 12 + (int)length + 4;
        }
        return events;
    }

    static uint MaskedCrc32C(ReadOnlySpan<byte> data)
    {
        uint crc = 0xFFFFFFFF;
        foreach (byte b in data)
        {
            crc ^= b;
            for (int k = 0; k < 8; k++) crc = (crc & 1) != 0 ? (crc >> 1) ^ 0x82F63B78 : crc >> 1;
        }
        crc = ~crc;
        return ((crc >> 15) | (crc << 17)) + 0xa282ead8;
    }

    /// <summary>tag -> (step, value) in file order, over every event file of a run's tensorboard directory (in name order, as TensorBoard reads them).</summary>
    public static Dictionary<string, List<(long Step, float Value)>> Scalars(string runDir, out int files)
    {
        var paths = Directory.GetFiles(Path.Combine(runDir, "tensorboard"), "events.out.tfevents.*").Order(StringComparer.Ordinal).ToList();
        files = paths.Count;
        var scalars = new Dictionary<string, List<(long, float)>>();
        foreach (var path in paths)
        {
            var events = ReadEvents(path);
            Assert.Equal("brain.Event:2", events[0].FileVersion);
            foreach (var e in events.Where(e => e.Summary is not null))
                foreach (var v in e.Summary.Value)
                {
                    if (!scalars.TryGetValue(v.Tag, out var list)) scalars[v.Tag] = list = [];
                    list.Add((e.Step, v.SimpleValue));
                    Assert.True(e.WallTime > 1.7e9, $"{v.Tag} at step {e.Step}: wall time {e.WallTime} is not seconds since 1970");
                }
        }
        return scalars;
    }

    [Fact]
    public void EveryScalarIsAtItsStepAcrossAResume()
    {
        string dir = TestSupport.TempDir("tensorboard");
        var spec = TestSupport.TinyJob(dir);   // 20 steps, evaluations and checkpoints every 10
        using (var first = new Trainer(spec, TestSupport.Logger)) first.Run(new Quiet(), stopAtStep: 10);
        using (var resumed = new Trainer(spec, TestSupport.Logger, Path.Combine(dir, "checkpoints", CheckpointFiles.DirectoryName(10)))) resumed.Run(new Quiet());

        var scalars = Scalars(dir, out int files);
        Assert.Equal(2, files);   // one per start, in the same directory: one run in TensorBoard
        var metrics = File.ReadAllLines(Path.Combine(dir, "metrics.jsonl")).Select(l => JsonDocument.Parse(l).RootElement).ToList();
        var evals = File.ReadAllLines(Path.Combine(dir, "eval.jsonl")).Select(l => JsonDocument.Parse(l).RootElement).ToList();
        long[] everyStep = [.. Enumerable.Range(1, 20).Select(i => (long)i)];

        void AssertSeries(string tag, long[] steps, Func<long, double> expected)
        {
            Assert.True(scalars.TryGetValue(tag, out var series), $"no scalar '{tag}'; tags: {string.Join(", ", scalars.Keys)}");
            Assert.Equal(steps, series.Select(s => s.Step).ToArray());
            foreach (var (step, value) in series)
                Assert.True(Math.Abs(value - (float)expected(step)) <= 1e-6 * Math.Max(1, Math.Abs(expected(step))), $"{tag} at step {step}: {value} vs {expected(step)}");
        }
        double Metric(long step, string name) => metrics[(int)step - 1].GetProperty(name).GetDouble();
        double Eval(long step, string name) => evals.Single(e => e.GetProperty("step").GetInt64() == step).GetProperty(name).GetDouble();

        Assert.Equal(everyStep, metrics.Select(m => m.GetProperty("step").GetInt64()).ToArray());
        AssertSeries(TensorBoardLog.TrainLoss, everyStep, s => Metric(s, "loss"));
        AssertSeries(TensorBoardLog.LearningRate, everyStep, s => Metric(s, "lr"));
        AssertSeries(TensorBoardLog.GradNorm, everyStep, s => Metric(s, "grad_norm"));
        AssertSeries(TensorBoardLog.Step, everyStep, s => s);
        AssertSeries(TensorBoardLog.StepMs, everyStep, s => scalars[TensorBoardLog.StepMs][(int)s - 1].Value);   // present at every step
        foreach (var tag in new[] { TensorBoardLog.TokensPerSecond, TensorBoardLog.ComputeMs, TensorBoardLog.CommunicationMs })
            Assert.Equal(everyStep, scalars[tag].Select(s => s.Step).ToArray());
        Assert.All(scalars[TensorBoardLog.TokensPerSecond], s => Assert.True(s.Value > 0));
        AssertSeries(TensorBoardLog.ValLoss, [10, 20], s => Eval(s, "val_loss"));
        AssertSeries(TensorBoardLog.EvalTrainLoss, [10, 20], s => Eval(s, "train_loss"));
        AssertSeries(TensorBoardLog.ValPerplexity, [10, 20], s => Eval(s, "val_perplexity"));
        foreach (var tag in new[] { TensorBoardLog.CheckpointCopyMs, TensorBoardLog.CheckpointWriteMs, TensorBoardLog.CheckpointMegabytes })
            Assert.Equal([10L, 20L], scalars[tag].Select(s => s.Step).ToArray());
        Assert.All(scalars[TensorBoardLog.CheckpointMegabytes], s => Assert.True(s.Value > 0));
    }

    [Fact]
    public void OffWritesNoEventFiles()
    {
        string dir = TestSupport.TempDir("tensorboard-off");
        using (var trainer = new Trainer(TestSupport.TinyJob(dir, "run.tensorboard=false", "train.max-iters=2"), TestSupport.Logger)) trainer.Run(new Quiet());
        Assert.False(Directory.Exists(Path.Combine(dir, "tensorboard")));
    }
}
