using System.CommandLine;
using System.Runtime.InteropServices;
using Akka.Actor;
using Distributed.Cluster;
using Distributed.Comm;
using Distributed.Core;
using Microsoft.Extensions.Logging;

namespace Distributed.Cli;

/// <summary>
/// <c>dtrain worker</c>: one worker process that joins a cluster and trains the rank it is given. Its exit code says
/// whether to start it again (<see cref="ExitCodes"/>); SIGTERM is a preemption: the job checkpoints the current step
/// before this process exits.
/// </summary>
static class WorkerCommand
{
    /// <summary>How long leaving the cluster may take when the process exits.</summary>
    static readonly TimeSpan ShutdownTimeout = TimeSpan.FromSeconds(5);

    public static Command Create()
    {
        var seed = new Option<string>("--seed")
        {
            Description = "a cluster node to join: HOST:PORT (the coordinator); a DNS name is retried until it resolves", Required = true,
        };
        var host = new Option<string>("--host")
        {
            Description = $"address this worker advertises (default: ${PodEnvironment.PodIp}, else 127.0.0.1)", DefaultValueFactory = _ => PodEnvironment.AdvertisedHost,
        };
        var bind = new Option<string?>("--bind") { Description = "address the data plane listens on (default: the --host address)" };
        var port = new Option<int>("--port") { Description = "Akka port (0 = any free port)", DefaultValueFactory = _ => 0 };
        var dataPort = new Option<int>("--data-port") { Description = "gRPC data-plane port (0 = any free port)", DefaultValueFactory = _ => 0 };
        var rankHint = new Option<int?>("--rank-hint")
        {
            Description = $"the rank to ask the coordinator for (default: ${PodEnvironment.CompletionIndex}, an Indexed Job's index)",
            DefaultValueFactory = _ => PodEnvironment.RankHint,
        };
        var grace = new Option<double>("--grace-period")
        {
            Description = "seconds after SIGTERM for the checkpoint of the current step; keep it below the pod's terminationGracePeriodSeconds",
            DefaultValueFactory = _ => 25,
        };
        var joinTimeout = new Option<double>("--join-timeout")
        {
            Description = "seconds for the seed's name to resolve and for joining the cluster; then the worker exits to be retried", DefaultValueFactory = _ => 120,
        };
        var akkaConfig = ClusterOptions.AkkaConfig();
        var healthPort = ClusterOptions.HealthPort();
        var parent = new Option<int?>("--parent-pid") { Description = "exit when this process is gone (set by `dtrain train`)" };
        var security = NodeSecurity.ModeOption();
        var certificates = NodeSecurity.CertificatesOption();
        var command = new Command("worker", "run a worker process")
            { seed, host, bind, port, dataPort, rankHint, grace, joinTimeout, akkaConfig, healthPort, parent, security, certificates };
        command.SetAction(async (parse, cancellationToken) =>
        {
            using var loggerFactory = Logging.CreateFactory();
            var logger = loggerFactory.CreateLogger("worker");
            var preemption = new PreemptionSignal(TimeSpan.FromSeconds(parse.GetValue(grace)));
            // Program.cs leaves the termination signals to this command: they request a clean stop, not an immediate one.
            void Stop(PosixSignalContext context) { context.Cancel = true; preemption.Request(); }
            using var onTerm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, Stop);
            using var onInt = PosixSignalRegistration.Create(PosixSignal.SIGINT, Stop);
            string akkaSettings = ClusterBootstrap.SettingsFile(parse.GetValue(akkaConfig));
            using var credentials = NodeSecurity.FromOptions(parse.GetValue(security)!, parse.GetValue(certificates)!);
            await using var health = await HealthEndpoint.StartAsync(parse.GetValue(healthPort), cancellationToken);
            var join = TimeSpan.FromSeconds(parse.GetValue(joinTimeout));
            string seedAddress;
            using (var stopping = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken, preemption.Requested))
            {
                try { seedAddress = await ClusterBootstrap.ResolveSeedAsync(parse.GetValue(seed)!, join, logger, stopping.Token, tls: credentials is not null); }
                catch (OperationCanceledException) when (preemption.IsRequested) { logger.LogWarning("Asked to stop before joining; exiting"); return ExitCodes.Preempted; }
                catch (TimeoutException e) { logger.LogError("{Error}; exiting, to be started again", e.Message); return ExitCodes.Retry; }
            }
            string advertised = parse.GetValue(host)!;
            await using var node = await DataPlaneNode.StartAsync(parse.GetValue(bind) ?? advertised, parse.GetValue(dataPort), advertised, loggerFactory, cancellationToken,
                credentials);
            // A seed that never answers (a stale address) ends the process, so that it is started again and resolves anew.
            // SIGTERM is this command's (a preemption); Akka's own handler would leave the cluster at once.
            var system = ClusterBootstrap.Start(ClusterBootstrap.WorkerRole, advertised, parse.GetValue(port), [seedAddress],
                $"akka.cluster.shutdown-after-unsuccessful-join-seed-nodes = {join.TotalSeconds:0}s\n" +
                $"akka.coordinated-shutdown.run-by-clr-shutdown-hook = off\n{akkaSettings}", credentials);
            if (health is not null)
            {
                health.Readiness = (s, _) => HealthEndpoint.MemberUp(s);
                health.System = system;
            }
            logger.LogInformation("Worker pid {Pid} on {Machine}: data plane {Endpoint} (bulk TCP port {Bulk}), seed {Seed}, security {Security}",
                Environment.ProcessId, Environment.MachineName, node.Endpoint, node.BulkPort, seedAddress, credentials is null ? "none" : $"mutual TLS ({credentials.Directory})");
            try
            {
                var finished = ClusterRoles.StartWorker(system, node, loggerFactory, preemption, parse.GetValue(rankHint));
                var parentGone = WaitForParentExit(parse.GetValue(parent), cancellationToken);
                var clusterGone = system.WhenTerminated;
                var graceOver = GraceOver(preemption, cancellationToken);
                var first = await Task.WhenAny(finished, parentGone, clusterGone, graceOver);
                if (first == finished) return await finished;
                if (first == graceOver)
                {
                    logger.LogError("The grace period of {Seconds:0} s after SIGTERM is over; exiting", preemption.GracePeriod.TotalSeconds);
                    return ExitCodes.Preempted;
                }
                logger.LogError(first == parentGone ? "The launching process is gone; stopping" : "Left the cluster; stopping");
                return preemption.IsRequested ? ExitCodes.Preempted : ExitCodes.Retry;
            }
            finally
            {
                await CoordinatedShutdown.Get(system).Run(CoordinatedShutdown.ClrExitReason.Instance).WaitAsync(ShutdownTimeout).ContinueWith(_ => { });
            }
        });
        return command;
    }

    static async Task GraceOver(PreemptionSignal preemption, CancellationToken cancellationToken)
    {
        await Task.Delay(Timeout.Infinite, preemption.Requested).ContinueWith(_ => { });
        await Task.Delay(preemption.GracePeriod, cancellationToken).ContinueWith(_ => { });
    }

    public static async Task WaitForParentExit(int? pid, CancellationToken cancellationToken)
    {
        if (pid is null) { await Task.Delay(Timeout.Infinite, cancellationToken).ContinueWith(_ => { }); return; }
        while (!cancellationToken.IsCancellationRequested)
        {
            try { using var p = System.Diagnostics.Process.GetProcessById(pid.Value); if (p.HasExited) return; }
            catch (ArgumentException) { return; }
            await Task.Delay(1000, cancellationToken).ContinueWith(_ => { });
        }
    }
}

