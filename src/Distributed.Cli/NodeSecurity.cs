using System.CommandLine;
using Distributed.Comm.Security;
using Distributed.Core;

namespace Distributed.Cli;

/// <summary>
/// Where each process gets its TLS credentials: the launcher and the coordinator from the job's security.* keys,
/// a worker (which has no job until it has joined) from --security and --certs, which the launcher passes on and a
/// Kubernetes pod sets from its Secret.
/// </summary>
static class NodeSecurity
{
    public const string DefaultCertificates = "/etc/dtrain-certs";

    /// <summary>The launcher's: under tls without a directory, a CA of this run's own in run.dir/certs (kept for a resume).</summary>
    public static (JobSpec Spec, ClusterCredentials? Credentials) ForLauncher(JobSpec spec)
    {
        if (!spec.Security.Tls) return (spec, null);
        if (spec.Security.Certificates.Length == 0)
        {
            string directory = Path.GetFullPath(Path.Combine(spec.RunDir, "certs"));
            if (!File.Exists(Path.Combine(directory, ClusterCredentials.CertificateFile))) ClusterCredentials.Create(directory, []);
            spec = spec with { Security = spec.Security with { Certificates = directory } };
        }
        return (spec, ClusterCredentials.Load(spec.Security.Certificates));
    }

    /// <summary>The coordinator's, from its job (security.certificates must name the directory under tls).</summary>
    public static ClusterCredentials? ForJob(JobSpec spec)
    {
        if (!spec.Security.Tls) return null;
        return ClusterCredentials.Load(spec.Security.Certificates.Length > 0 ? spec.Security.Certificates : DefaultCertificates);
    }

    /// <summary>The arguments that give a worker the same security as the job.</summary>
    public static string[] WorkerArguments(JobSpec spec) =>
        spec.Security.Tls ? ["--security", "tls", "--certs", spec.Security.Certificates] : [];

    public static Option<string> ModeOption() => new("--security")
    {
        Description = "none or tls (mutual TLS on Akka and on the data plane; default: $DTRAIN_SECURITY, else none)",
        DefaultValueFactory = _ => Environment.GetEnvironmentVariable("DTRAIN_SECURITY") is { Length: > 0 } mode ? mode : "none",
    };

    public static Option<string> CertificatesOption() => new("--certs")
    {
        Description = $"directory with ca.crt, tls.crt and tls.key under --security tls (default: $DTRAIN_CERTS, else {DefaultCertificates})",
        DefaultValueFactory = _ => Environment.GetEnvironmentVariable("DTRAIN_CERTS") is { Length: > 0 } dir ? dir : DefaultCertificates,
    };

    public static ClusterCredentials? FromOptions(string mode, string certificates) =>
        SecurityModes.Parse(mode) == SecurityMode.Tls ? ClusterCredentials.Load(certificates) : null;
}

/// <summary><c>dtrain certs --out DIR</c>: a new cluster CA and a node certificate signed by it, for security.mode = tls.</summary>
static class CertsCommand
{
    public static Command Create()
    {
        var output = new Option<string>("--out") { Description = "directory to write ca.crt, ca.key, tls.crt, tls.key into", Required = true };
        var names = new Option<string[]>("--dns") { Description = "extra DNS names for the node certificate (localhost and 127.0.0.1 are always in it)" };
        var days = new Option<int>("--days") { Description = "validity in days", DefaultValueFactory = _ => 365 };
        var command = new Command("certs", "create a cluster certificate authority and a node certificate (mutual TLS: security.mode = tls)") { output, names, days };
        command.SetAction(parse =>
        {
            string directory = parse.GetValue(output)!;
            if (File.Exists(Path.Combine(directory, ClusterCredentials.AuthorityFile)))
                throw new UserFacingException($"'{directory}' already holds a CA ({ClusterCredentials.AuthorityFile}); choose an empty directory");
            ClusterCredentials.Create(directory, parse.GetValue(names) ?? [], parse.GetValue(days));
            using var created = ClusterCredentials.Load(directory);
            Console.WriteLine($"Wrote {ClusterCredentials.AuthorityFile}, {ClusterCredentials.AuthorityKeyFile}, {ClusterCredentials.CertificateFile}, {ClusterCredentials.KeyFile} to {directory}");
            Console.WriteLine($"CA: {created.Authority.Subject}, node certificate valid until {created.Node.NotAfter:yyyy-MM-dd}");
            Console.WriteLine($"Kubernetes: kubectl create secret generic dtrain-certs --from-file={directory}/{ClusterCredentials.AuthorityFile} --from-file={directory}/{ClusterCredentials.CertificateFile} --from-file={directory}/{ClusterCredentials.KeyFile}");
            return 0;
        });
        return command;
    }
}
