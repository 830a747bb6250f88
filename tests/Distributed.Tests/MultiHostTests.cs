using System.Diagnostics;
using System.Text.Json;
using Distributed.Cluster;
using Distributed.Cluster.Config;
using Distributed.Core;
using Distributed.Training.Checkpoints;
using Xunit.Abstractions;

namespace Distributed.Tests;

/// <summary>The multi-host job run on loopback by `dtrain train`: what every multi-host run must end equal to.</summary>
public sealed class LoopbackReference
{
    public const int Workers = 2;
    public const long Steps = 120;

    /// <summary>Long enough to partition or kill a host after the first commit; TCP as between real hosts.</summary>
    public static readonly string[] Job =
    [
        $"train.max-iters={Steps}", $"optimizer.lr-decay-iters={Steps}", "train.eval-interval=60", "checkpoint.every=30", "checkpoint.keep=2",
        "cluster.transport=tcp", "cluster.collective-timeout=5",
    ];

    public LoopbackReference()
    {
        Dir = TestSupport.TempDir("loopback");
        var run = TestSupport.RunCli(Dir, TestSupport.TrainArgs(Dir, Workers, Job));
        Assert.True(run.ExitCode == 0, $"exit {run.ExitCode}\n{run.Stderr}\n{run.Stdout}");
    }

    public string Dir { get; }

    public string FinalCheckpoint => Path.Combine(Dir, "checkpoints", CheckpointFiles.DirectoryName(Steps));
}

/// <summary>
/// The multi-host behaviour a Kubernetes job relies on, rehearsed with real networking: a coordinator and two workers
/// on three hosts (network namespaces on a bridge, each its own address, hostname and hosts file as cluster DNS), run
/// as the manifests run them (`dtrain coordinator` / `dtrain worker` with POD_IP, the coordinator's DNS name as the
/// seed, a completion index as the rank hint). This test plays the Job controller: it restarts a worker that exits
/// with a retriable code. Each run ends bit-identical to the same job on loopback; a partitioned host and a worker
/// rescheduled onto another host with a new address both recover.
/// </summary>
public class MultiHostTests(LoopbackReference reference, ITestOutputHelper output) : IClassFixture<LoopbackReference>
{
    const int CoordinatorHost = 1, WorkerA = 2, WorkerB = 3, SpareHost = 4;
    const string CoordinatorName = "dtrain-coordinator-0.dtrain";   // its StatefulSet pod's DNS name (k8s/base)
    static readonly TimeSpan JobDeadline = TimeSpan.FromMinutes(3);

    [NetworkNamespacesFact]
    public async Task OnThreeHostsTheJobEndsBitIdenticalToLoopbackAndWorkersWaitForTheSeedsName()
    {
        using var net = new TestNetwork(4);
        var run = new Run(net, "clean");
        // The workers start before the coordinator's name exists (pods scheduled before the master's): they retry it.
        var a = run.Worker(WorkerA, index: 0);
        var b = run.Worker(WorkerB, index: 1);
        // Alive while the seed's name does not resolve (polled: a loaded machine may take seconds to start a process).
        var live = System.Diagnostics.Stopwatch.StartNew();
        string liveness = "";
        while (live.Elapsed < TimeSpan.FromSeconds(60) && (liveness = net.HttpGet(WorkerA, WorkerA, 8080, "/livez")) != "HTTP/1.1 200 OK")
            await Task.Delay(TimeSpan.FromMilliseconds(500));
        await Task.Delay(TimeSpan.FromSeconds(2));
        Assert.False(a.HasExited || b.HasExited, "a worker gave up on a seed name that does not resolve yet\n" + run.Logs());
        Assert.Equal("HTTP/1.1 200 OK", liveness);
        Assert.Equal("HTTP/1.1 503 Service Unavailable", net.HttpGet(WorkerA, WorkerA, 8080, "/readyz"));   // not in a cluster yet
        net.AddName(CoordinatorName, CoordinatorHost);
        var coordinator = run.Coordinator();
        await run.WaitForSteps(20);
        foreach (int host in new[] { CoordinatorHost, WorkerA, WorkerB })
            Assert.Equal("HTTP/1.1 200 OK", net.HttpGet(WorkerA, host, 8080, "/readyz"));   // across hosts
        await run.WaitForAll([coordinator, a, b]);

        Assert.Contains($"on {TestNetwork.Hostname(WorkerA)}: data plane http://{net.Address(WorkerA)}:2553", File.ReadAllText(run.LogOf(a)));   // its own hostname and POD_IP
        Assert.Contains("does not resolve yet", File.ReadAllText(run.LogOf(a)));
        Assert.Contains($"Seed {CoordinatorName} resolved to {net.Address(CoordinatorHost)}", File.ReadAllText(run.LogOf(a)));
        AssertBitIdentical(run);
        output.WriteLine($"clean: coordinator on {net.Address(CoordinatorHost)}, workers on {net.Address(WorkerA)} and {net.Address(WorkerB)}; " +
            $"{LoopbackReference.Steps} steps in {run.Clock.Elapsed.TotalSeconds:F1} s; final checkpoint bit-identical to loopback");
    }

