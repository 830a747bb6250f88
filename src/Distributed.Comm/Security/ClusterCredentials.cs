using System.Net.Security;
using System.Security.Authentication;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using Distributed.Core;

namespace Distributed.Comm.Security;

/// <summary>How the nodes of a cluster talk: in the clear (a trusted network, loopback) or over mutual TLS.</summary>
public enum SecurityMode { None, Tls }

public static class SecurityModes
{
    /// <summary>The config spelling (security.mode, --security): none or tls.</summary>
    public static SecurityMode Parse(string name) => name switch
    {
        "none" => SecurityMode.None,
        "tls" => SecurityMode.Tls,
        _ => throw new ConfigException($"unknown security mode '{name}': none or tls"),
    };
}

/// <summary>
/// A node's identity under mutual TLS: its certificate and key, and the cluster's certificate authority. A peer is
/// accepted when its certificate chains to that authority, and only to it: the system's trust store plays no part,
/// and host names are not checked (pods are dialled by IP; holding a certificate of the cluster's CA is the
/// identity). The files are a Kubernetes TLS Secret's: <c>ca.crt</c>, <c>tls.crt</c>, <c>tls.key</c> (PEM).
/// </summary>
public sealed class ClusterCredentials : IDisposable
{
    public const string AuthorityFile = "ca.crt", AuthorityKeyFile = "ca.key", CertificateFile = "tls.crt", KeyFile = "tls.key";

    ClusterCredentials(X509Certificate2 node, X509Certificate2 authority, string directory)
    {
        Node = node;
        Authority = authority;
        Directory = directory;
    }

    /// <summary>This node's certificate, with its private key.</summary>
    public X509Certificate2 Node { get; }
    public X509Certificate2 Authority { get; }
    public string Directory { get; }

    /// <summary>Reads a directory written by <see cref="Create"/> (or mounted from a Secret); errors name the file.</summary>
    public static ClusterCredentials Load(string directory)
    {
        string Need(string name)
        {
            string path = Path.Combine(directory, name);
            if (!File.Exists(path)) throw new ConfigException($"TLS credentials: '{path}' is missing (security.mode = tls needs {AuthorityFile}, {CertificateFile} and {KeyFile}; `dtrain certs --out {directory}` writes them)");
            return path;
        }
        string ca = Need(AuthorityFile), crt = Need(CertificateFile), key = Need(KeyFile);
        try
        {
            var authority = X509CertificateLoader.LoadCertificateFromFile(ca);
            using var pem = X509Certificate2.CreateFromPemFile(crt, key);
            // Through PKCS#12 so the key is a persisted one, which every TLS stack here takes.
            var node = X509CertificateLoader.LoadPkcs12(pem.Export(X509ContentType.Pkcs12), null);
            var credentials = new ClusterCredentials(node, authority, directory);
            if (!credentials.Accepts(node, out string why))
                throw new ConfigException($"TLS credentials: '{crt}' is not signed by '{ca}': {why}");
            return credentials;
        }
        catch (CryptographicException e)
        {
            throw new ConfigException($"TLS credentials in '{directory}' cannot be read: {e.Message}");
        }
    }

