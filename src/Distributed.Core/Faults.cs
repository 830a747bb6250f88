using System.Globalization;
using System.Text.RegularExpressions;

namespace Distributed.Core;

public enum FaultKind { KillWorker, KillCoordinator, DropLink, DelayLink, CorruptShard, KillDuringCheckpoint, StallStart, SlowAbort }

/// <summary>
/// One injected fault (`dtrain train --fault ...`). Rank is the victim (or one end of a link), Peer the other end,
/// Step when it fires (after that optimizer step), DelayMs a link's added latency (or how long a slow abort takes). Text is the canonical spelling,
/// which also identifies the fault in the journal so that a fault fires once per job.
/// </summary>
public sealed record Fault(FaultKind Kind, int Rank, int Peer, long Step, int DelayMs)
{
    public string Text => Kind switch
    {
        FaultKind.KillWorker => $"kill-worker:{Rank}@{Step}",
        FaultKind.KillCoordinator => $"kill-coordinator@{Step}",
        FaultKind.DropLink => $"drop-link:{Rank}-{Peer}@{Step}",
        FaultKind.DelayLink => $"delay-link:{Rank}-{Peer}:{DelayMs}",
        FaultKind.CorruptShard => $"corrupt-shard:{Rank}@{Step}",
        FaultKind.KillDuringCheckpoint => $"kill-during-checkpoint:{Rank}@{Step}",
        FaultKind.StallStart => $"stall-start:{Rank}",
        FaultKind.SlowAbort => $"slow-abort:{Rank}:{DelayMs}",
        _ => Kind.ToString(),
    };

    public override string ToString() => Text;
}

/// <summary>Parses and draws fault plans. Every error names the option and what was expected.</summary>
public static partial class Faults
{
    public const string Kinds = "kill-worker:RANK@STEP, kill-coordinator@STEP, drop-link:A-B@STEP, delay-link:A-B:MS, " +
        "corrupt-shard:RANK@STEP, kill-during-checkpoint:RANK@STEP, stall-start:RANK, slow-abort:RANK:MS, random:COUNT";

    /// <summary>
    /// Faults that provoke a wait rather than a loss (a rank that never joins its generation's start, a cancellation
    /// that takes long): they end only through a deadline, so random:COUNT does not draw them.
    /// </summary>
    public static readonly FaultKind[] Waits = [FaultKind.StallStart, FaultKind.SlowAbort];

    [GeneratedRegex(@"^(?<kind>kill-worker|corrupt-shard|kill-during-checkpoint):(?<rank>\d+)@(?<step>\d+)$")]
    private static partial Regex RankAtStep();
    [GeneratedRegex(@"^kill-coordinator@(?<step>\d+)$")]
    private static partial Regex CoordinatorAtStep();
    [GeneratedRegex(@"^drop-link:(?<a>\d+)-(?<b>\d+)@(?<step>\d+)$")]
    private static partial Regex DropLink();
    [GeneratedRegex(@"^delay-link:(?<a>\d+)-(?<b>\d+):(?<ms>\d+)$")]
    private static partial Regex DelayLink();
    [GeneratedRegex(@"^stall-start:(?<rank>\d+)$")]
    private static partial Regex StallStart();
    [GeneratedRegex(@"^slow-abort:(?<rank>\d+):(?<ms>\d+)$")]
    private static partial Regex SlowAbort();
    [GeneratedRegex(@"^random:(?<count>\d+)$")]
    private static partial Regex Random();

