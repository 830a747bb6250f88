using System.Diagnostics;

namespace Distributed.Tests;

/// <summary>Real faults on real processes. Recovery comes later; today a lost worker must end the job with an
/// error that names it, quickly, and leave no process behind.</summary>
public class FaultTests
{
    static int[] ChildrenOf(int pid) =>
        Directory.GetDirectories($"/proc/{pid}/task")
            .SelectMany(task => File.ReadAllText(Path.Combine(task, "children")).Split(' ', StringSplitOptions.RemoveEmptyEntries)).Select(int.Parse).ToArray();

    [Fact]
    public async Task ASigkilledWorkerFailsTheJobNamingItWithinTheDeadline()
    {
        if (!OperatingSystem.IsLinux()) return;
        string dir = TestSupport.TempDir("kill");
        var info = new ProcessStartInfo("dotnet") { WorkingDirectory = dir, RedirectStandardOutput = true, RedirectStandardError = true };
        info.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "dtrain.dll"));
        foreach (var a in new[] { "train", "--workers", "3", "--config", Path.Combine(TestSupport.RepoRoot, "cluster-config", "shakespeare-char.conf") }) info.ArgumentList.Add(a);
        foreach (var kv in TestSupport.TinyJobOverrides(dir).Concat(["train.batch-size=12", "train.max-iters=100000", "cluster.collective-timeout=5", "train.log-interval=1"]))
        {
            info.ArgumentList.Add("--set");
            info.ArgumentList.Add(kv);
        }
        info.Environment["CI"] = "true";
        using var launcher = Process.Start(info)!;
        var stderr = launcher.StandardError.ReadToEndAsync();
        var stdout = launcher.StandardOutput.ReadToEndAsync();
        int[] workers = [];
        try
        {
            string metrics = Path.Combine(dir, "metrics.jsonl");
            var waiting = Stopwatch.StartNew();
            while (!File.Exists(metrics) || File.ReadAllLines(metrics).Length < 5)
            {
                Assert.True(waiting.Elapsed < TimeSpan.FromSeconds(120), "training did not start");
                if (launcher.HasExited) Assert.Fail("launcher exited early: " + await stderr);
                await Task.Delay(200);
            }
            workers = ChildrenOf(launcher.Id);
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
        // No worker is left behind.
        var deadline = Stopwatch.StartNew();
        while (workers.Any(p => Directory.Exists($"/proc/{p}")) && deadline.Elapsed < TimeSpan.FromSeconds(10)) await Task.Delay(100);
        Assert.DoesNotContain(workers, p => Directory.Exists($"/proc/{p}") && !File.ReadAllText($"/proc/{p}/stat").Contains(") Z "));
    }
}
