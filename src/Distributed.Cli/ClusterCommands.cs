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

    static async Task WaitForParentExit(int? pid, CancellationToken cancellationToken)
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

/// <summary><c>dtrain coordinator</c>: the coordinator node on its own (Kubernetes, several hosts); workers join it.</summary>
static class CoordinatorCommand
{
    public static Command Create()
    {
        var config = new Option<string>("--config") { Description = "job file (HOCON)", DefaultValueFactory = _ => "cluster-config/shakespeare-char.conf" };
        var set = new Option<string[]>("--set") { Description = "override a config key" };
        var workers = new Option<int?>("--workers") { Description = "workers to wait for (default: cluster.workers)" };
        var host = new Option<string>("--host") { Description = "address this node advertises to workers", DefaultValueFactory = _ => "127.0.0.1" };
        var port = new Option<int>("--port") { Description = "Akka port workers use as their seed", DefaultValueFactory = _ => 2551 };
        var command = new Command("coordinator", "run the coordinator node and wait for workers (dtrain worker --seed HOST:PORT)") { config, set, workers, host, port };
        command.SetAction(async (parse, cancellationToken) =>
        {
            var spec = Distributed.Cluster.Config.JobConfigLoader.Load(parse.GetValue(config)!, parse.GetValue(set));
            int count = parse.GetValue(workers) ?? spec.Cluster.Workers;
            if (count < 1) throw new Core.UserFacingException($"--workers must be 1 or more, got {count}");
            spec.ValidateDataParallel(count);
            using var loggerFactory = Logging.CreateFactory();
            var logger = loggerFactory.CreateLogger("coordinator");
            var (result, _) = await ClusterJob.RunAsync(spec, count, resumeFrom: null, spawnWorkers: false,
                parse.GetValue(host)!, parse.GetValue(port), new LogLineObserver(logger, spec.Train.LogInterval), logger, cancellationToken);
            if (result is not null) Console.WriteLine($"step {result.Step}: train loss {result.TrainLoss:F4}, val loss {result.ValLoss:F4} (perplexity {result.ValPerplexity:F2})");
            return 0;
        });
        return command;
    }
}
