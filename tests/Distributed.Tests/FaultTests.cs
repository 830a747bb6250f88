using System.Diagnostics;

namespace Distributed.Tests;

/// <summary>Real faults on real processes. Recovery comes later; today a lost worker must end the job with an
/// error that names it, quickly, and leave no process behind.</summary>
public partial class FaultTests
{
    const int SigTerm = 15;

    [System.Runtime.InteropServices.LibraryImport("libc", EntryPoint = "kill")]
    private static partial int Kill(int pid, int signal);

    static int[] ChildrenOf(int pid) =>
        Directory.GetDirectories($"/proc/{pid}/task")
            .SelectMany(task => File.ReadAllText(Path.Combine(task, "children")).Split(' ', StringSplitOptions.RemoveEmptyEntries)).Select(int.Parse).ToArray();

    /// <summary>Starts `dtrain train --workers N` on a long tiny job and waits until it has trained a few steps.</summary>
    static async Task<(Process Launcher, Task<string> Stderr, int[] Workers)> StartTrainingAsync(string dir, int workers)
    {
        var info = new ProcessStartInfo("dotnet") { WorkingDirectory = dir, RedirectStandardOutput = true, RedirectStandardError = true };
        info.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "dtrain.dll"));
        foreach (var a in TestSupport.TrainArgs(dir, workers, ["train.batch-size=12", "train.max-iters=100000", "cluster.collective-timeout=5", "train.log-interval=1"]))
            info.ArgumentList.Add(a);
        info.Environment["CI"] = "true";
        var launcher = Process.Start(info)!;
        var stderr = launcher.StandardError.ReadToEndAsync();
        _ = launcher.StandardOutput.ReadToEndAsync();
        string metrics = Path.Combine(dir, "metrics.jsonl");
        var waiting = Stopwatch.StartNew();
        while (!File.Exists(metrics) || File.ReadAllLines(metrics).Length < 5)
        {
            if (waiting.Elapsed > TimeSpan.FromSeconds(120)) { launcher.Kill(entireProcessTree: true); Assert.Fail("training did not start"); }
            if (launcher.HasExited) Assert.Fail("launcher exited early: " + await stderr);
            await Task.Delay(200);
        }
        return (launcher, stderr, ChildrenOf(launcher.Id));
    }

    static async Task AssertAllGone(int[] pids)
    {
        var deadline = Stopwatch.StartNew();
        bool Alive(int p) => Directory.Exists($"/proc/{p}") && !File.ReadAllText($"/proc/{p}/stat").Contains(") Z ");
        while (pids.Any(Alive) && deadline.Elapsed < TimeSpan.FromSeconds(10)) await Task.Delay(100);
        Assert.DoesNotContain(pids, Alive);
    }

    [Fact]
    public async Task SigtermStopsTheLauncherAndEveryWorker()
    {
        if (!OperatingSystem.IsLinux()) return;
        var (launcher, _, workers) = await StartTrainingAsync(TestSupport.TempDir("sigterm"), 2);
        using (launcher)
        {
            Assert.Equal(2, workers.Length);
            Assert.Equal(0, Kill(launcher.Id, SigTerm));
            Assert.True(launcher.WaitForExit(TimeSpan.FromSeconds(15)), "the launcher ignored SIGTERM");
            Assert.NotEqual(0, launcher.ExitCode);
            await AssertAllGone(workers);
        }
    }

    [Fact]
    public async Task ASigkilledWorkerFailsTheJobNamingItWithinTheDeadline()
    {
        if (!OperatingSystem.IsLinux()) return;
        var (launcher, stderr, workers) = await StartTrainingAsync(TestSupport.TempDir("kill"), 3);
        using var _ = launcher;
        try
        {
            Assert.Equal(3, workers.Length);

            using var victim = Process.GetProcessById(workers[1]);
            var killedAt = Stopwatch.StartNew();
            victim.Kill();   // SIGKILL
            Assert.True(launcher.WaitForExit(TimeSpan.FromSeconds(5 + 15)), "the job did not end after a worker was killed");
            Assert.NotEqual(0, launcher.ExitCode);
            string error = await stderr;
            Assert.Contains($"pid {workers[1]}", error);
            Assert.DoesNotContain("   at ", error);
            Assert.True(killedAt.Elapsed < TimeSpan.FromSeconds(20), $"took {killedAt.Elapsed}");
        }
        finally
        {
            if (!launcher.HasExited) launcher.Kill(entireProcessTree: true);
        }
        await AssertAllGone(workers);   // no worker is left behind
    }
}
