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
