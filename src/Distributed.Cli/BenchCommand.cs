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
        var allReduce = new Command("allreduce", "our ring all-reduce between real processes on loopback: 1, 4, 16, 64 MiB of float32")
            { ranks, iters, transport, rank, rendezvous };
        allReduce.SetAction((parse, ct) => AllReduceAsync(parse.GetValue(ranks), parse.GetValue(iters), parse.GetValue(transport)!,
            parse.GetValue(rank), parse.GetValue(rendezvous), ct));

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

    /// <summary>
    /// Rank 0 starts ranks 1..n-1 as processes; they meet through endpoint files in a temporary directory. Each size
    /// is timed like the peers time theirs: a barrier, one all-reduce, the slowest rank's time; the median is reported.
    /// </summary>
    static async Task<int> AllReduceAsync(int n, int iterations, string transport, int rank, string? rendezvous, CancellationToken ct)
    {
        var kind = TransportKinds.Parse(transport);
        var children = new List<Process>();
        if (rendezvous is null)
        {
            rendezvous = Directory.CreateTempSubdirectory("dtrain-allreduce-").FullName;
            for (int r = 1; r < n; r++)
            {
                children.Add(Process.Start(SelfProcess.StartInfo("bench", "allreduce", "--ranks", $"{n}", "--iters", $"{iterations}",
                    "--transport", transport, "--rank", $"{r}", "--rendezvous", rendezvous))!);
            }
        }
        try
        {
            await using var node = await DataPlaneNode.StartAsync(cancellationToken: ct);
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
            node.BeginGeneration(1, rank);
            await using var links = new PeerLinks(node, 1, endpoints, kind);
            var group = new ProcessGroup(links, 0, Enumerable.Range(0, n).ToArray());
            foreach (int mib in new[] { 1, 4, 16, 64 })
            {
                var buffer = new float[mib * (1 << 20) / sizeof(float)];
                var times = new List<double>();
                for (int i = -1; i < iterations; i++)   // i = -1 warms up
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
                double median = times[times.Count / 2], bytes = mib * (1 << 20);
                double algbw = bytes / median / 1e9;
                if (rank == 0)
                    Console.WriteLine(JsonSerializer.Serialize(new
                    {
                        impl = $"dtrain-{transport}", ranks = n, bytes = (long)bytes, sec_per_call = Math.Round(median, 6),
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
