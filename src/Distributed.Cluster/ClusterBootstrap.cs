using Akka.Actor;
using Akka.Configuration;
using Distributed.Core;

namespace Distributed.Cluster;

/// <summary>Starts an Akka cluster node of the "dtrain" system from cluster-config/akka.conf, with a role.</summary>
public static class ClusterBootstrap
{
    public const string SystemName = "dtrain";
    public const string CoordinatorRole = "coordinator";
    public const string WorkerRole = "worker";

    /// <param name="extraHocon">settings only this node has (the coordinator's journal)</param>
    public static ActorSystem Start(string role, string host, int port, IEnumerable<string> seedNodes, string extraHocon = "")
    {
        string file = Path.Combine(AppContext.BaseDirectory, "akka.conf");
        if (!File.Exists(file)) throw new UserFacingException($"Akka settings '{file}' are missing from the installation");
        string seeds = string.Join(", ", seedNodes.Select(s => $"\"{s}\""));
        var config = ConfigurationFactory.ParseString($$"""
            akka.remote.dot-netty.tcp.hostname = "{{host}}"
            akka.remote.dot-netty.tcp.port = {{port}}
            akka.cluster.roles = ["{{role}}"]
            akka.cluster.seed-nodes = [{{seeds}}]
            {{extraHocon}}
            """).WithFallback(ConfigurationFactory.ParseString(File.ReadAllText(file)));
        return ActorSystem.Create(SystemName, config);
    }

    /// <summary>The address a node of this system at host:port has, for use as a seed.</summary>
    public static string SeedAddress(string hostAndPort) =>
        hostAndPort.StartsWith("akka.tcp://", StringComparison.Ordinal) ? hostAndPort : $"akka.tcp://{SystemName}@{hostAndPort}";
}
