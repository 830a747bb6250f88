using System.Diagnostics;

namespace Distributed.Tests;

/// <summary>
/// A test that builds hosts in network namespaces (<see cref="TestNetwork"/>): needs root and the ip, unshare and nft
/// tools. Skipped with the reason elsewhere; in CI ($CI set, where .ci/run installs nftables and runs as root) a
/// missing piece fails the test instead.
/// </summary>
public sealed class NetworkNamespacesFactAttribute : FactAttribute
{
    static readonly Lazy<string?> Missing = new(() =>
    {
        if (!OperatingSystem.IsLinux()) return "network namespaces are Linux only";
        if (Environment.UserName != "root") return "needs root (network namespaces, veth pairs, nftables)";
        var missing = new[] { ("ip", new[] { "-V" }), ("unshare", new[] { "--version" }), ("nft", new[] { "--version" }) }
            .Where(t => !TestProcesses.Works(t.Item1, t.Item2)).Select(t => t.Item1).ToList();
        return missing.Count == 0 ? null : $"needs {string.Join(", ", missing)} (Debian: iproute2, util-linux, nftables; .ci/run installs them)";
    });

    public NetworkNamespacesFactAttribute()
    {
        if (Missing.Value is { } reason && (string.IsNullOrEmpty(Environment.GetEnvironmentVariable("CI")) || Environment.UserName != "root")) Skip = reason;
    }
}

/// <summary>
/// Hosts on one machine, as a Kubernetes cluster's nodes look to its pods: each a network namespace with one address
/// on a shared bridge (10.77.0.N/24, a private test range that exists only inside these namespaces), its own hostname
/// (every process runs in a UTS namespace of its own, so workers on different "hosts" never pick shared memory) and a
/// hosts file standing in for cluster DNS. Faults: nftables drop rules cut a host off (a partition). Everything it made
/// (namespaces, hosts files, processes) is removed on Dispose, and what a killed test run left is removed on the next.
/// </summary>
sealed class TestNetwork : IDisposable
{
    const string Subnet = "10.77.0";
    const string Prefix = "dtrain-";
    static int _instances;
    readonly string _name;
    readonly int _hosts;
    readonly Dictionary<string, int> _dns = [];
    readonly List<Process> _processes = [];

