using System.Diagnostics;
using System.Text;
using Distributed.Cluster;
using Distributed.Training.Checkpoints;
using Distributed.Training.Data;

namespace Distributed.Tests;

/// <summary>
/// Nothing lost: a corpus outside the BMP trains, resumes and samples; an error no restart can fix ends the job at
/// once; a full disk fails its checkpoint and keeps the previous commit. Real processes, real SQLite journals.
/// </summary>
public class LosslessTests(Xunit.Abstractions.ITestOutputHelper output)
{
    static string Config => Path.Combine(TestSupport.RepoRoot, "cluster-config", "shakespeare-char.conf");

    /// <summary>Tiny Shakespeare's start with emoji, CJK extension B and BMP characters above the surrogates mixed in.</summary>
    static string NonBmpCorpus(string dir)
    {
        string text = File.ReadAllText(TestSupport.Corpus)[..20_000]
            .Replace("Citizen", "Citizen😀").Replace("love", "l𠀀ve").Replace("!", "🎭！").Replace("the ", "the 你好 ");
        string path = Path.Combine(dir, "non-bmp.txt");
        File.WriteAllText(path, text, new UTF8Encoding(false));
        return path;
    }

    static string[] SingleProcessArgs(string runDir, string corpus, params string[] more)
    {
        var args = new List<string> { "train", "--workers", "0", "--config", Config };
        foreach (var kv in TestSupport.TinyJobOverrides(runDir).Append($"data.path={corpus}")) { args.Add("--set"); args.Add(kv); }
        return [.. args, .. more];
    }

    static void AssertSucceeded((int ExitCode, string Stdout, string Stderr) run) =>
        Assert.True(run.ExitCode == 0, $"exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");

    static string Checkpoint(string runDir, long step) => Path.Combine(runDir, "checkpoints", CheckpointFiles.DirectoryName(step));

    [Fact]
    public void ANonBmpCorpusTrainsStopsResumesAndSamplesBitIdenticalToAnUninterruptedRun()
    {
        string dir = TestSupport.TempDir("non-bmp");
        string corpus = NonBmpCorpus(dir);
        string straight = Path.Combine(dir, "straight"), interrupted = Path.Combine(dir, "interrupted");
        AssertSucceeded(TestSupport.RunCli(dir, SingleProcessArgs(straight, corpus)));
        AssertSucceeded(TestSupport.RunCli(dir, SingleProcessArgs(interrupted, corpus, "--stop-at", "10")));
        Assert.False(Directory.Exists(Checkpoint(interrupted, 20)), "the run did not stop at step 10");
        AssertSucceeded(TestSupport.RunCli(dir, SingleProcessArgs(interrupted, corpus, "--resume")));

        // The checkpoint holds the corpus's vocabulary, code point for code point.
        var expected = CharTokenizer.FromCorpus(File.ReadAllText(corpus));
        using (var loaded = CheckpointFiles.Load(Checkpoint(interrupted, 20)))
        {
            var stored = CheckpointVocabulary.Read(loaded);
            Assert.Equal(expected.Symbols, stored.Symbols);
            Assert.Contains(new Rune(0x1F600), stored.Symbols);
            Assert.Contains(new Rune(0x20000), stored.Symbols);
        }
        var comparison = CheckpointFiles.Compare(Checkpoint(straight, 20), Checkpoint(interrupted, 20));
        Assert.True(comparison.Identical, comparison.Difference);
        static string[] Losses(string runDir) => File.ReadAllLines(Path.Combine(runDir, "metrics.jsonl"))
            .Select(l => System.Text.Json.JsonDocument.Parse(l).RootElement.GetProperty("loss").GetRawText()).ToArray();
        Assert.Equal(Losses(straight), Losses(interrupted));

        // Sampling: a prompt outside the BMP encodes, and what comes out is whole characters of the vocabulary.
        string[] sample = ["sample", "--prompt", "Citizen😀 l𠀀ve", "--tokens", "200", "--temperature", "1", "--seed", "3", "--checkpoint"];
        var fromResumed = TestSupport.RunCli(dir, [.. sample, Checkpoint(interrupted, 20)]);
        AssertSucceeded(fromResumed);
        string text = fromResumed.Stdout.TrimEnd('\n');
        Assert.StartsWith("Citizen😀 l𠀀ve", text);
        Assert.Equal(text, expected.Decode(expected.Encode(text)));   // no U+FFFD, no halves: every rune is in the vocabulary
        Assert.Equal(fromResumed.Stdout, TestSupport.RunCli(dir, [.. sample, Checkpoint(straight, 20)]).Stdout);
    }

