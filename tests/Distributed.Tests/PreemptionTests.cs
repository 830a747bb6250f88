using System.Diagnostics;
using Distributed.Cluster;
using Distributed.Core;
using Distributed.Training.Checkpoints;

namespace Distributed.Tests;

public partial class FaultTests
{
    /// <summary>
    /// A real SIGTERM to a worker mid-run (an eviction, `kubectl delete pod`): every rank checkpoints the step it has
    /// just finished, the coordinator commits it, the worker exits with <see cref="ExitCodes.Preempted"/> within its
    /// grace period, and the next generation resumes from exactly that step: none is lost, and the job ends bit-identical.
    /// </summary>
    [Fact]
    public async Task ASigtermedWorkerCheckpointsTheCurrentStepAndTheJobLosesNoStep()
    {
        if (!OperatingSystem.IsLinux()) return;
        string dir = TestSupport.TempDir("preempt");
        // A slow link (it changes no number) stretches the run so the signal lands mid-way.
        var (launcher, launcherOutput, _) = await StartTrainingAsync(dir, UninterruptedRun.Workers, UninterruptedRun.Job, steps: 13, "--fault", "delay-link:0-1:40");
        using var _ = launcher;
        int victim = WorkerPids(launcher.Id)[1];
        using var victimProcess = Process.GetProcessById(victim);
        long signalledAt = File.ReadAllLines(Path.Combine(dir, "metrics.jsonl")).Length;
        var clock = Stopwatch.StartNew();
        Assert.Equal(0, Kill(victim, SigTerm));
        Assert.True(victimProcess.WaitForExit(TimeSpan.FromSeconds(30)), "the worker did not exit within its grace period after SIGTERM");
        var exitedAfter = clock.Elapsed;
        Assert.True(launcher.WaitForExit(TimeSpan.FromSeconds(120)), "the job did not finish after the preemption");
        string text = await launcherOutput;
        Assert.True(launcher.ExitCode == 0, text);
        Assert.Contains($"worker pid {victim} exited with code {ExitCodes.Preempted}", text);

        var journal = await ReadJournal(dir);
        var aborted = journal.OfType<GenerationAborted>().Single();
        var match = System.Text.RegularExpressions.Regex.Match(aborted.Reason, @"preempted \(SIGTERM\) after step (\d+); the checkpoint of step \1 is committed");
        Assert.True(match.Success, aborted.Reason);
        long step = long.Parse(match.Groups[1].Value);
        Assert.True(step >= signalledAt, $"checkpointed step {step}, but {signalledAt} steps were done when the signal was sent");
        Assert.Contains(journal, e => e is CheckpointCommitted c && c.Step == step);
        // No step lost: the next generation starts from the step the preempted one stopped at.
        Assert.Equal(step, journal.OfType<GenerationStarted>().Single(g => g.Generation == 2).ResumeStep);
        AssertEveryGenerationResumedFromTheNewestIntactCommit(journal, null);
        AssertSameFinalState(dir);
        output.WriteLine($"SIGTERM after {signalledAt} steps; the checkpoint of step {step} was committed and the worker exited (code {ExitCodes.Preempted}) " +
            $"{exitedAfter.TotalSeconds:F2} s after the signal; generation 2 resumed from step {step}; final state bit-identical to the uninterrupted run");
        output.WriteLine($"journal: {aborted.Reason}");
        Assert.True(File.Exists(Path.Combine(dir, "checkpoints", CheckpointFiles.DirectoryName(40), CheckpointFiles.ManifestName)));
    }

    /// <summary>A worker that is asked to stop before it has a rank has nothing to save: it exits at once, as preempted.</summary>
    [Fact]
    public async Task AWorkerWithoutAGenerationExitsAtOnceOnSigterm()
    {
        if (!OperatingSystem.IsLinux()) return;
        // Its seed's name never resolves: the worker waits for it, as a pod waits for its coordinator's DNS record.
        var info = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in new[] { Path.Combine(AppContext.BaseDirectory, "dtrain.dll"), "worker", "--seed", "coordinator.invalid:2551" }) info.ArgumentList.Add(a);
        using var worker = Process.Start(info)!;
        var stdout = worker.StandardOutput.ReadToEndAsync();
        var stderr = worker.StandardError.ReadToEndAsync();
        await Task.Delay(3000);   // started and resolving by now
        Assert.False(worker.HasExited, "the worker did not wait for its seed's name");
        Assert.Equal(0, Kill(worker.Id, SigTerm));
        Assert.True(worker.WaitForExit(TimeSpan.FromSeconds(10)), "the worker ignored SIGTERM");
        string text = await stdout + await stderr;
        Assert.True(worker.ExitCode == ExitCodes.Preempted, $"exit {worker.ExitCode}\n{text}");
        Assert.Contains("Asked to stop before joining", text);
    }
}
