using Akka.Actor;
using Akka.Cluster.Tools.Singleton;
using Distributed.Comm;
using Distributed.Core;
using Microsoft.Extensions.Logging;

namespace Distributed.Cluster;

/// <summary>Starts the coordinator or a worker on an actor system.</summary>
public static class ClusterRoles
{
    /// <summary>Runs the coordinator as a cluster singleton on coordinator-role nodes; returns a proxy to it.</summary>
    public static IActorRef StartCoordinator(ActorSystem system, CoordinatorOptions options, ILogger logger, Action<string> onUnrecoverable)
    {
        system.ActorOf(ClusterSingletonManager.Props(
            CoordinatorActor.Props(options, logger, onUnrecoverable), PoisonPill.Instance,
            ClusterSingletonManagerSettings.Create(system).WithRole(ClusterBootstrap.CoordinatorRole)), "coordinator");
        return CoordinatorProxy(system);
    }

    public static IActorRef CoordinatorProxy(ActorSystem system) => system.ActorOf(ClusterSingletonProxy.Props(
        "/user/coordinator", ClusterSingletonProxySettings.Create(system).WithRole(ClusterBootstrap.CoordinatorRole)), "coordinator-proxy");

    /// <summary>Starts a worker; the task completes with the process's exit code (<see cref="ExitCodes"/>) when the job ends for it.</summary>
    /// <param name="rankHint">the rank this worker asks for (a Kubernetes Job's completion index), or null</param>
    public static Task<int> StartWorker(ActorSystem system, DataPlaneNode node, ILoggerFactory loggerFactory, PreemptionSignal preemption, int? rankHint = null)
    {
        var exitCode = new TaskCompletionSource<int>(TaskCreationOptions.RunContinuationsAsynchronously);
        system.ActorOf(WorkerActor.Props(node, CoordinatorProxy(system), loggerFactory, exitCode, preemption, rankHint), "worker");
        return exitCode.Task;
    }
}
