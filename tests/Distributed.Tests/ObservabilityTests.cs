using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace Distributed.Tests;

/// <summary>
/// A real 2-worker `dtrain train` with /metrics and the status page on (any free ports): long enough to be watched,
/// stopped when the tests are done.
/// </summary>
public sealed class LiveRun : IDisposable
{
    readonly Process _process;

    public LiveRun()
    {
        Dir = TestSupport.TempDir("live");
        var info = new ProcessStartInfo("dotnet") { WorkingDirectory = Dir, RedirectStandardOutput = true, RedirectStandardError = true };
        info.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "dtrain.dll"));
        foreach (var a in TestSupport.TrainArgs(Dir, 2, ["train.max-iters=100000", "train.eval-interval=50", "checkpoint.every=50",
            "cluster.metrics-port=-1", "cluster.status-port=-1", "cluster.report-interval=0.5"])) info.ArgumentList.Add(a);
        info.Environment["CI"] = "true";
        _process = Process.Start(info)!;
        _process.OutputDataReceived += (_, _) => { };
        _process.ErrorDataReceived += (_, _) => { };
        _process.BeginOutputReadLine();
        _process.BeginErrorReadLine();
        var deadline = Stopwatch.StartNew();
        string endpoints = Path.Combine(Dir, "endpoints.json");
        while (!File.Exists(endpoints) || new FileInfo(endpoints).Length == 0)
        {
            if (_process.HasExited || deadline.Elapsed > TimeSpan.FromSeconds(60))
                throw new InvalidOperationException($"the live run wrote no endpoints.json (exited: {_process.HasExited})");
            Thread.Sleep(100);
        }
        using var json = JsonDocument.Parse(File.ReadAllText(endpoints));
        MetricsUrl = json.RootElement.GetProperty("metrics").GetString()!;
        StatusUrl = json.RootElement.GetProperty("status").GetString()!;
    }

    public string Dir { get; }
    public string MetricsUrl { get; }
    public string StatusUrl { get; }

    public void Dispose()
    {
        try { _process.Kill(entireProcessTree: true); } catch (InvalidOperationException) { }
        _process.WaitForExit(10_000);
        _process.Dispose();
    }
}

/// <summary>Prometheus, the status page and `dtrain status` against a running 2-worker job.</summary>
public class ObservabilityTests(LiveRun run) : IClassFixture<LiveRun>
{
    static readonly HttpClient Http = new() { Timeout = TimeSpan.FromSeconds(10) };

    public sealed record Sample(string Name, Dictionary<string, string> Labels, double Value);

    static readonly Regex SampleLine = new(@"^(?<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?<labels>.*)\})? (?<value>\S+)( -?\d+)?$");
    static readonly Regex Label = new(@"\G(?<key>[a-zA-Z_][a-zA-Z0-9_]*)=""(?<value>(\\.|[^""\\])*)"",?");

    /// <summary>Parses Prometheus' text exposition format (version 0.0.4), checking every line's syntax and that samples follow their TYPE.</summary>
    public static List<Sample> ParsePrometheus(string text)
    {
        var samples = new List<Sample>();
        var types = new Dictionary<string, string>();
        foreach (var line in text.Split('\n'))
        {
            if (line.Length == 0) continue;
            if (line.StartsWith("# TYPE ", StringComparison.Ordinal))
            {
                var parts = line.Split(' ');
                Assert.True(parts.Length == 4 && parts[3] is "counter" or "gauge" or "histogram" or "summary" or "untyped", $"bad TYPE line: {line}");
                types[parts[2]] = parts[3];
                continue;
            }
            if (line.StartsWith('#')) { Assert.StartsWith("# HELP ", line); continue; }
            var m = SampleLine.Match(line);
            Assert.True(m.Success, $"not a Prometheus sample line: {line}");
            string name = m.Groups["name"].Value;
            string family = Regex.Replace(name, "_(bucket|sum|count)$", "");
            Assert.True(types.ContainsKey(name) || types.ContainsKey(family), $"{name} has no TYPE line before it");
            var labels = new Dictionary<string, string>();
            string labelText = m.Groups["labels"].Value;
            int at = 0;
            while (at < labelText.Length)
            {
                var l = Label.Match(labelText, at);
                Assert.True(l.Success && l.Index == at, $"bad labels in: {line}");
                labels[l.Groups["key"].Value] = Regex.Unescape(l.Groups["value"].Value);
                at += l.Length;
            }
            string value = m.Groups["value"].Value;
            double parsed = value switch { "+Inf" => double.PositiveInfinity, "-Inf" => double.NegativeInfinity, "NaN" => double.NaN, _ => double.Parse(value, CultureInfo.InvariantCulture) };
            samples.Add(new Sample(name, labels, parsed));
        }
        return samples;
    }

