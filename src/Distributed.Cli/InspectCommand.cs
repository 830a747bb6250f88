using System.CommandLine;
using Distributed.Cluster;
using Distributed.Cluster.Config;
using Distributed.Training.Checkpoints;

namespace Distributed.Cli;

/// <summary>
/// <c>dtrain inspect</c>: a run directory's journal (every event the coordinator recorded) and its committed
/// checkpoints with whether each verifies; or one checkpoint's metadata and tensors.
/// </summary>
static class InspectCommand
{
    public static Command Create()
    {
        var path = new Argument<string>("path") { Description = "a run directory (journal and checkpoints) or a checkpoint directory" };
        var sameAs = new Option<string?>("--same-as")
        {
            Description = "another checkpoint: exit 0 if every tensor (weights and optimizer state) is byte for byte the same, 4 otherwise",
        };
        var command = new Command("inspect", "show a run's journal and checkpoints, or a checkpoint's metadata and tensors") { path, sameAs };
        command.SetAction(async (parse, cancellationToken) =>
        {
            string target = parse.GetValue(path)!;
            if (parse.GetValue(sameAs) is { } other) return Compare(target, other);
            if (File.Exists(Path.Combine(target, CheckpointFiles.ManifestName))) return ShowCheckpoint(target);
            if (!Directory.Exists(target)) throw new Core.UserFacingException($"'{target}' is neither a run directory nor a checkpoint");
            int status = 0;
            string jobFile = Path.Combine(target, "job.conf");
            if (File.Exists(jobFile))
            {
                var spec = JobConfigLoader.Load(jobFile) with { RunDir = target };
                status = await ShowJournal(spec);
            }
            string checkpoints = Path.Combine(target, "checkpoints");
            var committed = CheckpointFiles.List(checkpoints);
            Console.WriteLine($"checkpoints in {checkpoints}: {committed.Count} committed");
            foreach (var (step, directory) in committed)
                if (!ShowVerification(step, directory, CheckpointFiles.ReadManifest(directory).Shards)) status = 3;
            return status;
        });
        return command;
    }

    static async Task<int> ShowJournal(Core.JobSpec spec)
    {
        var entries = await JournalReader.ReadAsync(spec, TimeSpan.FromSeconds(30));
        Console.WriteLine($"journal ({spec.Persistence.Provider}, persistence id {CoordinatorPersistence.PersistenceId(spec.RunDir)}): {entries.Count} events");
        var state = JobState.Empty;
        foreach (var (seq, e) in entries)
        {
            state = state.Apply(e);
            string line = e switch
            {
                JobSubmitted s => $"{s.At:O}  job submitted ({s.Submission[..8]}): {s.Workers} workers",
                GenerationStarted g => $"{g.At:O}  generation {g.Generation} started: {g.WorldSize} workers, from step {g.ResumeStep}",
                GenerationAborted a => $"{a.At:O}  generation {a.Generation} aborted: {a.Reason}",
                CheckpointCommitted c => $"{c.At:O}  checkpoint committed at step {c.Step} (generation {c.Generation}): " +
                    string.Join(", ", c.Shards.Select(s => $"{s.File} {s.Bytes:N0} bytes sha256 {s.Sha256[..12]}…")),
                CheckpointsRetired r => $"{r.At:O}  checkpoints retired (retention deletes them): steps {string.Join(", ", r.Steps)}",
                FaultInjected f => $"{f.At:O}  fault injected: {f.Fault}",
                JobEnded end => $"{end.At:O}  job {(end.Completed ? $"completed at step {end.Step}" : $"failed: {end.Reason}")}",
                _ => e.GetType().Name,
            };
            Console.WriteLine($"  {seq,4}  {line}");
        }
        int status = 0;
        string checkpoints = Path.Combine(spec.RunDir, "checkpoints");
        Console.WriteLine($"commits in the journal: {state.Commits.Length}");
        foreach (var commit in state.CommitsNewestFirst())
        {
            string directory = CheckpointFiles.DirectoryFor(checkpoints, commit.Step);
            if (!Directory.Exists(directory)) Console.WriteLine($"  step {commit.Step,8}  deleted (retention)");
            else if (!ShowVerification(commit.Step, directory, commit.Shards)) status = 3;
        }
        return status;
    }

    /// <summary>One line per checkpoint (verified or CORRUPT), then each bad shard with both hashes; true when it verifies.</summary>
    static bool ShowVerification(long step, string directory, IReadOnlyList<ShardRecord> shards)
    {
        var bad = CheckpointFiles.Verify(directory, shards);
        Console.WriteLine($"  step {step,8}  {(bad.Count == 0 ? "verified" : "CORRUPT ")}  {shards.Sum(s => s.Bytes),12:N0} bytes  {directory}");
        foreach (var problem in bad) Console.WriteLine($"      {problem}");
        return bad.Count == 0;
    }

    static int Compare(string a, string b)
    {
        var comparison = CheckpointFiles.Compare(a, b);
        Console.WriteLine(comparison.Identical ? $"identical: {comparison.Tensors} tensors, byte for byte" : $"different: {comparison.Difference}");
        return comparison.Identical ? 0 : 4;
    }

    static int ShowCheckpoint(string directory)
    {
        var bad = CheckpointFiles.Verify(directory);
        if (bad.Count > 0)
        {
            Console.Error.WriteLine($"error: checkpoint '{directory}' is corrupt: {string.Join("; ", bad)}");
            return 3;
        }
        var manifest = CheckpointFiles.ReadManifest(directory);
        using var checkpoint = CheckpointFiles.Load(directory);
        Console.WriteLine($"checkpoint {directory} (step {manifest.Step}, generation {manifest.Generation}, layout {manifest.Layout}, {manifest.Shards.Length} shards, verified)");
        foreach (var shard in manifest.Shards) Console.WriteLine($"  {shard.File,-32} {shard.Bytes,12:N0} bytes  sha256 {shard.Sha256}");
        foreach (var (key, value) in checkpoint.Metadata.OrderBy(p => p.Key, StringComparer.Ordinal))
            Console.WriteLine($"{key,-16} {(key switch
            {
                CheckpointVocabulary.Key => System.Text.Json.JsonSerializer.Serialize(CheckpointVocabulary.Read(checkpoint).Vocabulary),
                CheckpointVocabulary.LegacyKey => System.Text.Json.JsonSerializer.Serialize(value),
                _ => value,
            })}");
        long total = 0;
        // From the headers alone: listing a state needs none of its bytes in memory. Global tensors, with the pieces that hold them.
        foreach (var (name, stored) in checkpoint.Stored)
        {
            total += stored.Elements;
            string pieces = stored.Pieces is [{ Slice.IsWhole: true }] ? "whole"
                : $"{stored.Pieces.Count} pieces: {string.Join("; ", stored.Pieces.Select(p => $"{p.Slice} in {Path.GetFileName(p.File)}"))}";
            Console.WriteLine($"  {name,-48} {stored.DType,-8} {$"[{string.Join(", ", stored.Shape)}]",-14} {pieces}");
        }
        Console.WriteLine($"{checkpoint.Stored.Count} tensors, {total:N0} elements");
        return 0;
    }
}
