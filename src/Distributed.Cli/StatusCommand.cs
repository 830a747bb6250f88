using System.CommandLine;
using System.Globalization;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using Distributed.Cluster;
using Distributed.Cluster.Config;
using Distributed.Core;
using Distributed.Training.Checkpoints;

namespace Distributed.Cli;

/// <summary>
/// <c>dtrain status RUN_DIR_OR_URL</c>: what the coordinator's status page shows, in the terminal. A URL (or a run
/// directory whose endpoints.json names a coordinator that answers) asks the running coordinator; otherwise the
/// run directory's files tell what they can (the last step, evaluations, commits, recoveries).
/// </summary>
static class StatusCommand
{
    public static Command Create()
    {
        var target = new Argument<string>("run-dir-or-url") { Description = "a run directory, or the status page's URL (http://HOST:PORT/)" };
        var json = new Option<bool>("--json") { Description = "print the view as JSON (what /api/status returns)" };
        var command = new Command("status", "show a job's state, workers, losses, checkpoint and recent events") { target, json };
        command.SetAction(async (parse, cancellationToken) =>
        {
            string where = parse.GetValue(target)!;
            var view = await LoadAsync(where, cancellationToken);
            Console.Write(parse.GetValue(json) ? JsonSerializer.Serialize(view, ObservabilityServer.Json) + "\n" : Render(view));
            return 0;
        });
        return command;
    }

    public static async Task<JobStatusView> LoadAsync(string where, CancellationToken cancellationToken)
    {
        if (where.StartsWith("http://", StringComparison.Ordinal) || where.StartsWith("https://", StringComparison.Ordinal))
            return await FetchAsync(where, cancellationToken) ?? throw new UserFacingException($"no status at {where}");
        if (!Directory.Exists(where)) throw new UserFacingException($"'{where}' is neither a run directory nor a URL");
        string endpoints = RunFiles.In(where, RunFiles.Endpoints);
        if (File.Exists(endpoints) && JsonDocument.Parse(File.ReadAllText(endpoints)).RootElement.TryGetProperty("status", out var url) && url.GetString() is { } live)
        {
            try { if (await FetchAsync(live, cancellationToken) is { } view) return view; }
            catch (HttpRequestException) { }   // the coordinator is gone: the files tell the rest
            catch (TaskCanceledException) when (!cancellationToken.IsCancellationRequested) { }
        }
        return FromFiles(where);
    }

    static async Task<JobStatusView?> FetchAsync(string url, CancellationToken cancellationToken)
    {
        using var http = new HttpClient { Timeout = TimeSpan.FromSeconds(3) };
        var api = new Uri(new Uri(url.EndsWith('/') ? url : url + "/"), ObservabilityServer.StatusApiPath.TrimStart('/'));
        return await http.GetFromJsonAsync<JobStatusView>(api, ObservabilityServer.Json, cancellationToken);
    }

    /// <summary>A stopped run as its files show it.</summary>
    static JobStatusView FromFiles(string runDir)
    {
        string jobFile = RunFiles.In(runDir, RunFiles.Job);
        var spec = File.Exists(jobFile) ? JobConfigLoader.Load(jobFile) : null;
        static IEnumerable<JsonElement> Lines(string path) =>
            File.Exists(path) ? File.ReadLines(path).Where(l => l.Trim().Length > 0).Select(l => JsonDocument.Parse(l).RootElement) : [];
        var last = Lines(RunFiles.In(runDir, RunFiles.Metrics)).LastOrDefault();
        var evals = Lines(RunFiles.In(runDir, RunFiles.Evals)).Select(e => new EvalView(e.GetProperty("step").GetInt64(), e.GetProperty("train_loss").GetDouble(),
            e.GetProperty("val_loss").GetDouble(), e.GetProperty("val_perplexity").GetDouble())).ToArray();
        var commits = CommitLog.Read(runDir);
        var events = commits.Select(c => new EventView(c.At, "checkpoint", $"checkpoint at step {c.Step} committed (generation {c.Generation}, {c.Bytes:N0} bytes)"))
            .Concat(Lines(RunFiles.In(runDir, RunFiles.Recoveries)).Select(r => new EventView(
                DateTime.UnixEpoch.AddSeconds(r.GetProperty("fault_wall_time").GetDouble()), "recovery",
                $"generation {r.GetProperty("aborted_generation").GetInt64()} lost: {r.GetProperty("reason").GetString()}; resumed at step {r.GetProperty("resumed_step").GetInt64()}")))
            .OrderBy(e => e.At).TakeLast(20).ToArray();
        CheckpointView? checkpoint = null;
        if (commits.LastOrDefault() is { } c)
        {
            string directory = CheckpointFiles.DirectoryFor(Path.Combine(runDir, "checkpoints"), c.Step);
            var problems = Directory.Exists(directory) ? CheckpointFiles.Verify(directory).Select(p => p.ToString()).ToList() : ["deleted (retention)"];
            checkpoint = new CheckpointView(c.Step, directory, c.Bytes, c.LatencySeconds, c.At, problems.Count == 0, problems.Count == 0 ? null : string.Join("; ", problems));
        }
        long step = last.ValueKind == JsonValueKind.Object ? last.GetProperty("step").GetInt64() : 0;
        long lastStep = spec?.Train.MaxIters ?? step;
        double? Get(string name) => last.ValueKind == JsonValueKind.Object && last.TryGetProperty(name, out var v) ? v.GetDouble() : null;
        return new JobStatusView(spec?.Name ?? Path.GetFileName(Path.GetFullPath(runDir)), step >= lastStep && checkpoint?.Step == lastStep ? "completed" : "stopped",
            commits.LastOrDefault()?.Generation ?? 0, null, spec?.Cluster.Workers ?? 0, step, lastStep, Get("loss"), Get("lr"), Get("grad_norm"), Get("tokens_per_s"),
            evals.LastOrDefault(), events.Count(e => e.Kind == "recovery"), checkpoint, commits.Count, [], [], evals, events, null, DateTime.UtcNow);
    }

