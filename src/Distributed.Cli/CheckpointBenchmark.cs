using System.Diagnostics;
using Distributed.Core;
using Distributed.Training;
using Distributed.Training.Checkpoints;
using Microsoft.Extensions.Logging.Abstractions;

namespace Distributed.Cli;

/// <summary>
/// `dtrain bench checkpoint`: (1) checkpoint write throughput (safetensors shard: temporary file, hash, fsync,
/// rename) against a raw sequential write + fsync of the same number of bytes on the same disk, alternating so both
/// see the same disk state; (2) step time while a checkpoint is written in the background against step time without.
/// </summary>
static class CheckpointBenchmark
{
    public static int Run(JobSpec spec, int repeats, int steps)
    {
        string dir = Path.Combine(spec.RunDir, "bench-checkpoint");
        if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
        spec = spec with { RunDir = dir, Checkpoint = spec.Checkpoint with { Keep = 2 } };
        using var trainer = new Trainer(spec, NullLogger.Instance);
        trainer.TrainStep();   // AdamW moments exist from the first step
        var state = trainer.StateTensors();
        long bytes = state.Sum(s => s.Tensor.NumberOfElements * s.Tensor.ElementSize);
        var metadata = trainer.StateMetadata();
        Console.WriteLine($"state: {state.Count} tensors, {bytes / 1e6:F1} MB (weights and AdamW moments of {spec.Model.Layers}x{spec.Model.Embedding})");

        // (1) throughput, alternating ours and raw; the median of each.
        var ours = new List<double>();
        var raw = new List<double>();
        // The raw write sends one random block again and again: a buffer of the whole state could exceed 2 GiB.
        var payload = new byte[(int)Math.Min(bytes, 64 << 20)];
        Random.Shared.NextBytes(payload);
        for (int i = 0; i < repeats; i++)
        {
            // Both start from an empty directory: replacing the previous file would add its deletion to our time only.
            string target = Path.Combine(dir, "throughput");
            if (Directory.Exists(target)) Directory.Delete(target, recursive: true);
            var clock = Stopwatch.StartNew();
            var record = CheckpointFiles.WriteShard(target, 0, 1, state, metadata);
            ours.Add(record.Bytes / clock.Elapsed.TotalSeconds);
            clock.Restart();
            string rawPath = Path.Combine(dir, "raw.bin");
            using (var stream = new FileStream(rawPath, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20))
            {
                foreach (var (_, length) in TensorBytes.Split(bytes, payload.Length)) stream.Write(payload, 0, length);
                stream.Flush(flushToDisk: true);
            }
            raw.Add(bytes / clock.Elapsed.TotalSeconds);
            File.Delete(rawPath);
        }
        double oursMedian = Median(ours), rawMedian = Median(raw);
        Console.WriteLine($"checkpoint write: {oursMedian / 1e6:F0} MB/s; raw sequential write + fsync of the same bytes: {rawMedian / 1e6:F0} MB/s; " +
            $"ratio {oursMedian / rawMedian:F2} (goal >= 0.8)");

        // (2) steps with and without a background write in flight (a checkpoint begun every step keeps one in flight).
        var plain = new List<double>();
        var writing = new List<double>();
        var begin = new List<double>();
        for (int round = 0; round < 2; round++)
        {
            for (int i = 0; i < steps; i++) plain.Add(trainer.TrainStep().StepMs);
            for (int i = 0; i < steps; i++)
            {
                var clock = Stopwatch.StartNew();
                trainer.BeginCheckpoint();
                begin.Add(clock.Elapsed.TotalMilliseconds);
                writing.Add(trainer.TrainStep().StepMs);
            }
            trainer.FinishCheckpoint();
        }
        double plainMs = Median(plain), writingMs = Median(writing), beginMs = Median(begin);
        Console.WriteLine($"step time: {plainMs:F1} ms without a checkpoint, {writingMs:F1} ms while one is written in the background " +
            $"(slowdown {writingMs / plainMs:F2}x); starting a checkpoint (copying the tensors) takes {beginMs:F1} ms on the training thread");
        Directory.Delete(dir, recursive: true);
        return 0;
    }

    static double Median(List<double> values)
    {
        var sorted = values.Order().ToList();
        return sorted[sorted.Count / 2];
    }
}