    static readonly string[] JobMetrics =
    [
        "dtrain_job_info", "dtrain_job_state", "dtrain_generation", "dtrain_step", "dtrain_max_steps", "dtrain_train_loss", "dtrain_learning_rate",
        "dtrain_grad_norm", "dtrain_tokens_per_second", "dtrain_eval_train_loss", "dtrain_val_loss", "dtrain_val_perplexity", "dtrain_restarts",
        "dtrain_checkpoint_commits_total", "dtrain_checkpoint_last_step", "dtrain_checkpoint_last_bytes", "dtrain_checkpoint_commit_latency_seconds_count",
        "dtrain_checkpoint_commit_latency_seconds_bucket", "dtrain_workers",
    ];

    static readonly string[] WorkerMetrics =
    [
        "dtrain_worker_step", "dtrain_worker_step_seconds", "dtrain_worker_step_phase_seconds", "dtrain_worker_sent_bytes_total",
        "dtrain_worker_received_bytes_total", "dtrain_worker_allreduce_bus_bandwidth_bytes_per_second", "dtrain_worker_link_capacity_bytes_per_second",
        "dtrain_worker_network_efficiency_ratio", "dtrain_worker_resident_memory_bytes", "dtrain_worker_tensor_bytes", "dtrain_worker_cpu_utilisation_cores",
        "dtrain_worker_last_report_timestamp_seconds",
    ];

    static string Missing(List<Sample> samples)
    {
        var names = samples.Select(s => s.Name).ToHashSet();
        var missing = JobMetrics.Where(n => !names.Contains(n)).ToList();
        foreach (var rank in new[] { "0", "1" })
            missing.AddRange(WorkerMetrics.Where(n => !samples.Any(s => s.Name == n && s.Labels.GetValueOrDefault("rank") == rank)).Select(n => $"{n}{{rank={rank}}}"));
        return string.Join(", ", missing);
    }

    [Fact]
    public async Task MetricsDuringARealTwoWorkerRunAreCompleteAndMatchMetricsJsonl()
    {
        // Until every metric is there: workers report every 0.5 s, evaluations and checkpoints come every 50 steps.
        List<Sample> samples = [];
        var clock = Stopwatch.StartNew();
        while (true)
        {
            var response = await Http.GetAsync(run.MetricsUrl);
            Assert.True(response.IsSuccessStatusCode, $"GET {run.MetricsUrl}: {response.StatusCode}");
            Assert.StartsWith("text/plain", response.Content.Headers.ContentType?.MediaType);
            samples = ParsePrometheus(await response.Content.ReadAsStringAsync());
            if (Missing(samples).Length == 0 && samples.Single(s => s.Name == "dtrain_checkpoint_commits_total").Value >= 1) break;
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(90), $"after 90 s still missing: {Missing(samples)}");
            await Task.Delay(250);
        }

