using System.CommandLine;
using System.Diagnostics;
using System.Text.Json;
using Distributed.Comm;
using Distributed.Comm.Kernels;

namespace Distributed.Cli;

/// <summary><c>dtrain bench</c>: measurements the bench/ scripts put side by side with their peers.</summary>
static class BenchCommand
{
    public static Command Create()
    {
        var kernels = new Command("kernels", "reduction kernels (SIMD, ILGPU, scalar) against memory bandwidth");
        var maxMib = new Option<int>("--max-mib") { DefaultValueFactory = _ => 64 };
        kernels.Add(maxMib);
        kernels.SetAction(parse => KernelBenchmark.Run(Console.Out, parse.GetValue(maxMib)));

        var ranks = new Option<int>("--ranks") { DefaultValueFactory = _ => 2 };
        var iters = new Option<int>("--iters") { DefaultValueFactory = _ => 10 };
        var transport = new Option<string>("--transport") { DefaultValueFactory = _ => "tcp" };
        var rank = new Option<int>("--rank") { Hidden = true };
        var rendezvous = new Option<string?>("--rendezvous") { Hidden = true };
        var sizes = new Option<string>("--sizes")
        {
            Description = "comma-separated buffer sizes in bytes, each a multiple of 4 (float32); under 1 MiB more iterations run: " +
                "ITERS x 1 MiB / size, at most 2000 (the peers' rule), never fewer than ITERS",
            DefaultValueFactory = _ => string.Join(',', DefaultSizes),
        };
        sizes.Validators.Add(result =>
        {
            if (ParseSizes(result.GetValueOrDefault<string>()) is { Error: { } error }) result.AddError(error);
        });
        var allReduce = new Command("allreduce", "our ring all-reduce between real processes on loopback: 4 B to 64 MiB of float32")
            { ranks, iters, transport, sizes, rank, rendezvous };
        // Where the one-shot algorithm hands over to the ring; the bench that chose the default sets it (bench/allreduce-algorithms).
        var oneShotMax = new Option<long?>("--one-shot-max-bytes");
        allReduce.Add(oneShotMax);
        // The ring's chunk (CollectiveOptions.ChunkBytes), to choose its default by measurement.
        var chunkBytes = new Option<int?>("--chunk-bytes");
        allReduce.Add(chunkBytes);
        var security = new Option<string>("--security") { Description = "none or tls (mutual TLS on gRPC and on the raw-TCP bulk path)", DefaultValueFactory = _ => "none" };
        allReduce.Add(security);
        allReduce.SetAction((parse, ct) => AllReduceAsync(parse.GetValue(ranks), parse.GetValue(iters), parse.GetValue(transport)!,
            ParseSizes(parse.GetValue(sizes)!).Sizes!, parse.GetValue(oneShotMax), parse.GetValue(chunkBytes), parse.GetValue(rank), parse.GetValue(rendezvous),
            Distributed.Comm.Security.SecurityModes.Parse(parse.GetValue(security)!) == Distributed.Comm.Security.SecurityMode.Tls, ct));

        var config = new Option<string>("--config") { DefaultValueFactory = _ => "cluster-config/shakespeare-char.conf" };
        var set = new Option<string[]>("--set") { Description = "override a config key (the model's size, run.dir)" };
        var repeats = new Option<int>("--repeats") { DefaultValueFactory = _ => 5 };
        var steps = new Option<int>("--steps") { DefaultValueFactory = _ => 20 };
        var checkpoint = new Command("checkpoint", "checkpoint write throughput against a raw write, and step time while a checkpoint is written")
            { config, set, repeats, steps };
        checkpoint.SetAction(parse => CheckpointBenchmark.Run(Distributed.Cluster.Config.JobConfigLoader.Load(parse.GetValue(config)!, parse.GetValue(set)),
            parse.GetValue(repeats), parse.GetValue(steps)));

        return new Command("bench", "benchmarks (the bench/ scripts call these)") { kernels, allReduce, checkpoint };
    }

    static readonly long[] DefaultSizes = [4, 4096, 65536, 262144, 1 << 20, 4 << 20, 16 << 20, 64 << 20];

    static (long[]? Sizes, string? Error) ParseSizes(string? text)
    {
        var sizes = new List<long>();
        foreach (var part in (text ?? "").Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            if (!long.TryParse(part, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out long bytes))
                return (null, $"--sizes: '{part}' is not a number of bytes");
            if (bytes < sizeof(float) || bytes % sizeof(float) != 0 || bytes > (long)Array.MaxLength * sizeof(float))
                return (null, $"--sizes: {bytes} bytes is not a whole number of float32 values (4 bytes or more, a multiple of 4)");
            sizes.Add(bytes);
        }
        return sizes.Count == 0 ? (null, "--sizes: give at least one size in bytes") : (sizes.ToArray(), null);
    }

    /// <summary>Calls timed at one size: ITERS from 1 MiB up; below, ITERS x 1 MiB / size capped at 2000, as the peers do, and never fewer than ITERS.</summary>
    static int Repetitions(int iterations, long bytes) =>
        bytes >= 1 << 20 ? iterations : (int)Math.Max(iterations, Math.Min(2000, (long)iterations * (1 << 20) / bytes));

