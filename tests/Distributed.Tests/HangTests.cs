using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text.RegularExpressions;
using Distributed.Cluster;
using Distributed.Cluster.Config;
using Distributed.Core;
using Distributed.Training.Checkpoints;

namespace Distributed.Tests;

/// <summary>
/// Nothing hangs: each test provokes a wait that once had no end (a worker that never registers, a resume-point
/// choice that throws, a stalled state broadcast, a slow cancellation, a silent coordinator) on real processes over
/// real Akka TCP with the real SQLite journal, and the job fails or recovers within its deadline, set small through
/// config, with a message naming what it waited for.
/// </summary>
public partial class HangTests(Xunit.Abstractions.ITestOutputHelper output)
{
    const int SigKill = 9, SigStop = 19, SigCont = 18;

    [LibraryImport("libc", EntryPoint = "kill")]
    private static partial int Kill(int pid, int signal);

    [Fact]
    public async Task AWorkerThatNeverRegistersFailsTheJobAtTheWorkerWaitDeadline()
    {
        string dir = TestSupport.TempDir("hang-worker-wait");
        int port = FreePort();
        // The coordinator waits for two workers; only one is ever started.
        using var coordinator = StartCli(dir, ["coordinator", "--config", Config, .. Sets(dir, "recovery.worker-wait-timeout=5"),
            "--workers", "2", "--port", $"{port}", "--host", "127.0.0.1"]);
        using var worker = StartCli(dir, ["worker", "--seed", $"127.0.0.1:{port}", "--host", "127.0.0.1"]);
        var clock = Stopwatch.StartNew();
        Assert.True(coordinator.Process.WaitForExit(TimeSpan.FromSeconds(60)), "the coordinator kept waiting for its workers");
        string text = await coordinator.Output;
        output.WriteLine($"coordinator exited after {clock.Elapsed.TotalSeconds:F1} s");
        Assert.True(coordinator.Process.ExitCode == ExitCodes.JobFailed, $"exit {coordinator.Process.ExitCode}\n{text}");
        var waited = Regex.Match(text, @"Job failed: waited ([\d.]+) s \(recovery\.worker-wait-timeout = 5 s\) for 2 workers to register: 1 did \(pid (\d+) on 127\.0\.0\.1\)");
        Assert.True(waited.Success, text);
        Assert.Equal(worker.Process.Id, int.Parse(waited.Groups[2].Value));
        Assert.InRange(double.Parse(waited.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture), 5, 8);
        // The worker that did register is told the job is over.
        Assert.True(worker.Process.WaitForExit(TimeSpan.FromSeconds(20)), "the registered worker was not shut down");
        Assert.Equal(ExitCodes.JobFailed, worker.Process.ExitCode);
        var journal = await ReadJournal(dir);
        Assert.Contains(journal, e => e is JobEnded { Completed: false } ended && ended.Reason.Contains("recovery.worker-wait-timeout"));
    }

