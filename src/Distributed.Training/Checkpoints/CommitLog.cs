using System.Text.Json;
using System.Text.Json.Serialization;
using Distributed.Core;

namespace Distributed.Training.Checkpoints;

/// <summary>
/// run.dir/commits.jsonl: one line per committed checkpoint (step, generation, bytes, commit latency, when), kept
/// beside the journal so a plot or a status read needs no actor system; retention deletes checkpoints, never lines.
/// </summary>
public static class CommitLog
{
    public sealed record Entry(
        [property: JsonPropertyName("step")] long Step,
        [property: JsonPropertyName("generation")] long Generation,
        [property: JsonPropertyName("bytes")] long Bytes,
        [property: JsonPropertyName("latency_s")] double LatencySeconds,
        [property: JsonPropertyName("at")] DateTime At)
    {
        /// <summary>Seconds since 1970 (UTC): the clock of metrics.jsonl's wall_time.</summary>
        [JsonIgnore] public double WallTime => (At.ToUniversalTime() - DateTime.UnixEpoch).TotalSeconds;
    }

    public static void Append(string runDir, Entry entry) =>
        File.AppendAllText(RunFiles.In(runDir, RunFiles.Commits), JsonSerializer.Serialize(entry) + "\n");

    public static IReadOnlyList<Entry> Read(string runDir)
    {
        string path = RunFiles.In(runDir, RunFiles.Commits);
        if (!File.Exists(path)) return [];
        return File.ReadLines(path).Where(l => l.Trim().Length > 0).Select(l => JsonSerializer.Deserialize<Entry>(l)!).ToList();
    }
}