    /// <summary>The page's content as text: the job, its workers, the last checkpoint, the recent events.</summary>
    public static string Render(JobStatusView v)
    {
        var o = new StringBuilder();
        string F(double? x, string format) => x is null ? "-" : x.Value.ToString(format, CultureInfo.InvariantCulture);
        o.AppendLine($"job {v.Job}: {v.State}, generation {v.Generation}{(v.Layout is null ? "" : ", " + v.Layout)}{(v.Reason is null ? "" : $" ({v.Reason})")}");
        o.AppendLine($"step {v.Step:N0} / {v.LastStep:N0}   loss {F(v.Loss, "F4")}   lr {F(v.LearningRate, "E2")}   tokens/s {F(v.TokensPerSecond, "N0")}   restarts {v.Restarts}   commits {v.Commits}");
        if (v.LastEval is { } e) o.AppendLine($"last evaluation: step {e.Step}: train loss {e.TrainLoss:F4}, val loss {e.ValLoss:F4} (perplexity {e.ValPerplexity:F2})");
        if (v.LastCheckpoint is { } c)
            o.AppendLine($"last checkpoint: step {c.Step}, {c.Bytes:N0} bytes, {(c.Verified is null ? "verifying" : c.Verified.Value ? "verified" : "DOES NOT VERIFY: " + c.Problem)}, {c.Directory}");
        else o.AppendLine("last checkpoint: none");
        if (v.Workers.Length > 0)
        {
            o.AppendLine($"{"rank",4}  {"dp",3} {"tp",3} {"pp",3}  {"host",-16} {"pid",7}  {"state",-16} {"step",7}  {"step ms",8}  {"compute/comm/wait/optim ms",-27}  {"all-reduce GB/s",15} {"link GB/s",9} {"RSS MB",7} {"CPU",5}  last report");
            foreach (var w in v.Workers)
            {
                var s = w.Sample;
                string split = s is null ? "-" : $"{s.ComputeMs:F1}/{s.CommunicationMs:F1}/{s.WaitingMs:F1}/{s.OptimizerMs:F1}";
                string bus = s is null ? "-" : s.DataEfficiency is { } de ? $"{s.DataBusBandwidth / 1e9:F2} ({de:P0})" : s.TensorEfficiency is { } te ? $"tp {s.TensorBusBandwidth / 1e9:F2} ({te:P0})" : "-";
                string age = w.LastReport is { } at ? $"{(DateTime.UtcNow - at).TotalSeconds:F1} s ago" : "-";
                o.AppendLine($"{w.Rank,4}  {w.Dp,3} {w.Tp,3} {w.Pp,3}  {w.Host,-16} {w.ProcessId,7}  {w.State,-16} {w.Step,7}  {F(s?.StepMs, "F1"),8}  {split,-27}  {bus,15} {F(s?.LinkCapacity / 1e9, "F2"),9} {F(s?.RssBytes / 1e6, "F0"),7} {F(s?.CpuCores, "F2"),5}  {age}");
            }
        }
        if (v.Events.Length > 0)
        {
            o.AppendLine("recent events:");
            foreach (var ev in v.Events.TakeLast(10)) o.AppendLine($"  {ev.At.ToLocalTime():HH:mm:ss}  {ev.Text}");
        }
        return o.ToString();
    }
}
