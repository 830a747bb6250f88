using Akka.Actor;
using Distributed.Cluster;
using Distributed.Cluster.Config;
using Distributed.Core;
using Distributed.Training;
using Microsoft.Extensions.Logging;

namespace Distributed.Cli;

/// <summary>
/// The single-host simulation: this process is the launcher (the cluster's seed and oldest node), and starts the
/// coordinator and the workers as processes on loopback, replacing any that dies while the job runs (the
/// coordinator then recovers from its journal, or starts a new generation from the last commit). Progress comes
/// back as job events.
/// </summary>
static class ClusterJob
{
    /// <summary>What the launcher's deadline allows beyond the coordinator's: starting processes, replaying the journal.</summary>
    static readonly TimeSpan StartMargin = TimeSpan.FromSeconds(30);

    /// <summary>
    /// The launcher's own deadline for a generation to be under way, armed whenever none is (at submission, after a
    /// lost generation, after a replaced process): the coordinator's deadlines plus <see cref="StartMargin"/>, so the
    /// coordinator's failure, which names more, comes first; this one catches a coordinator that says nothing.
    /// </summary>
    public static TimeSpan StartDeadline(JobSpec spec) =>
        TimeSpan.FromSeconds(spec.Recovery.WorkerWaitSeconds + spec.Recovery.GenerationStartSeconds) + StartMargin;

    public const string LauncherRole = "launcher";

    /// <summary>The job file the coordinator process reads (and a later --resume of the run directory).</summary>
    public static string JobFile(JobSpec spec) => Path.Combine(spec.RunDir, "job.conf");