    [NetworkNamespacesFact]
    public async Task APartitionedWorkerHostRecoversAndTheJobEndsBitIdentical()
    {
        using var net = new TestNetwork(4);
        net.AddName(CoordinatorName, CoordinatorHost);
        var run = new Run(net, "partition");
        var coordinator = run.Coordinator();
        var a = run.Worker(WorkerA, index: 0);
        var b = run.Worker(WorkerB, index: 1);
        await run.WaitForSteps(40);   // past the commit at step 30

        var cut = DateTime.UtcNow;
        net.Partition(WorkerB);
        // Cut off from the coordinator (the oldest node), the partitioned side downs itself and exits to be retried.
        Assert.True(await run.WaitForExit(b, TimeSpan.FromSeconds(90)), "the partitioned worker did not exit\n" + run.Logs());
        Assert.Equal(ExitCodes.Retry, b.ExitCode);
        var exited = DateTime.UtcNow;
        net.Heal();
        var replacement = run.Worker(WorkerB, index: 1);   // the Job's replacement pod, on the same node
        await run.WaitForAll([coordinator, a, replacement]);

        var (resumed, firstStepAt) = run.FirstStepAfterRecovery();
        await AssertResumedFromTheNewestCommit(run, resumed);
        AssertBitIdentical(run);
        output.WriteLine($"partition of {net.Address(WorkerB)} (nftables drop both ways) at {run.StepAt(cut)} steps: the worker exited (code {ExitCodes.Retry}) after " +
            $"{(exited - cut).TotalSeconds:F1} s; healed and restarted; training resumed from step {resumed} {(firstStepAt - cut).TotalSeconds:F1} s after the cut; " +
            $"final checkpoint bit-identical to loopback");
    }

    [NetworkNamespacesFact]
    public async Task AWorkerRescheduledOnAnotherHostWithANewAddressRecoversAndTheJobEndsBitIdentical()
    {
        using var net = new TestNetwork(4);
        net.AddName(CoordinatorName, CoordinatorHost);
        var run = new Run(net, "reschedule");
        var coordinator = run.Coordinator();
        var a = run.Worker(WorkerA, index: 0);
        var b = run.Worker(WorkerB, index: 1);
        await run.WaitForSteps(40);

        var lost = DateTime.UtcNow;
        b.Kill();   // its node is gone
        // The Job controller creates the index's replacement pod on another node: another host, another address.
        var moved = run.Worker(SpareHost, index: 1);
        await run.WaitForAll([coordinator, a, moved]);

        var (resumed, firstStepAt) = run.FirstStepAfterRecovery();
        await AssertResumedFromTheNewestCommit(run, resumed);
        Assert.Contains($"http://{net.Address(SpareHost)}:2553", File.ReadAllText(run.LogOf(coordinator)));   // registered from its new address
        Assert.Contains("Rank 1 reduces with", File.ReadAllText(run.LogOf(moved)));   // and got its index's rank back
        AssertBitIdentical(run);
        output.WriteLine($"worker on {net.Address(WorkerB)} killed at {run.StepAt(lost)} steps, its replacement started on {net.Address(SpareHost)} ({TestNetwork.Hostname(SpareHost)}); " +
            $"training resumed from step {resumed} {(firstStepAt - lost).TotalSeconds:F1} s after the loss; final checkpoint bit-identical to loopback");
    }

    /// <summary>The second generation started from the newest commit before the first was lost: no committed step was lost.</summary>
    static async Task AssertResumedFromTheNewestCommit(Run run, long resumedInMetrics)
    {
        var journal = (await JournalReader.ReadAsync(JobConfigLoader.Load(run.JobFile), TimeSpan.FromSeconds(30))).Select(e => e.Event).ToList();
        var second = journal.OfType<GenerationStarted>().Single(g => g.Generation == 2);
        long newest = journal.TakeWhile(e => e != (object)second).OfType<CheckpointCommitted>().Max(c => c.Step);
        Assert.Equal(newest, second.ResumeStep);
        Assert.Equal(newest, resumedInMetrics);
        Assert.True(newest >= 30, $"resumed from step {newest}: the fault came before the first commit");
    }

