using System.Diagnostics;
using System.Net.Security;
using System.Net.Sockets;
using System.Security.Cryptography.X509Certificates;
using Distributed.Comm;
using Distributed.Comm.Security;
using Distributed.Core;
using Xunit.Abstractions;

namespace Distributed.Tests;

/// <summary>
/// security.mode = tls: only holders of a certificate of the cluster's CA get in, on Akka remoting (real processes)
/// and on the data plane (real sockets: gRPC and the raw-TCP bulk path).
/// </summary>
public class SecurityTests(ITestOutputHelper output)
{
    static string NewCa(string name)
    {
        string dir = TestSupport.TempDir(name);
        ClusterCredentials.Create(dir, []);
        return dir;
    }

    [Fact]
    public void CredentialsAcceptOnlyCertificatesOfTheirOwnCa()
    {
        using var ours = ClusterCredentials.Load(NewCa("ca-ours"));
        using var theirs = ClusterCredentials.Load(NewCa("ca-theirs"));
        Assert.True(ours.Accepts(ours.Node, out _));
        Assert.False(ours.Accepts(theirs.Node, out string why));
        Assert.Contains("does not chain to the cluster's CA", why);
        Assert.False(ours.Accepts(null, out why));
        Assert.Contains("no certificate", why);
        // A directory without the key is a clear error naming the file.
        string broken = NewCa("ca-broken");
        File.Delete(Path.Combine(broken, ClusterCredentials.KeyFile));
        var error = Assert.Throws<ConfigException>(() => ClusterCredentials.Load(broken));
        Assert.Contains(ClusterCredentials.KeyFile, error.Message);
    }

    [Theory]
    [InlineData(TransportKind.Tcp)]
    [InlineData(TransportKind.Grpc)]
    public async Task TheDataPlaneUnderTlsServesItsClusterAndRefusesStrangers(TransportKind transport)
    {
        using var ours = ClusterCredentials.Load(NewCa("dp-ours"));
        using var theirs = ClusterCredentials.Load(NewCa("dp-theirs"));
        var nodes = await Task.WhenAll(Enumerable.Range(0, 2).Select(_ => DataPlaneNode.StartAsync(credentials: ours)));
        var intruder = await DataPlaneNode.StartAsync(credentials: theirs);
        var plain = await DataPlaneNode.StartAsync();
        try
        {
            var endpoints = nodes.Select(n => n.Endpoint).ToArray();
            Assert.All(endpoints, e => Assert.StartsWith("https://", e));
            for (int r = 0; r < 2; r++) nodes[r].BeginGeneration(5, r, 2);
            await using (var links0 = new PeerLinks(nodes[0], 5, endpoints, transport))
            await using (var links1 = new PeerLinks(nodes[1], 5, endpoints, transport))
            {
                var options = new CollectiveOptions { Timeout = TimeSpan.FromSeconds(20) };
                var groups = new[] { new ProcessGroup(links0, 0, [0, 1], options), new ProcessGroup(links1, 0, [0, 1], options) };
                var buffers = new[] { Enumerable.Range(0, 300_000).Select(i => (float)(i % 13)).ToArray(), Enumerable.Range(0, 300_000).Select(i => (float)(i % 7)).ToArray() };
                await Task.WhenAll(groups.Select((g, r) => g.AllReduceAsync(buffers[r], ReduceOp.Sum)));
                for (int i = 0; i < 300_000; i++) Assert.Equal(i % 13 + i % 7, buffers[1][i]);
                Assert.Equal(buffers[0], buffers[1]);

                // A node of another CA, and one without TLS, claiming rank 0 of this generation: refused before any byte is delivered.
                foreach (var stranger in new[] { intruder, plain })
                {
                    stranger.BeginGeneration(5, 0, 2);
                    string[] strangerView = [stranger.Endpoint, endpoints[1].Replace("https://", stranger.Credentials is null ? "http://" : "https://")];
                    await using var strangerLinks = new PeerLinks(stranger, 5, strangerView, transport);
                    var refused = await Assert.ThrowsAsync<PeerFailedException>(() =>
                        strangerLinks.SendAsync(1, new ChunkHeader(5, 0, 0, 0, 0, 0), new byte[16], TimeSpan.FromSeconds(5), CancellationToken.None));
                    Assert.Equal(1, refused.Rank);
                    output.WriteLine($"{(stranger.Credentials is null ? "no TLS" : "another CA")}: {refused.Message}");
                }
            }

            // The gRPC server itself refuses a client of another CA, and one without a certificate, even if they would accept it.
            foreach (var certificate in new[] { theirs.Node, null })
            {
                var options = theirs.ClientOptions("127.0.0.1");
                options.RemoteCertificateValidationCallback = (_, _, _, _) => true;
                options.ClientCertificates = certificate is null ? [] : [certificate];
                options.LocalCertificateSelectionCallback = (_, _, _, _, _) => certificate!;
                using var channel = Grpc.Net.Client.GrpcChannel.ForAddress(endpoints[1], new Grpc.Net.Client.GrpcChannelOptions
                {
                    HttpHandler = new SocketsHttpHandler { SslOptions = options },
                });
                var client = new Distributed.Comm.Protos.DataPlane.DataPlaneClient(channel);
                var refused = await Assert.ThrowsAsync<Grpc.Core.RpcException>(async () =>
                    await client.HelloAsync(new Distributed.Comm.Protos.HelloRequest { Generation = 5, SourceRank = 0 }, deadline: DateTime.UtcNow.AddSeconds(10)));
                output.WriteLine($"gRPC client {(certificate is null ? "without a certificate" : "of another CA")}: {refused.StatusCode} {refused.Status.Detail}");
            }

            // The bulk port: a plain connection, and a TLS client of another CA, are closed without effect.
            long before = nodes[1].Counters.Rejected;
            using (var socket = new Socket(SocketType.Stream, ProtocolType.Tcp))
            {
                await socket.ConnectAsync("127.0.0.1", nodes[1].BulkPort);
                await socket.SendAsync(new byte[DataPlaneNode.BulkPreambleBytes + DataPlaneNode.BulkHeaderBytes], SocketFlags.None);
                using var quick = new CancellationTokenSource(TimeSpan.FromSeconds(15));
                try { Assert.Equal(0, await socket.ReceiveAsync(new byte[64], SocketFlags.None, quick.Token)); }
                catch (SocketException) { }   // reset: closed all the same
            }
            using (var client = new TcpClient())
            {
                await client.ConnectAsync("127.0.0.1", nodes[1].BulkPort);
                await using var tls = new SslStream(client.GetStream());
                var options = theirs.ClientOptions("127.0.0.1");
                options.RemoteCertificateValidationCallback = (_, _, _, _) => true;   // the intruder would take any server
                var error = await Record.ExceptionAsync(async () =>
                {
                    await tls.AuthenticateAsClientAsync(options);
                    await tls.WriteAsync(new byte[DataPlaneNode.BulkPreambleBytes]);
                    Assert.Equal(0, await tls.ReadAsync(new byte[1]));   // TLS 1.3 reports the refusal on the first read
                });
                output.WriteLine($"bulk TLS client of another CA: {error?.GetType().Name ?? "closed"}: {error?.Message}");
            }
            Assert.True(nodes[1].Counters.Rejected >= before + 2, $"the bulk port counted {nodes[1].Counters.Rejected - before} refusals");
        }
        finally
        {
            foreach (var n in nodes) await n.DisposeAsync();
            await intruder.DisposeAsync();
            await plain.DisposeAsync();
        }
    }

