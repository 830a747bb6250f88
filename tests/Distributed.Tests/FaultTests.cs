using System.Diagnostics;
using Distributed.Cluster;
using Distributed.Cluster.Config;
using Distributed.Training.Checkpoints;

namespace Distributed.Tests;

/// <summary>The uninterrupted run every faulted run must equal: the same job on the same number of workers.</summary>
public sealed class UninterruptedRun
{
    public const int Workers = 2;
    public static readonly string[] Job = ["train.max-iters=40", "train.eval-interval=20", "optimizer.lr-decay-iters=40", "checkpoint.every=10", "checkpoint.keep=3"];

    public UninterruptedRun()
    {
        Dir = TestSupport.TempDir("uninterrupted");
        var run = TestSupport.RunCli(Dir, TestSupport.TrainArgs(Dir, Workers, Job));
        Assert.True(run.ExitCode == 0, $"exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
    }

    public string Dir { get; }
}

/// <summary>
/// Real faults on real processes (SIGKILL, cut connections, flipped bytes on disk): the job completes, its final
/// weights and optimizer state are byte for byte those of the uninterrupted run, and the journal shows that every
/// new generation started from the newest commit that was intact.
/// </summary>
public partial class FaultTests(UninterruptedRun reference, Xunit.Abstractions.ITestOutputHelper output) : IClassFixture<UninterruptedRun>
{
    const int SigTerm = 15;

    [System.Runtime.InteropServices.LibraryImport("libc", EntryPoint = "kill")]
    private static partial int Kill(int pid, int signal);