        double Value(string name, params (string Key, string Value)[] labels) =>
            samples.Single(s => s.Name == name && labels.All(l => s.Labels.GetValueOrDefault(l.Key) == l.Value)).Value;
        Assert.Equal(1, Value("dtrain_job_state", ("state", "running")));
        Assert.Equal(0, Value("dtrain_job_state", ("state", "failed")));
        Assert.Equal(1, Value("dtrain_generation"));
        Assert.Equal(2, Value("dtrain_workers"));
        Assert.Equal(100000, Value("dtrain_max_steps"));
        Assert.Equal("dp=2 x tp=1 x pp=1", samples.Single(s => s.Name == "dtrain_job_info").Labels["layout"]);

        // The same step as metrics.jsonl, with its loss and learning rate (metrics.jsonl is written before the report goes out).
        long step = (long)Value("dtrain_step");
        var line = File.ReadLines(Path.Combine(run.Dir, "metrics.jsonl")).Select(l => JsonDocument.Parse(l).RootElement)
            .Single(e => e.GetProperty("step").GetInt64() == step);
        Assert.Equal(line.GetProperty("loss").GetDouble(), Value("dtrain_train_loss"), 1e-9);
        Assert.Equal(line.GetProperty("lr").GetDouble(), Value("dtrain_learning_rate"), 1e-12);
        Assert.Equal(line.GetProperty("grad_norm").GetDouble(), Value("dtrain_grad_norm"), 1e-9);
        // Evaluations are reported at once and step reports every 200 ms, so the latest evaluation may be newer than
        // dtrain_step; never older than the last one at or before it, never newer than metrics.jsonl (read after the scrape).
        long logged = File.ReadLines(Path.Combine(run.Dir, "metrics.jsonl")).Max(l => JsonDocument.Parse(l).RootElement.GetProperty("step").GetInt64());
        var evals = File.ReadLines(Path.Combine(run.Dir, "eval.jsonl")).Select(l => JsonDocument.Parse(l).RootElement)
            .Select(e => (Step: e.GetProperty("step").GetInt64(), ValLoss: e.GetProperty("val_loss").GetDouble())).ToList();
        long oldestPossible = evals.Last(e => e.Step <= step).Step;
        double valLoss = Value("dtrain_val_loss");
        var matching = evals.Where(e => e.Step >= oldestPossible && e.Step <= logged && Math.Abs(e.ValLoss - valLoss) <= 1e-9).ToList();
        Assert.True(matching.Count == 1, $"dtrain_val_loss {valLoss} is not the val_loss of one evaluation at steps {oldestPossible}..{logged}");
        Assert.Equal(Math.Exp(Value("dtrain_val_loss")), Value("dtrain_val_perplexity"), 1e-6);
        Assert.Equal(0, Value("dtrain_checkpoint_last_step") % 50);