    [Fact]
    public void AResumePointChoiceThatThrowsFailsTheJobNamingTheCause()
    {
        string dir = TestSupport.TempDir("hang-resume-choice");
        // A committed-looking checkpoint whose manifest lacks its shards: reading it throws neither an I/O nor a checkpoint error.
        string checkpoint = Path.Combine(dir, "checkpoints", CheckpointFiles.DirectoryName(10));
        Directory.CreateDirectory(checkpoint);
        File.WriteAllText(Path.Combine(checkpoint, CheckpointFiles.ManifestName), """{"Format":"distributed-gpt-checkpoint/1","Step":10,"Generation":1,"Job":""}""");
        var clock = Stopwatch.StartNew();
        var run = TestSupport.RunCli(dir, TestSupport.TrainArgs(dir, 2, ["recovery.worker-wait-timeout=30", "recovery.generation-start-timeout=30"], resume: true));
        output.WriteLine($"the job failed after {clock.Elapsed.TotalSeconds:F1} s: {run.Stderr}");
        Assert.True(run.ExitCode != 0, run.Stdout + run.Stderr);
        Assert.Contains($"error: the job failed: choosing the checkpoint to resume from (in {Path.Combine(dir, "checkpoints")}) failed: ", run.Stderr);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"took {clock.Elapsed.TotalSeconds:F0} s");
    }

    /// <summary>
    /// Rank 0 stalls before the initial state broadcast, so rank 1 waits inside it (in the Trainer's constructor) for
    /// data that never comes. The per-chunk collective deadline is long (60 s): only the generation-start deadline (10 s)
    /// and an abort that cancels the broadcast let the job go on, and generation 2 starts well before 60 s.
    /// </summary>
    [Fact]
    public async Task AStalledStateBroadcastIsAbortedAtTheGenerationStartDeadlineAndTheJobRecovers()
    {
        string dir = TestSupport.TempDir("hang-broadcast");
        var clock = Stopwatch.StartNew();
        var run = TestSupport.RunCli(dir, [.. TestSupport.TrainArgs(dir, 2,
            ["cluster.collective-timeout=60", "recovery.generation-start-timeout=10", "recovery.worker-wait-timeout=20"]), "--fault", "stall-start:0"]);
        output.WriteLine($"the job ended after {clock.Elapsed.TotalSeconds:F1} s");
        Assert.True(run.ExitCode == 0, $"exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        var journal = await ReadJournal(dir);
        Assert.Contains(journal, e => e is FaultInjected { Fault: "stall-start:0" });
        var aborted = journal.OfType<GenerationAborted>().Single();
        output.WriteLine($"journal: {aborted.Reason}");
        Assert.Matches(@"^generation 1 did not start within 10 s \(recovery\.generation-start-timeout\): rank 0 \(worker pid \d+ on 127\.0\.0\.1\), rank 1 \(.*\) did not report", aborted.Reason);
        var second = journal.OfType<GenerationStarted>().Single(g => g.Generation == 2);
        var recovery = second.At - aborted.At;
        output.WriteLine($"generation 2 started {recovery.TotalSeconds:F1} s after the abort");
        Assert.True(recovery < TimeSpan.FromSeconds(30), $"generation 2 started {recovery.TotalSeconds:F0} s after the abort: the broadcast was not cancelled");
        Assert.Contains(journal, e => e is JobEnded { Completed: true });
    }

    /// <summary>
    /// Rank 0's generation token carries a callback that blocks for 60 s (a slow close). Rank 1 stalls its start, so
    /// the generation is aborted (generation-start deadline, 8 s) while rank 0's training thread still runs: rank 0's
    /// actor cancels without running that callback itself, registers again at once, and generation 2 forms within the
    /// worker-wait deadline (20 s). Run on the actor's thread (Cancel()), the callback would hold the worker for 60 s
    /// and the job would fail waiting for it.
    /// </summary>
    [Fact]
    public async Task ASlowCancellationCallbackDoesNotStallTheWorkerAndTheJobRecovers()
    {
        string dir = TestSupport.TempDir("hang-slow-abort");
        var clock = Stopwatch.StartNew();
        var run = TestSupport.RunCli(dir, [.. TestSupport.TrainArgs(dir, 2,
            ["cluster.collective-timeout=60", "recovery.generation-start-timeout=8", "recovery.worker-wait-timeout=20"]),
            "--fault", "slow-abort:0:60000", "--fault", "stall-start:1"]);
        output.WriteLine($"the job ended after {clock.Elapsed.TotalSeconds:F1} s");
        Assert.True(run.ExitCode == 0, $"exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
        var journal = await ReadJournal(dir);
        Assert.Contains(journal, e => e is FaultInjected { Fault: "slow-abort:0:60000" });
        var aborted = journal.OfType<GenerationAborted>().Single();
        output.WriteLine($"journal: {aborted.Reason}");
        Assert.StartsWith("generation 1 did not start within 8 s (recovery.generation-start-timeout)", aborted.Reason);
        var second = journal.OfType<GenerationStarted>().Single(g => g.Generation == 2);
        output.WriteLine($"generation 2 started {(second.At - aborted.At).TotalSeconds:F1} s after the abort");
        Assert.True(second.At - aborted.At < TimeSpan.FromSeconds(20), $"generation 2 started {(second.At - aborted.At).TotalSeconds:F0} s after the abort");
        Assert.Contains(journal, e => e is JobEnded { Completed: true });
        Assert.Contains("slow-abort:0:60000: a callback of the aborted generation's token blocks for 60000 ms", WorkerLogs(dir));
    }

    /// <summary>
    /// After the first generation started, the coordinator freezes (SIGSTOP) and a worker dies: no one will start
    /// generation 2 or fail the job. The launcher's own deadline, armed again by the loss, ends the job naming the wait.
    /// </summary>
    [Fact]
    public async Task TheLauncherFailsTheJobWhenNoGenerationFollowsALossAndTheCoordinatorIsSilent()
    {
        if (!OperatingSystem.IsLinux()) return;
        string dir = TestSupport.TempDir("hang-launcher");
        string[] job = ["train.max-iters=100000", "optimizer.lr-decay-iters=100000", "checkpoint.every=1000",
            "recovery.worker-wait-timeout=8", "recovery.generation-start-timeout=8", "cluster.collective-timeout=5"];
        using var launcher = StartCli(dir, TestSupport.TrainArgs(dir, 2, job));
        var started = Stopwatch.StartNew();
        string metrics = Path.Combine(dir, "metrics.jsonl");
        while (!File.Exists(metrics) || File.ReadAllLines(metrics).Length < 3)
        {
            if (launcher.Process.HasExited) Assert.Fail("the launcher exited early: " + await launcher.Output);
            Assert.True(started.Elapsed < TimeSpan.FromSeconds(120), "training did not start");
            await Task.Delay(100);
        }
        var children = ChildrenOf(launcher.Process.Id);
        int coordinator = children.Single(p => Arguments(p).Contains("coordinator"));
        int worker = children.First(p => Arguments(p).Contains("worker"));
        var deadline = Cli.ClusterJob.StartDeadline(JobConfigLoader.Load(Path.Combine(dir, "job.conf")));
        try
        {
            Assert.Equal(0, Kill(coordinator, SigStop));
            Assert.Equal(0, Kill(worker, SigKill));
            var clock = Stopwatch.StartNew();
            Assert.True(launcher.Process.WaitForExit(deadline + TimeSpan.FromSeconds(30)), "the launcher kept waiting for a generation");
            output.WriteLine($"the launcher gave up {clock.Elapsed.TotalSeconds:F1} s after the loss (deadline {deadline.TotalSeconds:0} s)");
            Assert.InRange(clock.Elapsed, deadline - TimeSpan.FromSeconds(2), deadline + TimeSpan.FromSeconds(30));
            string text = await launcher.Output;
            output.WriteLine(string.Join('\n', text.Split('\n').TakeLast(6)));
            Assert.NotEqual(0, launcher.Process.ExitCode);
            Assert.Contains($"no generation of the job was under way {deadline.TotalSeconds:0} s after worker pid {worker} died " +
                $"(recovery.worker-wait-timeout + recovery.generation-start-timeout + 30 s): the coordinator (pid {coordinator}) reported neither a start nor a failure", text);
        }
        finally
        {
            Kill(coordinator, SigCont);
            if (!launcher.Process.HasExited) launcher.Process.Kill(entireProcessTree: true);
        }
    }

    static string Config => Path.Combine(TestSupport.RepoRoot, "cluster-config", "shakespeare-char.conf");

    static string[] Sets(string dir, params string[] overrides) =>
        TestSupport.TinyJobOverrides(dir).Concat(overrides).SelectMany(kv => new[] { "--set", kv }).ToArray();

    static int FreePort()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }

    sealed record Started(Process Process, Task<string> Output) : IDisposable
    {
        public void Dispose()
        {
            try { if (!Process.HasExited) Process.Kill(entireProcessTree: true); }
            catch (InvalidOperationException) { }
            Process.Dispose();
        }
    }

    /// <summary>dtrain as a real process, all it prints collected.</summary>
    static Started StartCli(string workingDirectory, IEnumerable<string> args)
    {
        var info = new ProcessStartInfo("dotnet") { WorkingDirectory = workingDirectory, RedirectStandardOutput = true, RedirectStandardError = true };
        info.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "dtrain.dll"));
        foreach (var a in args) info.ArgumentList.Add(a);
        info.Environment["CI"] = "true";
        var process = Process.Start(info)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        return new Started(process, Task.WhenAll(stdout, stderr).ContinueWith(_ => stdout.Result + stderr.Result));
    }

    static async Task<IReadOnlyList<object>> ReadJournal(string dir)
    {
        var spec = JobConfigLoader.Load(Path.Combine(dir, "job.conf"));
        return (await JournalReader.ReadAsync(spec, TimeSpan.FromSeconds(30))).Select(e => e.Event).ToList();
    }

    static string WorkerLogs(string dir) =>
        string.Concat(Directory.GetFiles(Path.Combine(dir, "logs"), "worker-*.log").Select(File.ReadAllText));

    static string[] Arguments(int pid) => File.ReadAllText($"/proc/{pid}/cmdline").Split('\0');

    static int[] ChildrenOf(int pid) =>
        Directory.GetDirectories($"/proc/{pid}/task")
            .SelectMany(task => File.ReadAllText(Path.Combine(task, "children")).Split(' ', StringSplitOptions.RemoveEmptyEntries)).Select(int.Parse).ToArray();
}