    [Theory]
    [InlineData("kill-worker:1@15")]
    [InlineData("kill-worker:0@25")]
    [InlineData("kill-coordinator@15")]
    [InlineData("drop-link:0-1@15")]
    [InlineData("delay-link:1-0:5")]
    [InlineData("corrupt-shard:0@20")]
    [InlineData("kill-during-checkpoint:1@20")]
    public async Task TheJobSurvivesTheFaultAndEndsBitIdentical(string fault)
    {
        string dir = TestSupport.TempDir("fault");
        var run = TestSupport.RunCli(dir, [.. TestSupport.TrainArgs(dir, UninterruptedRun.Workers, UninterruptedRun.Job), "--fault", fault]);
        Assert.True(run.ExitCode == 0, $"exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        AssertSameFinalState(dir);

        var journal = await ReadJournal(dir);
        Assert.Contains(journal, e => e is FaultInjected f && f.Fault == fault);
        if (fault.StartsWith("kill-coordinator", StringComparison.Ordinal))
        {
            // The restarted coordinator took the running generation over: no second generation, no step redone.
            Assert.Contains(journal, e => e is GenerationAdopted { Generation: 1 });
            Assert.DoesNotContain(journal, e => e is GenerationStarted { Generation: 2 });
            AssertNoStepRedone(dir);
        }
        else if (!fault.StartsWith("delay-link", StringComparison.Ordinal))
            Assert.Contains(journal, e => e is GenerationStarted { Generation: 2 });
        string? corrupted = fault.StartsWith("corrupt-shard", StringComparison.Ordinal) ? fault : null;
        AssertEveryGenerationResumedFromTheNewestIntactCommit(journal, corrupted);
        if (corrupted is not null)
            Assert.Contains("Checkpoint at step 20 is corrupt: '", CoordinatorLogs(dir));   // names the file and both hashes

        var inspect = TestSupport.RunCli(dir, "inspect", dir);
        Assert.True(inspect.ExitCode == 0, inspect.Stderr + inspect.Stdout);
        Assert.Contains("journal (sqlite", inspect.Stdout);
        Assert.Contains($"fault injected: {fault}", inspect.Stdout);
        Assert.Contains("job completed at step 40", inspect.Stdout);
        Assert.Matches(@"step +40 +verified", inspect.Stdout);
    }

    [Fact]
    public void AJobUnderMutualTlsEndsBitIdenticalToTheSameJobInTheClear()
    {
        // Akka remoting and every data-plane connection under mutual TLS, the bulk bytes over raw TCP (encrypted).
        string dir = TestSupport.TempDir("tls");
        var run = TestSupport.RunCli(dir, TestSupport.TrainArgs(dir, UninterruptedRun.Workers, [.. UninterruptedRun.Job, "security.mode=tls", "cluster.transport=tcp"]));
        Assert.True(run.ExitCode == 0, $"exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        Assert.Contains("akka.ssl.tcp://", run.Stdout + run.Stderr);
        Assert.True(File.Exists(Path.Combine(dir, "certs", "ca.crt")), "the simulation made no CA of its own");
        var workerLogs = Directory.GetFiles(Path.Combine(dir, "logs"), "worker-*.log").Select(File.ReadAllText).ToArray();
        Assert.All(workerLogs, log => Assert.Contains("data plane https://", log));
        AssertSameFinalState(dir);
    }

    [PostgresFact]
    public async Task ACoordinatorKilledMidJobRecoversItsJournalFromPostgreSQL()
    {
        string dir = TestSupport.TempDir("postgres");
        string[] job = [.. UninterruptedRun.Job, "persistence.provider=postgresql", "persistence.snapshot-every=2"];
        var run = TestSupport.RunCli(dir, [.. TestSupport.TrainArgs(dir, UninterruptedRun.Workers, job), "--fault", "kill-coordinator@15"]);
        Assert.True(run.ExitCode == 0, $"exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        AssertSameFinalState(dir);
        var journal = await ReadJournal(dir);
        Assert.Contains(journal, e => e is FaultInjected { Fault: "kill-coordinator@15" });
        AssertEveryGenerationResumedFromTheNewestIntactCommit(journal, null);
        var inspect = TestSupport.RunCli(dir, "inspect", dir);
        Assert.True(inspect.ExitCode == 0, inspect.Stderr + inspect.Stdout);
        Assert.Contains("journal (postgresql", inspect.Stdout);
        Assert.Contains("fault injected: kill-coordinator@15", inspect.Stdout);
    }

    [Fact]
    public async Task AStoppedJobResumedFromItsRunDirectoryEndsBitIdentical()
    {
        if (!OperatingSystem.IsLinux()) return;
        string dir = TestSupport.TempDir("stop-resume");
        // A slow link (it changes no number) stretches the run so that it can be stopped half way.
        var (launcher, _, _) = await StartTrainingAsync(dir, UninterruptedRun.Workers, UninterruptedRun.Job, steps: 10, "--fault", "delay-link:0-1:200");
        using (launcher)
        {
            Assert.Equal(0, Kill(launcher.Id, SigTerm));
            Assert.True(launcher.WaitForExit(TimeSpan.FromSeconds(15)), "the launcher ignored SIGTERM");
        }
        Assert.False(File.Exists(Path.Combine(dir, "checkpoints", CheckpointFiles.DirectoryName(40), CheckpointFiles.ManifestName)), "the job was not stopped half way");
        // The run directory holds the job: --resume needs no --config.
        var resumed = TestSupport.RunCli(dir, "train", "--resume", dir);
        Assert.True(resumed.ExitCode == 0, $"exit {resumed.ExitCode}\n{resumed.Stderr}\n{resumed.Stdout}");
        AssertSameFinalState(dir);
        var journal = await ReadJournal(dir);
        Assert.Equal(2, journal.Count(e => e is JobSubmitted));
        AssertEveryGenerationResumedFromTheNewestIntactCommit(journal, null);

        // A committed checkpoint damaged afterwards: inspect names the file and both hashes.
        string shard = Path.Combine(dir, "checkpoints", CheckpointFiles.DirectoryName(40), CheckpointFiles.ShardName(1, 2));
        var bytes = File.ReadAllBytes(shard);
        bytes[^5] ^= 0x01;
        File.WriteAllBytes(shard, bytes);
        var inspect = TestSupport.RunCli(dir, "inspect", dir);
        Assert.Equal(3, inspect.ExitCode);
        Assert.Matches(@"step +40 +CORRUPT", inspect.Stdout);
        Assert.Contains($"'{shard}' has SHA-256 {CheckpointFiles.Sha256Of(shard)}, recorded ", inspect.Stdout);
    }

    [Fact]
    public async Task AWorkerKilledFromOutsideIsReplacedAndTheJobEndsBitIdentical()
    {
        if (!OperatingSystem.IsLinux()) return;
        string dir = TestSupport.TempDir("external-kill");
        var (launcher, output, _) = await StartTrainingAsync(dir, UninterruptedRun.Workers, UninterruptedRun.Job.Append("train.max-iters=200").Append("optimizer.lr-decay-iters=200"), steps: 60);
        using var _ = launcher;
        var workers = WorkerPids(launcher.Id);
        using (var victim = Process.GetProcessById(workers[1])) victim.Kill();   // SIGKILL, at whatever step it is on
        Assert.True(launcher.WaitForExit(TimeSpan.FromSeconds(120)), "the job did not finish after a worker was killed");
        Assert.True(launcher.ExitCode == 0, await output);
        Assert.Contains($"worker pid {workers[1]} was killed by signal 9", await output);
        var journal = await ReadJournal(dir);
        Assert.Contains(journal, e => e is GenerationAborted);
        AssertEveryGenerationResumedFromTheNewestIntactCommit(journal, null);
    }

    [Fact]
    public async Task WithoutRestartsLeftTheJobFailsNamingTheLostWorker()
    {
        string dir = TestSupport.TempDir("no-restarts");
        var run = TestSupport.RunCli(dir, [.. TestSupport.TrainArgs(dir, 2, UninterruptedRun.Job.Append("recovery.max-restarts=0")), "--fault", "kill-worker:1@15"]);
        Assert.NotEqual(0, run.ExitCode);
        // The launcher seeing the process die or rank 0's broken collective: whichever reaches the coordinator first names rank 1.
        Assert.Matches(@"error: the job failed: rank 1 \(worker pid \d+ on 127\.0\.0\.1\) .*; giving up after 0 restarts \(recovery\.max-restarts\)", run.Stderr);
        Assert.DoesNotContain("   at ", run.Stderr);
        var journal = await ReadJournal(dir);
        Assert.Contains(journal, e => e is JobEnded { Completed: false });
    }

    [Fact]
    public async Task SigtermStopsTheLauncherAndEveryChild()
    {
        if (!OperatingSystem.IsLinux()) return;
        var (launcher, _, children) = await StartTrainingAsync(TestSupport.TempDir("sigterm"), 2, ["train.max-iters=100000"], steps: 5);
        using (launcher)
        {
            Assert.Equal(3, children.Length);   // the coordinator and two workers
            Assert.Equal(0, Kill(launcher.Id, SigTerm));
            Assert.True(launcher.WaitForExit(TimeSpan.FromSeconds(15)), "the launcher ignored SIGTERM");
            Assert.NotEqual(0, launcher.ExitCode);
            await AssertAllGone(children);
        }
    }

    void AssertSameFinalState(string dir)
    {
        string step = CheckpointFiles.DirectoryName(40);
        using var expected = CheckpointFiles.Load(Path.Combine(reference.Dir, "checkpoints", step));
        using var actual = CheckpointFiles.Load(Path.Combine(dir, "checkpoints", step));
        Assert.Equal(expected.Tensors.Keys.Order(), actual.Tensors.Keys.Order());
        foreach (var (name, tensor) in expected.Tensors)
            Assert.True(tensor.bytes.SequenceEqual(actual.Tensors[name].bytes), $"tensor {name} differs from the uninterrupted run");
    }

    /// <summary>Each generation after the first resumed from the newest commit before it (skipping a corrupted one): no committed step was lost.</summary>
    static void AssertEveryGenerationResumedFromTheNewestIntactCommit(IReadOnlyList<object> journal, string? corruptFault)
    {
        long corruptStep = corruptFault is null ? -1 : long.Parse(corruptFault[(corruptFault.IndexOf('@') + 1)..]);
        var committed = new List<long>();
        foreach (var e in journal)
        {
            if (e is CheckpointCommitted c) committed.Add(c.Step);
            if (e is GenerationStarted { Generation: > 1 } g)
            {
                long newest = committed.Where(s => s != corruptStep).DefaultIfEmpty(0).Max();
                Assert.True(g.ResumeStep == newest, $"generation {g.Generation} resumed from step {g.ResumeStep}, the newest intact commit was {newest}");
            }
        }
        Assert.Contains(journal, e => e is JobEnded { Completed: true });
    }

    internal static async Task<IReadOnlyList<object>> ReadJournal(string dir)
    {
        var spec = JobConfigLoader.Load(Path.Combine(dir, "job.conf"));
        return (await JournalReader.ReadAsync(spec, TimeSpan.FromSeconds(30))).Select(e => e.Event).ToList();
    }

    /// <summary>Every step of metrics.jsonl appears once: no generation went back to redo steps.</summary>
    static void AssertNoStepRedone(string dir)
    {
        var steps = File.ReadLines(Path.Combine(dir, "metrics.jsonl"))
            .Select(l => System.Text.Json.JsonDocument.Parse(l).RootElement.GetProperty("step").GetInt64()).ToList();
        var redone = steps.GroupBy(s => s).Where(g => g.Count() > 1).Select(g => g.Key).ToList();
        Assert.True(redone.Count == 0, $"steps trained twice: {string.Join(", ", redone)}");
        Assert.Equal(steps.Max(), steps.Count);
    }

    internal static string CoordinatorLogs(string dir) =>
        string.Concat(Directory.GetFiles(Path.Combine(dir, "logs"), "coordinator-*.log").Select(File.ReadAllText));

    static int[] ChildrenOf(int pid) =>
        Directory.GetDirectories($"/proc/{pid}/task")
            .SelectMany(task => File.ReadAllText(Path.Combine(task, "children")).Split(' ', StringSplitOptions.RemoveEmptyEntries)).Select(int.Parse).ToArray();

    static int[] WorkerPids(int launcher) =>
        ChildrenOf(launcher).Where(p => File.ReadAllText($"/proc/{p}/cmdline").Split('\0').Contains("worker")).ToArray();

    /// <summary>Starts `dtrain train --workers N` and waits until it has trained <paramref name="steps"/> steps.</summary>
    /// <returns>the launcher, all it prints (stdout and stderr), and its children</returns>
    static async Task<(Process Launcher, Task<string> Output, int[] Children)> StartTrainingAsync(string dir, int workers, IEnumerable<string> job, int steps,
        params string[] more)
    {
        var info = new ProcessStartInfo("dotnet") { WorkingDirectory = dir, RedirectStandardOutput = true, RedirectStandardError = true };
        info.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "dtrain.dll"));
        foreach (var a in TestSupport.TrainArgs(dir, workers, job.Append("cluster.collective-timeout=5")).Concat(more)) info.ArgumentList.Add(a);
        info.Environment["CI"] = "true";
        var launcher = Process.Start(info)!;
        var stderr = launcher.StandardError.ReadToEndAsync();
        var stdout = launcher.StandardOutput.ReadToEndAsync();
        var output = Task.WhenAll(stdout, stderr).ContinueWith(_ => stdout.Result + stderr.Result);
        string metrics = Path.Combine(dir, "metrics.jsonl");
        var waiting = Stopwatch.StartNew();
        while (!File.Exists(metrics) || File.ReadAllLines(metrics).Length < steps)
        {
            if (waiting.Elapsed > TimeSpan.FromSeconds(120)) { launcher.Kill(entireProcessTree: true); Assert.Fail("training did not start"); }
            if (launcher.HasExited) Assert.Fail("launcher exited early: " + await output);
            await Task.Delay(50);
        }
        return (launcher, output, ChildrenOf(launcher.Id));
    }

    static async Task AssertAllGone(int[] pids)
    {
        var deadline = Stopwatch.StartNew();
        bool Alive(int p) => Directory.Exists($"/proc/{p}") && !File.ReadAllText($"/proc/{p}/stat").Contains(") Z ");
        while (pids.Any(Alive) && deadline.Elapsed < TimeSpan.FromSeconds(10)) await Task.Delay(100);
        Assert.DoesNotContain(pids, Alive);
    }
}
