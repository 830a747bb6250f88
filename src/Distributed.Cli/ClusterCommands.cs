using System.CommandLine;
using Akka.Actor;
using Distributed.Cluster;
using Distributed.Comm;
using Microsoft.Extensions.Logging;

namespace Distributed.Cli;

/// <summary><c>dtrain worker</c>: one worker process that joins a cluster and trains the rank it is given.</summary>
static class WorkerCommand
{
    public static Command Create()
    {
        var seed = new Option<string>("--seed") { Description = "a cluster node to join: HOST:PORT (the coordinator)", Required = true };
        var host = new Option<string>("--host") { Description = "address this worker advertises", DefaultValueFactory = _ => "127.0.0.1" };
        var bind = new Option<string>("--bind") { Description = "address the data plane listens on", DefaultValueFactory = _ => "127.0.0.1" };
        var port = new Option<int>("--port") { Description = "Akka port (0 = any free port)", DefaultValueFactory = _ => 0 };
        var dataPort = new Option<int>("--data-port") { Description = "gRPC data-plane port (0 = any free port)", DefaultValueFactory = _ => 0 };
        var parent = new Option<int?>("--parent-pid") { Description = "exit when this process is gone (set by `dtrain train`)" };
        var command = new Command("worker", "run a worker process") { seed, host, bind, port, dataPort, parent };
        command.SetAction(async (parse, cancellationToken) =>
        {
            using var loggerFactory = Logging.CreateFactory();
            var logger = loggerFactory.CreateLogger("worker");
            await using var node = await DataPlaneNode.StartAsync(parse.GetValue(bind)!, parse.GetValue(dataPort), parse.GetValue(host), loggerFactory, cancellationToken);
            var system = ClusterBootstrap.Start(ClusterBootstrap.WorkerRole, parse.GetValue(host)!, parse.GetValue(port), [ClusterBootstrap.SeedAddress(parse.GetValue(seed)!)]);
            logger.LogInformation("Worker pid {Pid}: data plane {Endpoint} (bulk TCP port {Bulk})", Environment.ProcessId, node.Endpoint, node.BulkPort);
            try
            {
                var finished = ClusterRoles.StartWorker(system, node, loggerFactory);
                var parentGone = WaitForParentExit(parse.GetValue(parent), cancellationToken);
                var clusterGone = system.WhenTerminated;
                var first = await Task.WhenAny(finished, parentGone, clusterGone);
                if (first == finished) return await finished;
                logger.LogError(first == parentGone ? "The launching process is gone; stopping" : "Left the cluster; stopping");
                return 1;
            }
            finally
            {
                await CoordinatedShutdown.Get(system).Run(CoordinatedShutdown.ClrExitReason.Instance);
            }
        });
        return command;
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
        var host = new Option<string>("--host") { Description = "address this node advertises to workers", DefaultValueFactory = _ => "127.0.0.1" };
        var port = new Option<int>("--port") { Description = "Akka port (workers use it as their seed when this node is the seed)", DefaultValueFactory = _ => 2551 };
        var seed = new Option<string?>("--seed") { Description = "a node to join (HOST:PORT); default: this node is the seed" };
        var faults = new Option<string[]>("--fault") { Description = $"inject a fault: {Core.Faults.Kinds}" };
        var faultSeed = new Option<long>("--fault-seed") { Description = "seed of --fault random:COUNT", DefaultValueFactory = _ => 1 };
        var resumeFrom = new Option<string?>("--resume-from") { Description = "a committed checkpoint to start from when the journal has none" };
        var submission = new Option<string?>("--submission")
        {
            Description = "id of the job submission this coordinator serves; a restart with the same id continues it (default: a new submission)",
        };
        var parent = new Option<int?>("--parent-pid") { Description = "exit when this process is gone (set by `dtrain train`)" };
        var command = new Command("coordinator", "run the coordinator node and wait for workers (dtrain worker --seed HOST:PORT)")
            { config, set, workers, host, port, seed, faults, faultSeed, resumeFrom, submission, parent };
        command.SetAction(async (parse, cancellationToken) =>
        {
            var spec = Distributed.Cluster.Config.JobConfigLoader.Load(parse.GetValue(config)!, parse.GetValue(set));
            int count = parse.GetValue(workers) ?? spec.Cluster.Workers;
            if (count < 1) throw new Core.UserFacingException($"--workers must be 1 or more, got {count}");
            Core.ParallelLayout.For(spec, count);
            var plan = Core.Faults.Parse(parse.GetValue(faults) ?? [], parse.GetValue(faultSeed), count, spec.Train.MaxIters, spec.Checkpoint.Every);
            using var loggerFactory = Logging.CreateFactory();
            var logger = loggerFactory.CreateLogger("coordinator");
            var system = ClusterBootstrap.Start(ClusterBootstrap.CoordinatorRole, parse.GetValue(host)!, parse.GetValue(port),
                parse.GetValue(seed) is { } s ? [ClusterBootstrap.SeedAddress(s)] : [], CoordinatorPersistence.Hocon(spec));
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
                        return JobProcesses.DoNotRestartExitCode;
                    }
                    if (first != next)
                    {
                        logger.LogError("The launching process or the cluster is gone; stopping");
                        return 1;
                    }
                    switch (await next)
                    {
                        case JobStarted started: observer.OnStart(started.FirstStep, started.LastStep); break;
                        case JobStepReport r: observer.OnStep(r.Metrics); break;
                        case JobEvalReport e: observer.OnEval(e.Result); break;
                        case JobCompleted c:
                            logger.LogInformation("Job completed at step {Step}; final checkpoint {Path}", c.Step, c.FinalCheckpoint);
                            if (parse.GetValue(parent) is null) RunPlot.TryWrite(spec.RunDir, logger);   // under `dtrain train` the launcher draws it
                            await Task.Delay(1000, cancellationToken);   // the workers' Shutdown messages leave first
                            return 0;
                        case JobFailed f:
                            logger.LogError("Job failed: {Reason}", f.Reason);
                            await Task.Delay(1000, cancellationToken);
                            return 1;
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