    [Fact]
    public async Task ADeterministicErrorOnTheWorkersFailsTheJobOnceWithoutRestarts()
    {
        string dir = TestSupport.TempDir("deterministic");
        AssertSucceeded(TestSupport.RunCli(dir, SingleProcessArgs(dir, TestSupport.Corpus, "--set", "train.max-iters=2")));
        // Resumed on a corpus with a character the checkpoint's vocabulary lacks: every attempt would fail the same way.
        string corpus = Path.Combine(dir, "other.txt");
        File.WriteAllText(corpus, File.ReadAllText(TestSupport.Corpus)[..5_000] + "😀\n");
        var clock = Stopwatch.StartNew();
        var run = TestSupport.RunCli(dir, [.. TestSupport.TrainArgs(dir, 2, [$"data.path={corpus}", "train.max-iters=4", "recovery.max-restarts=3"], resume: true)]);
        output.WriteLine($"failed in {clock.Elapsed.TotalSeconds:F1} s\n{run.Stderr}");
        Assert.NotEqual(0, run.ExitCode);
        Assert.Matches(@"error: the job failed: rank \d .*the character '😀' \(U\+1F600\) is not in the model's vocabulary .*not retried", run.Stderr);
        Assert.DoesNotContain("   at ", run.Stderr);

        var journal = await FaultTests.ReadJournal(dir);
        Assert.Single(journal, e => e is GenerationStarted);   // failed once: no second generation
        Assert.Contains(journal, e => e is JobEnded { Completed: false } end && end.Reason.Contains("not retried"));
        Assert.DoesNotContain("Restart 1 of 3", FaultTests.CoordinatorLogs(dir));
    }

    [Fact]
    public async Task CommitsDeletedByRetentionLeaveTheJournalAndAreNeverReportedAsCorrupt()
    {
        string dir = TestSupport.TempDir("retired");
        string[] job = ["train.max-iters=30", "optimizer.lr-decay-iters=30", "checkpoint.keep=1"];
        AssertSucceeded(TestSupport.RunCli(dir, TestSupport.TrainArgs(dir, 2, job)));
        var journal = await FaultTests.ReadJournal(dir);
        Assert.Equal([10L, 20L], journal.OfType<CheckpointsRetired>().SelectMany(r => r.Steps));
        Assert.Equal([30L], journal.Aggregate(JobState.Empty, (s, e) => s.Apply(e)).CommitsNewestFirst().Select(c => c.Step));
        Assert.Equal([CheckpointFiles.DirectoryName(30)], Directory.GetDirectories(Path.Combine(dir, "checkpoints")).Select(Path.GetFileName));

        // The one kept commit damaged: resuming names it as corrupt, and not the retired ones whose files retention deleted.
        string shard = Path.Combine(Checkpoint(dir, 30), CheckpointFiles.ShardName(0, 2));
        var bytes = File.ReadAllBytes(shard);
        bytes[^3] ^= 0x01;
        File.WriteAllBytes(shard, bytes);
        AssertSucceeded(TestSupport.RunCli(dir, TestSupport.TrainArgs(dir, 2, job, resume: true)));
        string logs = FaultTests.CoordinatorLogs(dir);
        Assert.Contains("Checkpoint at step 30 is corrupt", logs);
        Assert.DoesNotContain("Checkpoint at step 20 is corrupt", logs);
        Assert.DoesNotContain("Checkpoint at step 10 is corrupt", logs);
        Assert.Empty(CheckpointFiles.Verify(Checkpoint(dir, 30)));   // trained again from scratch and committed
    }