    public TestNetwork(int hosts)
    {
        RemoveLeftovers();
        _hosts = hosts;
        _name = $"{Prefix}{Environment.ProcessId}-{Interlocked.Increment(ref _instances)}";
        try
        {
            Ip("netns", "add", Bridge);
            Ip("-n", Bridge, "link", "add", "br0", "type", "bridge");
            Ip("-n", Bridge, "link", "set", "br0", "up");
            for (int h = 1; h <= hosts; h++)
            {
                Ip("netns", "add", Namespace(h));
                Ip("-n", Bridge, "link", "add", $"v{h}", "type", "veth", "peer", "name", "eth0", "netns", Namespace(h));
                Ip("-n", Bridge, "link", "set", $"v{h}", "master", "br0", "up");
                Ip("-n", Namespace(h), "addr", "add", $"{Address(h)}/24", "dev", "eth0");
                Ip("-n", Namespace(h), "link", "set", "eth0", "up");
                Ip("-n", Namespace(h), "link", "set", "lo", "up");
                // `ip netns exec` bind-mounts these over /etc/hosts and /etc/resolv.conf: names resolve from the hosts
                // file only (no name server answers inside the namespace).
                Directory.CreateDirectory(EtcDirectory(h));
                File.WriteAllText(Path.Combine(EtcDirectory(h), "resolv.conf"), "");
            }
            WriteHostsFiles();
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    string Bridge => _name + "-br";
    string Namespace(int host) => $"{_name}-h{host}";
    string EtcDirectory(int host) => Path.Combine("/etc/netns", Namespace(host));

    public string Address(int host) => $"{Subnet}.{host}";
    public static string Hostname(int host) => $"node{host}";

    /// <summary>Adds a DNS name for <paramref name="host"/> on every host (a pod's record appearing in cluster DNS).</summary>
    public void AddName(string name, int host)
    {
        _dns[name] = host;
        WriteHostsFiles();
    }

    /// <summary>In place (same inode): processes already running in a namespace see the bind-mounted file change.</summary>
    void WriteHostsFiles()
    {
        for (int h = 1; h <= _hosts; h++)
        {
            var lines = new List<string> { "127.0.0.1 localhost", $"{Address(h)} {Hostname(h)}" };
            lines.AddRange(_dns.Select(kv => $"{Address(kv.Value)} {kv.Key}"));
            using var file = new FileStream(Path.Combine(EtcDirectory(h), "hosts"), FileMode.OpenOrCreate, FileAccess.Write);
            file.SetLength(0);
            using var writer = new StreamWriter(file);
            writer.Write(string.Join('\n', lines) + "\n");
        }
    }

    /// <summary>
    /// Starts `dtrain ARGS` on <paramref name="host"/> (its own hostname, POD_IP = the host's address), output to
    /// <paramref name="log"/>.
    /// </summary>
    public Process StartDtrain(int host, IEnumerable<string> args, string log, IReadOnlyDictionary<string, string>? environment = null)
    {
        var info = new ProcessStartInfo("ip") { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in new[] { "netns", "exec", Namespace(host), "unshare", "--uts", "--", "sh", "-c", "hostname \"$0\" && exec \"$@\"", Hostname(host),
                     "dotnet", Path.Combine(AppContext.BaseDirectory, "dtrain.dll") }.Concat(args))
            info.ArgumentList.Add(a);
        info.Environment["CI"] = "true";
        info.Environment["DOTNET_gcServer"] = "0";
        info.Environment["POD_IP"] = Address(host);
        foreach (var (k, v) in environment ?? new Dictionary<string, string>()) info.Environment[k] = v;
        var process = Process.Start(info)!;
        var writer = new StreamWriter(log, append: true) { AutoFlush = true };
        void Keep(string? line) { if (line is not null) lock (writer) writer.WriteLine(line); }
        process.OutputDataReceived += (_, e) => Keep(e.Data);
        process.ErrorDataReceived += (_, e) => Keep(e.Data);
        process.Exited += (_, _) => { lock (writer) writer.Dispose(); };
        process.EnableRaisingEvents = true;
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        lock (_processes) _processes.Add(process);
        return process;
    }

    /// <summary>An HTTP GET from inside <paramref name="fromHost"/> (bash's /dev/tcp: no client needed): the status line, or the error.</summary>
    public string HttpGet(int fromHost, int toHost, int port, string path)
    {
        string script = $"exec 3<>/dev/tcp/{Address(toHost)}/{port} && printf 'GET {path} HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n' >&3 && head -n 1 <&3";
        var result = TestProcesses.Run("ip", ["netns", "exec", Namespace(fromHost), "timeout", "5", "bash", "-c", script], TimeSpan.FromSeconds(10));
        return result.ExitCode == 0 ? result.Stdout.Trim() : $"failed ({result.ExitCode}): {result.Stderr.Trim()}";
    }

    /// <summary>Cuts <paramref name="host"/> off from every other host: each side drops what the other sends (nftables, on input).</summary>
    public void Partition(int host)
    {
        for (int h = 1; h <= _hosts; h++)
        {
            var from = h == host ? Enumerable.Range(1, _hosts).Where(o => o != host).Select(Address) : [Address(host)];
            string rules = $"table inet dtrain_partition {{ chain input {{ type filter hook input priority 0; policy accept; ip saddr {{ {string.Join(", ", from)} }} drop; }}; }}";
            var result = TestProcesses.Run("ip", ["netns", "exec", Namespace(h), "nft", "-f", "-"], TimeSpan.FromSeconds(10), stdin: rules);
            if (result.ExitCode != 0) throw new InvalidOperationException($"nft on {Namespace(h)}: {result.Output}");
        }
    }

    public void Heal()
    {
        for (int h = 1; h <= _hosts; h++) TestProcesses.Run("ip", ["netns", "exec", Namespace(h), "nft", "delete", "table", "inet", "dtrain_partition"], TimeSpan.FromSeconds(10));
    }

    public void Dispose()
    {
        lock (_processes)
        {
            foreach (var p in _processes)
            {
                try { if (!p.HasExited) p.Kill(entireProcessTree: true); p.WaitForExit(5000); }
                catch (InvalidOperationException) { }
                p.Dispose();
            }
            _processes.Clear();
        }
        Remove(_name);
    }

    static void Ip(params string[] args)
    {
        var result = TestProcesses.Run("ip", args, TimeSpan.FromSeconds(10));
        if (result.ExitCode != 0) throw new InvalidOperationException($"ip {string.Join(' ', args)}: {result.Output}");
    }

    /// <summary>Namespaces (and their /etc/netns files) of this network, or of a test process that no longer exists.</summary>
    static void Remove(string name)
    {
        foreach (var ns in Namespaces().Where(n => n == name + "-br" || n.StartsWith(name + "-h", StringComparison.Ordinal)))
            TestProcesses.Run("ip", ["netns", "del", ns], TimeSpan.FromSeconds(10));
        if (Directory.Exists("/etc/netns"))
            foreach (var dir in Directory.GetDirectories("/etc/netns", name + "-h*")) Directory.Delete(dir, recursive: true);
    }

    static void RemoveLeftovers()
    {
        foreach (var ns in Namespaces().Where(n => n.StartsWith(Prefix, StringComparison.Ordinal)))
        {
            var parts = ns[Prefix.Length..].Split('-');
            if (parts.Length >= 3 && int.TryParse(parts[0], out int pid) && !Directory.Exists($"/proc/{pid}")) Remove($"{Prefix}{parts[0]}-{parts[1]}");
        }
    }

    static IEnumerable<string> Namespaces() =>
        TestProcesses.Run("ip", ["netns", "list"], TimeSpan.FromSeconds(10)).Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => l.Split(' ')[0]);
}