/// <summary>Options the coordinator and the worker share.</summary>
static class ClusterOptions
{
    public static Option<string?> AkkaConfig() => new("--akka-config")
    {
        Description = "a HOCON file whose Akka settings override the shipped akka.conf (a Kubernetes ConfigMap)",
    };

    public static Option<int?> HealthPort() => new("--health-port")
    {
        Description = "serve /livez and /readyz over HTTP on this port (Kubernetes probes); default: none",
    };
}

/// <summary>
/// <c>dtrain coordinator</c>: the coordinator node, with its journal. Standalone (Kubernetes, several hosts) it is the
/// cluster's seed and workers join it; in the simulation it joins the launcher. Restarted on the same run
/// directory, it recovers the job from its journal.
/// </summary>
static class CoordinatorCommand
{
    public static Command Create()
    {
        var config = new Option<string>("--config") { Description = "job file (HOCON)", DefaultValueFactory = _ => "cluster-config/shakespeare-char.conf" };
        var set = new Option<string[]>("--set") { Description = "override a config key" };
        var workers = new Option<int?>("--workers") { Description = "workers to wait for (default: cluster.workers)" };
        var host = new Option<string>("--host")
        {
            Description = $"address this node advertises to workers (default: ${PodEnvironment.PodIp}, else 127.0.0.1)", DefaultValueFactory = _ => PodEnvironment.AdvertisedHost,
        };
        var port = new Option<int>("--port") { Description = "Akka port (workers use it as their seed when this node is the seed)", DefaultValueFactory = _ => 2551 };
        var seed = new Option<string?>("--seed") { Description = "a node to join (HOST:PORT); default: this node is the seed" };
        var faults = new Option<string[]>("--fault") { Description = $"inject a fault: {Core.Faults.Kinds}" };
        var faultSeed = new Option<long>("--fault-seed") { Description = "seed of --fault random:COUNT", DefaultValueFactory = _ => 1 };
        var resumeFrom = new Option<string?>("--resume-from") { Description = "a committed checkpoint to start from when the journal has none" };
        var submission = new Option<string?>("--submission")
        {
            Description = "id of the job submission this coordinator serves; a restart with the same id continues it (default: a new submission)",
        };
        var linger = new Option<bool>("--linger")
        {
            Description = "once the job has ended, stay up (and ready) until stopped: a StatefulSet restarts a process that exits",
        };
        var akkaConfig = ClusterOptions.AkkaConfig();
        var healthPort = ClusterOptions.HealthPort();
        var parent = new Option<int?>("--parent-pid") { Description = "exit when this process is gone (set by `dtrain train`)" };
        var command = new Command("coordinator", "run the coordinator node and wait for workers (dtrain worker --seed HOST:PORT)")
            { config, set, workers, host, port, seed, faults, faultSeed, resumeFrom, submission, linger, akkaConfig, healthPort, parent };
        command.SetAction(async (parse, cancellationToken) =>
        {
            var spec = Distributed.Cluster.Config.JobConfigLoader.Load(parse.GetValue(config)!, parse.GetValue(set));
            int count = parse.GetValue(workers) ?? spec.Cluster.Workers;
            if (count < 1) throw new Core.UserFacingException($"--workers must be 1 or more, got {count}");
            Core.ParallelLayout.For(spec, count);
            // The run directory remembers its job, as `dtrain train` leaves it: `dtrain inspect` reads the journal's settings there.
            string jobFile = ClusterJob.JobFile(spec);
            if (Path.GetFullPath(jobFile) != Path.GetFullPath(parse.GetValue(config)!))
            {
                Directory.CreateDirectory(spec.RunDir);
                File.WriteAllText(jobFile, Distributed.Cluster.Config.JobConfigLoader.ToHocon(spec));
            }
            var plan = Core.Faults.Parse(parse.GetValue(faults) ?? [], parse.GetValue(faultSeed), count, spec.Train.MaxIters, spec.Checkpoint.Every);
            string akkaSettings = ClusterBootstrap.SettingsFile(parse.GetValue(akkaConfig));
            using var loggerFactory = Logging.CreateFactory();
            var logger = loggerFactory.CreateLogger("coordinator");
            using var credentials = NodeSecurity.ForJob(spec);
            await using var health = await HealthEndpoint.StartAsync(parse.GetValue(healthPort), cancellationToken);
            var system = ClusterBootstrap.Start(ClusterBootstrap.CoordinatorRole, parse.GetValue(host)!, parse.GetValue(port),
                parse.GetValue(seed) is { } s ? [ClusterBootstrap.SeedAddress(s, tls: credentials is not null)] : [], CoordinatorPersistence.Hocon(spec) + "\n" + akkaSettings,
                credentials);
            var cluster = Akka.Cluster.Cluster.Get(system);
            if (parse.GetValue(seed) is null) cluster.Join(cluster.SelfAddress);
            logger.LogInformation("Coordinator pid {Pid} at {Address}, journal {Provider}, waiting for {Workers} workers",
                Environment.ProcessId, cluster.SelfAddress, spec.Persistence.Provider, count);
            try
            {
                var unrecoverable = new TaskCompletionSource<string>(TaskCreationOptions.RunContinuationsAsynchronously);
                var options = new CoordinatorOptions(spec, count, plan, parse.GetValue(resumeFrom),
                    parse.GetValue(submission) ?? Guid.NewGuid().ToString("N"), CoordinatorPersistence.PersistenceId(spec.RunDir));
                var coordinator = ClusterRoles.StartCoordinator(system, options, logger, reason => unrecoverable.TrySetResult(reason));
                await using var observability = await ObservabilityServer.StartAsync(system, coordinator, spec, count, loggerFactory);
                if (health is not null)
                {
                    health.Readiness = (s, token) => HealthEndpoint.CoordinatorAnswers(s, coordinator, token);
                    health.System = system;
                }
                async Task<int> Ended(int exitCode)
                {
                    await Task.Delay(1000, cancellationToken);   // the workers' Shutdown messages leave first
                    if (!parse.GetValue(linger)) return exitCode;
                    logger.LogInformation("The job has ended; staying up until stopped (--linger)");
                    await Task.Delay(Timeout.Infinite, cancellationToken).ContinueWith(_ => { });
                    return exitCode;
                }
                var events = JobEvents.Subscribe(system, coordinator);
                var observer = new LogLineObserver(logger, spec.Train.LogInterval);
                var parentGone = WorkerCommand.WaitForParentExit(parse.GetValue(parent), cancellationToken);
                while (true)
                {
                    var next = events.ReadAsync(cancellationToken).AsTask();
                    var first = await Task.WhenAny(next, parentGone, system.WhenTerminated, unrecoverable.Task);
                    if (first == unrecoverable.Task)
                    {
                        logger.LogCritical("Stopping: {Reason}", await unrecoverable.Task);
                        return ExitCodes.Unrecoverable;
                    }
                    if (first != next)
                    {
                        logger.LogError("The launching process or the cluster is gone; stopping");
                        return ExitCodes.Retry;
                    }
                    switch (await next)
                    {
                        case JobStarted started: observer.OnStart(started.FirstStep, started.LastStep); break;
                        case JobStepReport r: observer.OnStep(r.Metrics); break;
                        case JobEvalReport e: observer.OnEval(e.Result); break;
                        case JobCompleted c:
                            logger.LogInformation("Job completed at step {Step}; final checkpoint {Path}", c.Step, c.FinalCheckpoint);
                            if (parse.GetValue(parent) is null) RunPlot.TryWrite(spec.RunDir, logger);   // under `dtrain train` the launcher draws it
                            return await Ended(ExitCodes.Completed);
                        case JobFailed f:
                            logger.LogError("Job failed: {Reason}", f.Reason);
                            return await Ended(ExitCodes.JobFailed);
                    }
                }
            }
            finally
            {
                await system.Terminate().WaitAsync(TimeSpan.FromSeconds(2)).ContinueWith(_ => { });
            }
        });
        return command;
    }
}