    /// <summary>
    /// Writes a new certificate authority and one node certificate signed by it (server and client use, valid for
    /// <paramref name="days"/>), as PEM files. Every node of a cluster may share the node certificate.
    /// </summary>
    public static void Create(string directory, IEnumerable<string> dnsNames, int days = 365)
    {
        System.IO.Directory.CreateDirectory(directory);
        var now = DateTimeOffset.UtcNow.AddMinutes(-5);
        using var caKey = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var caRequest = new CertificateRequest($"CN=dtrain cluster CA {Guid.NewGuid():N}", caKey, HashAlgorithmName.SHA256);
        caRequest.CertificateExtensions.Add(new X509BasicConstraintsExtension(true, true, 0, true));
        caRequest.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.KeyCertSign | X509KeyUsageFlags.CrlSign, true));
        caRequest.CertificateExtensions.Add(new X509SubjectKeyIdentifierExtension(caRequest.PublicKey, false));
        using var ca = caRequest.CreateSelfSigned(now, now.AddDays(days));

        using var nodeKey = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var nodeRequest = new CertificateRequest("CN=dtrain node", nodeKey, HashAlgorithmName.SHA256);
        nodeRequest.CertificateExtensions.Add(new X509BasicConstraintsExtension(false, false, 0, true));
        nodeRequest.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.DigitalSignature | X509KeyUsageFlags.KeyAgreement, true));
        nodeRequest.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension(
            [new Oid("1.3.6.1.5.5.7.3.1"), new Oid("1.3.6.1.5.5.7.3.2")], false));   // server and client authentication
        var names = new SubjectAlternativeNameBuilder();
        names.AddDnsName("localhost");
        names.AddIpAddress(System.Net.IPAddress.Loopback);
        foreach (var name in dnsNames) names.AddDnsName(name);
        nodeRequest.CertificateExtensions.Add(names.Build());
        using var node = nodeRequest.Create(ca, now, now.AddDays(days), RandomNumberGenerator.GetBytes(16));

        File.WriteAllText(Path.Combine(directory, AuthorityFile), ca.ExportCertificatePem());
        WritePrivate(Path.Combine(directory, AuthorityKeyFile), caKey.ExportPkcs8PrivateKeyPem());
        File.WriteAllText(Path.Combine(directory, CertificateFile), node.ExportCertificatePem());
        WritePrivate(Path.Combine(directory, KeyFile), nodeKey.ExportPkcs8PrivateKeyPem());
    }

    static void WritePrivate(string path, string pem)
    {
        File.WriteAllText(path, pem);
        if (!OperatingSystem.IsWindows()) File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite);
    }

    /// <summary>Whether <paramref name="certificate"/> chains to this cluster's authority; <paramref name="reason"/> says why not.</summary>
    public bool Accepts(X509Certificate? certificate, out string reason)
    {
        if (certificate is null) { reason = "the peer presented no certificate"; return false; }
        var peer = certificate as X509Certificate2 ?? X509CertificateLoader.LoadCertificate(certificate.GetRawCertData());
        try
        {
            using var chain = new X509Chain();
            chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
            chain.ChainPolicy.CustomTrustStore.Add(Authority);
            chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
            if (chain.Build(peer)) { reason = ""; return true; }
            reason = $"'{peer.Subject}' (issued by '{peer.Issuer}') does not chain to the cluster's CA '{Authority.Subject}': " +
                string.Join("; ", chain.ChainStatus.Select(s => s.StatusInformation.Trim()).Where(s => s.Length > 0).Distinct());
            return false;
        }
        finally
        {
            if (!ReferenceEquals(peer, certificate)) peer.Dispose();
        }
    }

    /// <summary>TLS for an accepting socket: this node's certificate, a client certificate of the cluster's CA required.</summary>
    public SslServerAuthenticationOptions ServerOptions() => new()
    {
        ServerCertificate = Node,
        ClientCertificateRequired = true,
        EnabledSslProtocols = SslProtocols.Tls12 | SslProtocols.Tls13,
        CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
        RemoteCertificateValidationCallback = (_, certificate, _, _) => Accepts(certificate, out _),
    };

    /// <summary>TLS for a connecting socket: presents this node's certificate, accepts a server of the cluster's CA.</summary>
    public SslClientAuthenticationOptions ClientOptions(string targetHost) => new()
    {
        TargetHost = targetHost,
        ClientCertificates = [Node],
        // Our certificate whatever issuers the server lists (it lists none: the cluster's CA is in no store).
        LocalCertificateSelectionCallback = (_, _, _, _, _) => Node,
        EnabledSslProtocols = SslProtocols.Tls12 | SslProtocols.Tls13,
        CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
        RemoteCertificateValidationCallback = (_, certificate, _, _) => Accepts(certificate, out _),
    };

    public void Dispose()
    {
        Node.Dispose();
        Authority.Dispose();
    }
}