    [TmpfsFact]
    public async Task AFullDiskFailsThatCheckpointKeepsThePreviousCommitAndStopsTheJobWithTheReason()
    {
        string dir = TestSupport.TempDir("disk-full");
        string checkpoints = Path.Combine(dir, "checkpoints");
        // One commit of the tiny job on two workers is about 340 kB: room for the first, not for the second.
        TmpfsFactAttribute.Mount(checkpoints, "480k");
        try
        {
            string[] job = ["train.max-iters=30", "optimizer.lr-decay-iters=30", "checkpoint.keep=3"];
            var run = TestSupport.RunCli(dir, TestSupport.TrainArgs(dir, 2, job));
            output.WriteLine(run.Stderr);
            Assert.NotEqual(0, run.ExitCode);
            Assert.Matches(@"error: the job failed: rank \d .*the checkpoint at step 20 failed on rank \d: the disk is full \(ENOSPC: no space left on device\) writing '[^']+shard-\d-of-2\.safetensors\.tmp'; the previous commit stays \(.*not retried\)", run.Stderr);

            // Nothing half-written is visible: the journal knows step 10 only and it verifies, no partial file is left, step 20 has no manifest.
            // (Step 10's manifest may be missing: it is written behind the commit, and may have met the full disk; it follows the journal.)
            var journal = await FaultTests.ReadJournal(dir);
            var committed = Assert.Single(journal.OfType<CheckpointCommitted>());
            Assert.Equal(10, committed.Step);
            Assert.Empty(CheckpointFiles.Verify(Checkpoint(dir, 10), committed.Shards));
            Assert.Single(journal, e => e is GenerationStarted);
            Assert.Contains(journal, e => e is JobEnded { Completed: false });
            Assert.Empty(Directory.GetFiles(checkpoints, "*.tmp", SearchOption.AllDirectories));
            Assert.False(File.Exists(Path.Combine(Checkpoint(dir, 20), CheckpointFiles.ManifestName)));
            Assert.False(Directory.Exists(Checkpoint(dir, 30)), "the job went on after its checkpoint failed");

            // Room made: --resume goes on from the previous commit and completes.
            var remount = TestProcesses.Run("mount", ["-o", "remount,size=4m", checkpoints], TimeSpan.FromSeconds(30));
            Assert.True(remount.ExitCode == 0, remount.Output);
            AssertSucceeded(TestSupport.RunCli(dir, TestSupport.TrainArgs(dir, 2, job, resume: true)));
            journal = await FaultTests.ReadJournal(dir);
            Assert.Equal(10, journal.OfType<GenerationStarted>().Last().ResumeStep);
            Assert.Equal([30L, 20L, 10L], CheckpointFiles.List(checkpoints).Select(c => c.Step));
            Assert.Empty(CheckpointFiles.Verify(Checkpoint(dir, 30)));
        }
        finally
        {
            TmpfsFactAttribute.Unmount(checkpoints);
        }
    }
}

/// <summary>A test that mounts a small tmpfs (root, and a kernel that lets this process mount); skipped with the reason otherwise.</summary>
public sealed class TmpfsFactAttribute : FactAttribute
{
    static readonly Lazy<string?> CannotMount = new(() =>
    {
        string probe = TestSupport.TempDir("tmpfs-probe");
        try
        {
            Mount(probe, "64k");
            Unmount(probe);
            return null;
        }
        catch (Exception e) when (e is InvalidOperationException or System.ComponentModel.Win32Exception)
        {
            return $"cannot mount a tmpfs here (needs root and mount permission): {e.Message}";
        }
    });

    public TmpfsFactAttribute()
    {
        if (!OperatingSystem.IsLinux()) Skip = "tmpfs is Linux's";
        else if (CannotMount.Value is { } reason) Skip = reason;
    }

    public static void Mount(string directory, string size)
    {
        Directory.CreateDirectory(directory);
        var result = TestProcesses.Run("mount", ["-t", "tmpfs", "-o", $"size={size}", "tmpfs", directory], TimeSpan.FromSeconds(30));
        if (result.ExitCode != 0) throw new InvalidOperationException($"mount -t tmpfs exited {result.ExitCode}: {result.Output.Trim()}");
    }

    public static void Unmount(string directory) => TestProcesses.Run("umount", ["-l", directory], TimeSpan.FromSeconds(30));
}