    void AssertBitIdentical(Run run)
    {
        var comparison = CheckpointFiles.Compare(reference.FinalCheckpoint, Path.Combine(run.Dir, "checkpoints", CheckpointFiles.DirectoryName(LoopbackReference.Steps)));
        Assert.True(comparison.Difference is null, $"the final checkpoint differs from loopback's: {comparison.Difference}");
    }

    /// <summary>One job on the test network: its run directory (the shared volume), job file and processes' logs.</summary>
    sealed class Run
    {
        readonly TestNetwork _net;
        readonly Dictionary<int, string> _logs = [];
        int _started;

        public Run(TestNetwork net, string name)
        {
            _net = net;
            Dir = TestSupport.TempDir("multihost-" + name);
            Directory.CreateDirectory(Path.Combine(Dir, "logs"));
            JobFile = Path.Combine(Dir, "job.conf");
            File.WriteAllText(JobFile, JobConfigLoader.ToHocon(TestSupport.TinyJob(Dir, LoopbackReference.Job)));
        }

        public string Dir { get; }
        public string JobFile { get; }
        public Stopwatch Clock { get; } = Stopwatch.StartNew();

        /// <summary>As k8s/base runs it: the seed is itself, its address is POD_IP.</summary>
        public Process Coordinator() => Start(CoordinatorHost, "coordinator",
            ["coordinator", $"--config={JobFile}", $"--workers={LoopbackReference.Workers}", "--port=2551", "--health-port=8080", "--submission=test"]);

        /// <summary>As k8s/base runs it: the seed by DNS name, the completion index as the rank hint.</summary>
        public Process Worker(int host, int index) => Start(host, "worker",
            ["worker", $"--seed={CoordinatorName}:2551", "--port=2552", "--data-port=2553", "--health-port=8080", "--grace-period=20"],
            new Dictionary<string, string> { ["JOB_COMPLETION_INDEX"] = $"{index}" });

        Process Start(int host, string role, string[] args, Dictionary<string, string>? environment = null)
        {
            string log = Path.Combine(Dir, "logs", $"{role}-{TestNetwork.Hostname(host)}-{++_started}.log");
            var process = _net.StartDtrain(host, args, log, environment);
            _logs[process.Id] = log;
            return process;
        }

        public string LogOf(Process p) => _logs[p.Id];

        public string Logs() => string.Join("\n", _logs.Values.Select(l => $"== {Path.GetFileName(l)}\n{(File.Exists(l) ? string.Join('\n', File.ReadLines(l).TakeLast(30)) : "")}"));

        string Metrics => Path.Combine(Dir, "metrics.jsonl");

        public async Task WaitForSteps(int steps)
        {
            var waiting = Stopwatch.StartNew();
            while (!File.Exists(Metrics) || File.ReadAllLines(Metrics).Length < steps)
            {
                if (waiting.Elapsed > TimeSpan.FromMinutes(2)) Assert.Fail($"training did not reach step {steps}\n{Logs()}");
                await Task.Delay(20);
            }
        }

        public async Task<bool> WaitForExit(Process p, TimeSpan timeout)
        {
            using var deadline = new CancellationTokenSource(timeout);
            try { await p.WaitForExitAsync(deadline.Token); return true; }
            catch (OperationCanceledException) { return false; }
        }

        /// <summary>The job ends with every process exiting 0 (the coordinator once the job is complete, the workers when told so).</summary>
        public async Task WaitForAll(Process[] processes)
        {
            foreach (var p in processes)
            {
                Assert.True(await WaitForExit(p, JobDeadline), $"the job did not finish within {JobDeadline.TotalMinutes:0} minutes\n{Logs()}");
                Assert.True(p.ExitCode == ExitCodes.Completed, $"{Path.GetFileName(LogOf(p))} exited with {p.ExitCode}\n{Logs()}");
            }
        }

        /// <summary>How many steps metrics.jsonl had when <paramref name="at"/> was.</summary>
        public long StepAt(DateTime at) => Lines().TakeWhile(l => l.WallTime <= at).LastOrDefault().Step;

        /// <summary>The step the second generation resumed from, and when its first step ended.</summary>
        public (long ResumedFrom, DateTime FirstStepAt) FirstStepAfterRecovery()
        {
            var lines = Lines().ToList();
            int restart = Enumerable.Range(1, lines.Count - 1).First(i => lines[i].Step <= lines[i - 1].Step);
            return (lines[restart].Step - 1, lines[restart].WallTime);
        }

        IEnumerable<(long Step, DateTime WallTime)> Lines() => File.ReadLines(Metrics).Select(line =>
        {
            using var json = JsonDocument.Parse(line);
            return (json.RootElement.GetProperty("step").GetInt64(), DateTime.UnixEpoch.AddSeconds(json.RootElement.GetProperty("wall_time").GetDouble()));
        });
    }
}
