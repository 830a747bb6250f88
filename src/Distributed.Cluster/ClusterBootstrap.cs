using System.Net;
using System.Net.Sockets;
using Akka.Actor;
using Akka.Actor.Setup;
using Akka.Configuration;
using Akka.Event;
using Akka.Remote.Transport.DotNetty;
using Distributed.Comm.Security;
using Distributed.Core;
using Microsoft.Extensions.Logging;

namespace Distributed.Cluster;

/// <summary>Starts an Akka cluster node of the "dtrain" system from cluster-config/akka.conf, with a role.</summary>
public static class ClusterBootstrap
{
    public const string SystemName = "dtrain";
    public const string CoordinatorRole = "coordinator";
    public const string WorkerRole = "worker";

    /// <param name="extraHocon">settings only this node has (the coordinator's journal)</param>
    /// <param name="credentials">
    /// mutual TLS on Akka remoting: only nodes whose certificate chains to the cluster's CA associate (Akka has no join
    /// authentication of its own; this is the gate). Seed addresses then use the akka.ssl.tcp scheme.
    /// </param>
    public static ActorSystem Start(string role, string host, int port, IEnumerable<string> seedNodes, string extraHocon = "",
        ClusterCredentials? credentials = null)
    {
        string file = Path.Combine(AppContext.BaseDirectory, "akka.conf");
        if (!File.Exists(file)) throw new UserFacingException($"Akka settings '{file}' are missing from the installation");
        string seeds = string.Join(", ", seedNodes.Select(s => $"\"{s}\""));
        var config = ConfigurationFactory.ParseString($$"""
            akka.remote.dot-netty.tcp.hostname = "{{host}}"
            akka.remote.dot-netty.tcp.port = {{port}}
            akka.cluster.roles = ["{{role}}"]
            akka.cluster.seed-nodes = [{{seeds}}]
            akka.remote.dot-netty.tcp.enable-ssl = {{(credentials is null ? "off" : "on")}}
            {{extraHocon}}
            """).WithFallback(ConfigurationFactory.ParseString(File.ReadAllText(file)));
        if (credentials is null) return ActorSystem.Create(SystemName, config);
        var tls = new DotNettySslSetup(credentials.Node, suppressValidation: false, requireMutualAuthentication: true, validateCertificateHostname: false,
            customValidator: (certificate, _, remotePeer, _, log) =>
            {
                if (credentials.Accepts(certificate, out string reason)) return true;
                log?.Warning("Refused the TLS peer {0}: {1}", remotePeer, reason);
                return false;
            });
        return ActorSystem.Create(SystemName, ActorSystemSetup.Create(BootstrapSetup.Create().WithConfig(config), tls));
    }

    /// <summary>The scheme of this system's addresses: akka.tcp, or akka.ssl.tcp under TLS.</summary>
    public static string Scheme(bool tls) => tls ? "akka.ssl.tcp" : "akka.tcp";

    /// <summary>The address a node of this system at host:port has, for use as a seed.</summary>
    public static string SeedAddress(string hostAndPort, bool tls = false) =>
        hostAndPort.StartsWith("akka.", StringComparison.Ordinal) ? hostAndPort : $"{Scheme(tls)}://{SystemName}@{hostAndPort}";

    /// <summary>
    /// The seed's address with its host name resolved to an IP address, retried until it resolves: a Kubernetes pod may
    /// start before the DNS record of its coordinator's pod exists. The IP, not the name, because Akka compares
    /// addresses as text and the coordinator advertises its pod IP. Throws <see cref="TimeoutException"/> at the deadline.
    /// </summary>
    public static async Task<string> ResolveSeedAsync(string seed, TimeSpan timeout, ILogger logger, CancellationToken cancellationToken, bool tls = false)
    {
        var uri = new Uri(SeedAddress(seed, tls));
        if (uri.Port < 0 || uri.UserInfo != SystemName)
            throw new UserFacingException($"--seed '{seed}' is not HOST:PORT (or {Scheme(tls)}://{SystemName}@HOST:PORT)");
        string host = uri.IdnHost;
        if (IPAddress.TryParse(host, out _)) return SeedAddress(seed, tls);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        TimeSpan? lastLog = null;
        while (true)
        {
            string error;
            try
            {
                var addresses = await Dns.GetHostAddressesAsync(host, cancellationToken).ConfigureAwait(false);
                var address = addresses.FirstOrDefault(a => a.AddressFamily == AddressFamily.InterNetwork) ?? addresses.FirstOrDefault();
                if (address is not null)
                {
                    string ip = address.AddressFamily == AddressFamily.InterNetworkV6 ? $"[{address}]" : address.ToString();
                    logger.LogInformation("Seed {Host} resolved to {Address} after {Seconds:F1} s", host, ip, clock.Elapsed.TotalSeconds);
                    return $"{Scheme(tls)}://{SystemName}@{ip}:{uri.Port}";
                }
                error = "no addresses";
            }
            catch (SocketException e) { error = e.Message; }
            if (clock.Elapsed >= timeout)
                throw new TimeoutException($"the seed's name '{host}' did not resolve within {timeout.TotalSeconds:0} s: {error}");
            if (lastLog is null || clock.Elapsed - lastLog >= TimeSpan.FromSeconds(10))
            {
                lastLog = clock.Elapsed;
                logger.LogWarning("The seed's name {Host} does not resolve yet ({Error}); retrying", host, error);
            }
            await Task.Delay(TimeSpan.FromMilliseconds(500), cancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>Akka settings of this cluster (a file from `--akka-config`, e.g. a Kubernetes ConfigMap) that override the shipped akka.conf.</summary>
    public static string SettingsFile(string? path)
    {
        if (path is null) return "";
        if (!File.Exists(path)) throw new ConfigException($"Akka settings file '{path}' (--akka-config) does not exist");
        return File.ReadAllText(path);
    }
}