    /// <summary>
    /// Rank 0 starts ranks 1..n-1 as processes; they meet through endpoint files in a temporary directory. Each size
    /// is timed like the peers time theirs: a barrier, one all-reduce, the slowest rank's time; the median is reported.
    /// </summary>
    /// <param name="tls">mutual TLS with a CA rank 0 creates in the rendezvous directory</param>
    static async Task<int> AllReduceAsync(int n, int iterations, string transport, long[] sizes, long? oneShotMaxBytes, int? chunkBytes, int rank, string? rendezvous,
        bool tls, CancellationToken ct)
    {
        var kind = TransportKinds.Parse(transport);
        var children = new List<Process>();
        if (rendezvous is null)
        {
            rendezvous = Directory.CreateTempSubdirectory("dtrain-allreduce-").FullName;
            if (tls) Distributed.Comm.Security.ClusterCredentials.Create(Path.Combine(rendezvous, "certs"), []);
            for (int r = 1; r < n; r++)
            {
                string[] child = ["bench", "allreduce", "--ranks", $"{n}", "--iters", $"{iterations}", "--transport", transport,
                    "--sizes", string.Join(',', sizes), "--rank", $"{r}", "--rendezvous", rendezvous, "--security", tls ? "tls" : "none",
                    .. (oneShotMaxBytes is { } limit ? new[] { "--one-shot-max-bytes", $"{limit}" } : []),
                    .. (chunkBytes is { } chunk ? new[] { "--chunk-bytes", $"{chunk}" } : [])];
                children.Add(Process.Start(SelfProcess.StartInfo(child))!);
            }
        }
        try
        {
            using var credentials = tls ? Distributed.Comm.Security.ClusterCredentials.Load(Path.Combine(rendezvous, "certs")) : null;
            await using var node = await DataPlaneNode.StartAsync(cancellationToken: ct, credentials: credentials);
            File.WriteAllText(Path.Combine(rendezvous, $"rank-{rank}.tmp"), node.Endpoint);
            File.Move(Path.Combine(rendezvous, $"rank-{rank}.tmp"), Path.Combine(rendezvous, $"rank-{rank}"));
            var endpoints = new string[n];
            for (int r = 0; r < n; r++)
            {
                string file = Path.Combine(rendezvous, $"rank-{r}");
                var deadline = Stopwatch.StartNew();
                while (!File.Exists(file))
                {
                    if (deadline.Elapsed > TimeSpan.FromSeconds(60)) throw new TimeoutException($"rank {r} did not start");
                    await Task.Delay(50, ct);
                }
                endpoints[r] = File.ReadAllText(file);
            }
            node.BeginGeneration(1, rank, n);
            await using var links = new PeerLinks(node, 1, endpoints, kind);
            var group = new ProcessGroup(links, 0, Enumerable.Range(0, n).ToArray(), new CollectiveOptions { OneShotMaxBytes = oneShotMaxBytes, ChunkBytes = chunkBytes ?? new CollectiveOptions().ChunkBytes });
            foreach (long bytes in sizes)
            {
                var buffer = new float[bytes / sizeof(float)];
                var times = new List<double>();
                int repetitions = Repetitions(iterations, bytes);
                for (int i = -1; i < repetitions; i++)   // i = -1 warms up
                {
                    Array.Fill(buffer, rank + 1);
                    await group.BarrierAsync(ct);
                    var clock = Stopwatch.StartNew();
                    await group.AllReduceAsync(buffer, ReduceOp.Sum, ct);
                    var all = new float[n];
                    await group.AllGatherAsync(new[] { (float)clock.Elapsed.TotalSeconds }, all, ct);
                    if (i >= 0) times.Add(all.Max());   // the slowest rank's time, as the peers report
                }
                float expected = n * (n + 1) / 2f;
                if (buffer[0] != expected || buffer[^1] != expected) throw new InvalidOperationException($"wrong sum {buffer[0]} (expected {expected})");
                times.Sort();
                double median = times[times.Count / 2];
                double algbw = bytes / median / 1e9;
                if (rank == 0)
                    Console.WriteLine(JsonSerializer.Serialize(new
                    {
                        impl = $"dtrain-{transport}", ranks = n, bytes, iters = repetitions, sec_per_call = Math.Round(median, 9),
                        algbw_GBps = Math.Round(algbw, 3), busbw_GBps = Math.Round(algbw * 2 * (n - 1) / n, 3),
                    }));
            }
            await group.BarrierAsync(ct);
            return 0;
        }
        finally
        {
            foreach (var c in children)
            {
                using var deadline = CancellationTokenSource.CreateLinkedTokenSource(ct);
                deadline.CancelAfter(TimeSpan.FromSeconds(30));
                try { await c.WaitForExitAsync(deadline.Token); }
                catch (OperationCanceledException) { c.Kill(entireProcessTree: true); }
                c.Dispose();
            }
            if (rank == 0) Directory.Delete(rendezvous, recursive: true);
        }
    }
}