        // Step reports are throttled (every 200 ms) and samples are not, so a rank's step may run ahead of dtrain_step.
        // It cannot run ahead of rank 0's metrics.jsonl (read above, after the scrape) by more than the step both are in.
        foreach (var rank in new[] { "0", "1" })
        {
            var worker = samples.First(s => s.Name == "dtrain_worker_step" && s.Labels["rank"] == rank).Labels;
            Assert.Equal(["dp", "host", "pp", "rank", "tp"], worker.Keys.Order());
            Assert.Equal(rank, worker["dp"]);   // dp=2: the rank is the data-parallel coordinate
            double W(string name, params (string, string)[] extra) => Value(name, [("rank", rank), .. extra]);
            Assert.InRange(W("dtrain_worker_step"), 1, logged + 1);
            double phases = new[] { "compute", "communication", "waiting", "optimizer" }.Sum(p => W("dtrain_worker_step_phase_seconds", ("phase", p)));
            Assert.Equal(W("dtrain_worker_step_seconds"), phases, 1e-6);
            Assert.True(W("dtrain_worker_step_phase_seconds", ("phase", "compute")) > 0);
            Assert.True(W("dtrain_worker_sent_bytes_total") > 0 && W("dtrain_worker_received_bytes_total") > 0);
            Assert.True(W("dtrain_worker_link_capacity_bytes_per_second") > 1e6, "link capacity");
            Assert.True(W("dtrain_worker_allreduce_bus_bandwidth_bytes_per_second", ("group", "data")) > 0);
            Assert.InRange(W("dtrain_worker_network_efficiency_ratio", ("group", "data")), 1e-6, 10);
            Assert.True(W("dtrain_worker_resident_memory_bytes") > 10e6);
            Assert.True(W("dtrain_worker_tensor_bytes") > 0);
            Assert.InRange(W("dtrain_worker_cpu_utilisation_cores"), 0.01, 64);
            // No GPU here: its series are absent, not zero.
            Assert.DoesNotContain(samples, s => s.Name.StartsWith("dtrain_worker_gpu_", StringComparison.Ordinal));
        }
        Assert.True(Directory.GetFiles(Path.Combine(run.Dir, "tensorboard"), "events.out.tfevents.*").Length == 1, "rank 0 writes one event file");
    }

    [ToolFact("chromium")]
    public async Task StatusPageFillsItsWorkersTableInHeadlessChromium()
    {
        string dir = TestSupport.TempDir("status-page");
        string Chromium(params string[] args)
        {
            var info = new ProcessStartInfo(ToolFactAttribute.Find("chromium")!) { RedirectStandardOutput = true, RedirectStandardError = true };
            foreach (var a in new[] { "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", $"--user-data-dir={dir}/profile",
                "--window-size=1500,950", "--virtual-time-budget=4000" }.Concat(args)) info.ArgumentList.Add(a);
            using var p = Process.Start(info)!;
            var stdout = p.StandardOutput.ReadToEndAsync();
            _ = p.StandardError.ReadToEndAsync();
            if (!p.WaitForExit(TimeSpan.FromSeconds(60))) { p.Kill(true); throw new TimeoutException("chromium did not finish in 60 s"); }
            return stdout.Result;
        }
        // The page polls /api/status; the table fills once both workers have reported.
        var clock = Stopwatch.StartNew();
        string dom;
        while (!(dom = Chromium("--dump-dom", run.StatusUrl)).Contains("data-reported-workers=\"2\""))
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(90), $"the workers' table did not fill: {dom[..Math.Min(dom.Length, 2000)]}");
        Assert.Contains("<tr class=\"worker\" data-rank=\"0\">", dom);
        Assert.Contains("<tr class=\"worker\" data-rank=\"1\">", dom);
        Assert.Contains("dp=2 x tp=1 x pp=1", dom);
        Assert.Contains("shakespeare-char", dom);

        string screenshot = Path.Combine(dir, "status-page.png");
        Chromium($"--screenshot={screenshot}", run.StatusUrl);
        using var image = SkiaSharp.SKBitmap.Decode(screenshot);
        Assert.Equal(1500, image.Width);
        if (Environment.GetEnvironmentVariable("DTRAIN_SCREENSHOTS") is { Length: > 0 } keep) File.Copy(screenshot, Path.Combine(keep, "status-page.png"), overwrite: true);
        await Task.CompletedTask;
    }

    [Fact]
    public void StatusCommandPrintsTheLiveJob()
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            var result = TestSupport.RunCli(run.Dir, "status", run.Dir);
            Assert.True(result.ExitCode == 0, result.Stderr);
            // Both workers reported and the first checkpoint (step 50) committed: under load that can come after the first reports.
            if (result.Stdout.Contains("job shakespeare-char: running") && Regex.IsMatch(result.Stdout, @"\n\s+1\s+1\s+0\s+0\s+127\.0\.0\.1")
                && result.Stdout.Contains("last checkpoint: step"))
            {
                Assert.Matches(@"\n\s+0\s+0\s+0\s+0\s+127\.0\.0\.1", result.Stdout);
                var viaUrl = TestSupport.RunCli(run.Dir, "status", run.StatusUrl, "--json");
                Assert.Equal("running", JsonDocument.Parse(viaUrl.Stdout).RootElement.GetProperty("state").GetString());
                return;
            }
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(90), result.Stdout);
            Thread.Sleep(500);
        }
    }
}