    /// <summary>Starts dtrain as a process, its output collected.</summary>
    static (Process Process, System.Text.StringBuilder Output) Start(string workingDirectory, params string[] args)
    {
        var info = new ProcessStartInfo("dotnet") { WorkingDirectory = workingDirectory, RedirectStandardOutput = true, RedirectStandardError = true };
        info.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "dtrain.dll"));
        foreach (var a in args) info.ArgumentList.Add(a);
        info.Environment["CI"] = "true";
        var process = Process.Start(info)!;
        var text = new System.Text.StringBuilder();
        process.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (text) text.AppendLine(e.Data); };
        process.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (text) text.AppendLine(e.Data); };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        return (process, text);
    }

    [Fact]
    public async Task AkkaRefusesNodesWithoutACertificateOfTheClustersCa()
    {
        string dir = TestSupport.TempDir("tls-akka");
        string otherCa = NewCa("tls-akka-other");
        // A TLS job long enough to be running while strangers try to join it.
        var (job, jobOutput) = Start(dir, TestSupport.TrainArgs(dir, 2, ["security.mode=tls", "train.max-iters=400", "optimizer.lr-decay-iters=400",
            "train.eval-interval=400", "checkpoint.every=400"]));
        try
        {
            var clock = Stopwatch.StartNew();
            string? seed = null;
            while (seed is null && clock.Elapsed < TimeSpan.FromMinutes(2) && !job.HasExited)
            {
                lock (jobOutput)
                    if (System.Text.RegularExpressions.Regex.Match(jobOutput.ToString(), @"akka\.ssl\.tcp://dtrain@([0-9.]+:[0-9]+)") is { Success: true } m) seed = m.Groups[1].Value;
                await Task.Delay(200);
            }
            Assert.True(seed is not null, $"the job printed no akka.ssl.tcp seed:\n{jobOutput}");

            // One without TLS, one with a certificate of another CA: neither joins; each gives up at its join deadline.
            var strangers = new[]
            {
                Start(dir, "worker", "--seed", seed!, "--join-timeout", "10", "--security", "none"),
                Start(dir, "worker", "--seed", seed!, "--join-timeout", "10", "--security", "tls", "--certs", otherCa),
            };
            foreach (var (process, text) in strangers)
            {
                Assert.True(process.WaitForExit(TimeSpan.FromSeconds(90)), $"a stranger was still running after 90 s:\n{text}");
                Assert.True(process.ExitCode == ExitCodes.Retry, $"exit {process.ExitCode}:\n{text}");
                Assert.DoesNotContain("reduces with", text.ToString());   // it never got a rank
            }
            // The one of another CA fails the handshake on the cluster's certificate (each side checks the other against its own CA).
            Assert.Contains("TLS handshake failed", strangers[1].Output.ToString());

            Assert.True(job.WaitForExit(TimeSpan.FromMinutes(4)), $"the job did not finish:\n{jobOutput}");
            Assert.True(job.ExitCode == 0, $"exit {job.ExitCode}\n{jobOutput}");
            var spec = Distributed.Cluster.Config.JobConfigLoader.Load(Path.Combine(dir, "job.conf"));
            var journal = await Distributed.Cluster.JournalReader.ReadAsync(spec, TimeSpan.FromSeconds(30));
            Assert.DoesNotContain(journal, e => e.Event is Distributed.Cluster.GenerationStarted { Generation: > 1 });   // no stranger disturbed the job
            output.WriteLine($"strangers refused; the job ran to the end in one generation ({clock.Elapsed.TotalSeconds:0} s)");
        }
        finally
        {
            if (!job.HasExited) job.Kill(entireProcessTree: true);
        }
    }
}