    public static async Task<(EvalResult? Result, long Steps)> RunAsync(JobSpec spec, int workers, IReadOnlyList<string> faultArguments, long faultSeed,
        string? resumeFrom, ITrainingObserver observer, ILogger logger, CancellationToken cancellationToken)
    {
        Directory.CreateDirectory(spec.RunDir);
        (spec, var credentials) = NodeSecurity.ForLauncher(spec);
        using var _ = credentials;
        File.WriteAllText(JobFile(spec), JobConfigLoader.ToHocon(spec));
        CoordinatorPersistence.RunId(spec.RunDir);

        // The launcher's own Akka log stays quiet: every kill makes remoting report a disassociation, and what
        // matters is logged by the job.
        var system = ClusterBootstrap.Start(LauncherRole, "127.0.0.1", 0, [], "akka.loglevel = OFF\nakka.stdout-loglevel = OFF", credentials);
        var cluster = Akka.Cluster.Cluster.Get(system);
        cluster.Join(cluster.SelfAddress);   // the launcher is the seed and the oldest node: keep-oldest keeps it
        string seed = $"{cluster.SelfAddress.Host}:{cluster.SelfAddress.Port}";
        string[] coordinatorArguments =
        [
            "coordinator", "--config", JobFile(spec), "--workers", workers.ToString(), "--seed", seed, "--port", "0",
            "--submission", Guid.NewGuid().ToString("N"), "--fault-seed", faultSeed.ToString(),
            .. faultArguments.SelectMany(f => new[] { "--fault", f }),
            .. resumeFrom is null ? Array.Empty<string>() : ["--resume-from", resumeFrom],
        ];
        // At most one replacement per allowed restart and process, so a process that cannot start ends the job.
        int maxReplacements = (spec.Recovery.MaxRestarts + 1) * (workers + 1);
        logger.LogInformation("Launcher at {Scheme}://{System}@{Seed}: starting a coordinator and {Workers} workers", ClusterBootstrap.Scheme(credentials is not null),
            ClusterBootstrap.SystemName, seed, workers);
        // Disposed after the actor system has stopped: processes told to shut down get a moment to exit by themselves.
        using var processes = new JobProcesses(coordinatorArguments, workers, seed, Path.Combine(spec.RunDir, "logs"), NodeSecurity.WorkerArguments(spec));
        try
        {
            var coordinator = ClusterRoles.CoordinatorProxy(system);
            var events = JobEvents.Subscribe(system, coordinator);
            using var stop = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
            var exit = processes.NextExit(stop.Token);
            var startDeadline = StartDeadline(spec);
            var disarmed = Task.Delay(Timeout.Infinite, stop.Token);
            Task deadline = disarmed;
            string since = "";
            // keep: a worker replaced while the job already waits does not extend the wait (the coordinator's clock runs on too)
            void Arm(string why, bool keep = false)
            {
                if (keep && deadline != disarmed) return;
                (deadline, since) = (Task.Delay(startDeadline, stop.Token), why);
            }
            Arm("the job was submitted");
            EvalResult? lastEval = null;
            long firstStep = -1, lastStep = 0;
            bool completed = false;
            try
            {
                while (true)
                {
                    var next = events.ReadAsync(stop.Token).AsTask();
                    var done = await Task.WhenAny(next, exit, deadline);
                    if (done == exit)
                    {
                        var dead = await exit;
                        string what = dead.DescribeExit();
                        if (dead.Process.ExitCode == JobProcesses.DoNotRestartExitCode) throw new UserFacingException(what);
                        if (processes.Restarts >= maxReplacements)
                            throw new UserFacingException($"{what}; {processes.Restarts} processes were replaced already, giving up");
                        logger.LogWarning("{What}; starting a replacement", what);
                        if (dead.Role == "worker") coordinator.Tell(new ProcessExited(dead.Process.Id, dead.Process.ExitCode > 128 ? "was killed" : "exited"));
                        else DownDeadCoordinator(cluster);
                        // A new coordinator starts its deadlines anew; a lost worker ends the generation.
                        Arm($"{dead.Role} pid {dead.Process.Id} died", keep: dead.Role == "worker");
                        processes.Replace(dead);
                        exit = processes.NextExit(stop.Token);
                        continue;
                    }
                    if (done == deadline)
                    {
                        var coordinatorProcess = processes.Children.FirstOrDefault(c => c.Role == "coordinator");
                        throw new UserFacingException($"no generation of the job was under way {startDeadline.TotalSeconds:0} s after {since} " +
                            $"(recovery.worker-wait-timeout + recovery.generation-start-timeout + {StartMargin.TotalSeconds:0} s): the coordinator" +
                            (coordinatorProcess is null ? "" : $" (pid {coordinatorProcess.Process.Id})") + " reported neither a start nor a failure" +
                            (coordinatorProcess is null ? "" : $"; its last output: {coordinatorProcess.LastOutput}"));
                    }
                    switch (await next)
                    {
                        case JobStarted s:
                            if (firstStep < 0)
                            {
                                (firstStep, lastStep) = (s.FirstStep, s.LastStep);
                                LogEndpoints(spec, logger);
                            }
                            deadline = disarmed;
                            logger.LogInformation("Generation {Generation}: {World} workers, steps {First}..{Last}", s.Generation, s.WorldSize, s.FirstStep + 1, s.LastStep);
                            observer.OnStart(s.FirstStep, s.LastStep);
                            break;
                        case JobStepReport r:
                            observer.OnStep(r.Metrics);
                            break;
                        case JobEvalReport e:
                            lastEval = e.Result;
                            observer.OnEval(e.Result);
                            break;
                        case JobCheckpointCommitted c:
                            observer.OnCheckpoint(c.Step, c.Directory);
                            break;
                        case JobRecovering r:
                            Arm($"generation {r.AbortedGeneration} was lost");
                            logger.LogWarning("Generation {Generation} lost: {Reason}. Recovering from the last commit (restart {Restarts} of {Max})",
                                r.AbortedGeneration, r.Reason, r.Restarts, r.MaxRestarts);
                            break;
                        case JobCompleted:
                            completed = true;
                            return (lastEval, lastStep - Math.Max(firstStep, 0));
                        case JobFailed f:
                            throw new UserFacingException($"the job failed: {f.Reason}");
                    }
                }
            }
            finally
            {
                stop.Cancel();
                // Stopped or failed: the processes stop now, not after finishing what they were doing.
                if (!completed) processes.KillAll();
            }
        }
        finally
        {
            // The whole cluster ends with the job: no graceful leave to wait for (Akka's remoting shutdown would
            // otherwise hold the launcher for its full timeout, about 9 s).
            await system.Terminate().WaitAsync(TimeSpan.FromSeconds(1)).ContinueWith(_ => { });
        }
    }

    /// <summary>Where the coordinator serves the job's metrics and status page, when it does (it wrote them before the first generation).</summary>
    static void LogEndpoints(JobSpec spec, ILogger logger)
    {
        if (!spec.Observability.Serves || !File.Exists(RunFiles.In(spec.RunDir, RunFiles.Endpoints))) return;
        using var endpoints = System.Text.Json.JsonDocument.Parse(File.ReadAllText(RunFiles.In(spec.RunDir, RunFiles.Endpoints)));
        foreach (var (name, value) in endpoints.RootElement.EnumerateObject().Select(p => (p.Name, p.Value.GetString())))
            if (value is not null) logger.LogInformation("{What}: {Url}", name == "metrics" ? "Prometheus metrics" : "Status page", value);
    }

    /// <summary>
    /// The coordinator's process died (this launcher saw it exit) and its replacement has not started yet, so the one
    /// coordinator-role member is the dead one: down it now, without waiting for the failure detector, so the
    /// replacement can take the singleton over (a singleton moves only once the old node is down).
    /// </summary>
    static void DownDeadCoordinator(Akka.Cluster.Cluster cluster)
    {
        foreach (var member in cluster.State.Members.Where(m => m.HasRole(ClusterBootstrap.CoordinatorRole))) cluster.Down(member.Address);
    }
}