    /// <summary>Parses --fault values against the job (ranks must exist, steps must be inside the run).</summary>
    public static IReadOnlyList<Fault> Parse(IEnumerable<string> values, long faultSeed, int workers, long maxIters, int checkpointEvery)
    {
        var faults = new List<Fault>();
        foreach (var raw in values)
        {
            string v = raw.Trim();
            Match m;
            if ((m = RankAtStep().Match(v)).Success)
            {
                var kind = m.Groups["kind"].Value switch
                {
                    "kill-worker" => FaultKind.KillWorker,
                    "corrupt-shard" => FaultKind.CorruptShard,
                    _ => FaultKind.KillDuringCheckpoint,
                };
                faults.Add(new Fault(kind, Rank(m, "rank", v, workers), -1, Step(m, v, maxIters), 0));
            }
            else if ((m = CoordinatorAtStep().Match(v)).Success)
                faults.Add(new Fault(FaultKind.KillCoordinator, -1, -1, Step(m, v, maxIters), 0));
            else if ((m = DropLink().Match(v)).Success)
                faults.Add(Link(FaultKind.DropLink, m, v, workers, Step(m, v, maxIters), 0));
            else if ((m = DelayLink().Match(v)).Success)
                faults.Add(Link(FaultKind.DelayLink, m, v, workers, 0, int.Parse(m.Groups["ms"].Value, CultureInfo.InvariantCulture)));
            else if ((m = StallStart().Match(v)).Success)
                faults.Add(new Fault(FaultKind.StallStart, Rank(m, "rank", v, workers), -1, 0, 0));
            else if ((m = SlowAbort().Match(v)).Success)
                faults.Add(new Fault(FaultKind.SlowAbort, Rank(m, "rank", v, workers), -1, 0, int.Parse(m.Groups["ms"].Value, CultureInfo.InvariantCulture)));
            else if ((m = Random().Match(v)).Success)
                faults.AddRange(Draw(int.Parse(m.Groups["count"].Value, CultureInfo.InvariantCulture), faultSeed, workers, maxIters, checkpointEvery));
            else
                throw new UserFacingException($"--fault '{v}' is not a fault: expected one of {Kinds}");
        }
        foreach (var f in faults.Where(f => f.Kind is FaultKind.CorruptShard or FaultKind.KillDuringCheckpoint))
            if (f.Step % checkpointEvery != 0 && f.Step != maxIters)
                throw new UserFacingException($"--fault '{f.Text}': no checkpoint is written at step {f.Step} (checkpoint.every = {checkpointEvery})");
        var twice = faults.GroupBy(f => f.Text).FirstOrDefault(g => g.Count() > 1);
        if (twice is not null) throw new UserFacingException($"--fault '{twice.Key}' is given twice");
        return faults;
    }

    /// <summary>
    /// COUNT faults drawn from the seed: kind, victim and step. Steps fall strictly inside the run and checkpoint
    /// faults on checkpoint steps, so every drawn fault fires.
    /// </summary>
    public static IReadOnlyList<Fault> Draw(int count, long seed, int workers, long maxIters, int checkpointEvery)
    {
        // Counter-based draws (like the sampler's): draw j of fault i is a pure function of (seed, i, j).
        int Draw(int i, int j, int n) => (int)(Seeds.Derive(seed, Seeds.FaultStream, i, j) % (ulong)n);
        var checkpointSteps = Enumerable.Range(1, (int)((maxIters - 1) / checkpointEvery)).Select(i => (long)i * checkpointEvery).ToArray();
        var faults = new List<Fault>();
        for (int attempt = 0; faults.Count < count; attempt++)
        {
            if (attempt > 1000 * count) throw new UserFacingException($"--fault random:{count}: the job has fewer than {count} distinct faults to draw");
            var kinds = new List<FaultKind> { FaultKind.KillWorker, FaultKind.KillCoordinator, FaultKind.DelayLink };
            if (workers > 1) kinds.Add(FaultKind.DropLink);
            if (checkpointSteps.Length > 0) kinds.AddRange([FaultKind.CorruptShard, FaultKind.KillDuringCheckpoint]);
            var kind = kinds[Draw(attempt, 0, kinds.Count)];
            int rank = Draw(attempt, 1, workers);
            int peer = workers > 1 ? (rank + 1 + Draw(attempt, 2, workers - 1)) % workers : rank;
            long step = kind is FaultKind.CorruptShard or FaultKind.KillDuringCheckpoint
                ? checkpointSteps[Draw(attempt, 3, checkpointSteps.Length)]
                : 1 + Draw(attempt, 3, (int)Math.Max(1, maxIters - 1));
            var fault = new Fault(kind, kind == FaultKind.KillCoordinator ? -1 : rank, kind is FaultKind.DropLink or FaultKind.DelayLink ? peer : -1,
                kind == FaultKind.DelayLink ? 0 : step, kind == FaultKind.DelayLink ? 1 + Draw(attempt, 4, 20) : 0);
            if (faults.Any(f => f.Text == fault.Text)) continue;
            faults.Add(fault);
        }
        return faults;
    }

    static Fault Link(FaultKind kind, Match m, string v, int workers, long step, int ms)
    {
        int a = Rank(m, "a", v, workers), b = Rank(m, "b", v, workers);
        if (a == b) throw new UserFacingException($"--fault '{v}': a link joins two different ranks");
        return new Fault(kind, a, b, step, ms);
    }

    static int Rank(Match m, string group, string v, int workers)
    {
        int rank = int.Parse(m.Groups[group].Value, CultureInfo.InvariantCulture);
        if (rank >= workers) throw new UserFacingException($"--fault '{v}': rank {rank} does not exist (the job has {workers} workers)");
        return rank;
    }

    static long Step(Match m, string v, long maxIters)
    {
        long step = long.Parse(m.Groups["step"].Value, CultureInfo.InvariantCulture);
        if (step < 1 || step >= maxIters) throw new UserFacingException($"--fault '{v}': step must be between 1 and {maxIters - 1} (train.max-iters = {maxIters})");
        return step;
    }
}
