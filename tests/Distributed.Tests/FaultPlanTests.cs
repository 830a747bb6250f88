using Distributed.Core;

namespace Distributed.Tests;

public class FaultPlanTests
{
    static IReadOnlyList<Fault> Parse(params string[] values) => Faults.Parse(values, faultSeed: 1, workers: 3, maxIters: 100, checkpointEvery: 10);

    [Fact]
    public void EveryKindParsesToItsCanonicalText()
    {
        string[] all = ["kill-worker:2@15", "kill-coordinator@7", "drop-link:0-1@30", "delay-link:1-2:25", "corrupt-shard:1@20", "kill-during-checkpoint:0@40"];
        var faults = Parse(all);
        Assert.Equal(all, faults.Select(f => f.Text));
        Assert.Equal(new Fault(FaultKind.DelayLink, 1, 2, 0, 25), faults[3]);
    }

    [Theory]
    [InlineData("kill-worker:3@15", "rank 3 does not exist (the job has 3 workers)")]
    [InlineData("kill-worker:1@100", "step must be between 1 and 99")]
    [InlineData("drop-link:1-1@5", "a link joins two different ranks")]
    [InlineData("corrupt-shard:1@15", "no checkpoint is written at step 15 (checkpoint.every = 10)")]
    [InlineData("explode:1@5", "is not a fault: expected one of kill-worker:RANK@STEP")]
    public void BadFaultsAreOneClearError(string value, string message)
    {
        var error = Assert.Throws<UserFacingException>(() => Parse(value));
        Assert.Contains($"--fault '{value}'", error.Message);
        Assert.Contains(message, error.Message);
    }

    [Fact]
    public void RandomFaultsAreDrawnFromTheSeedAndCoverEveryKindAndVictim()
    {
        Assert.Equal(Faults.Parse(["random:3"], 7, 2, 60, 20), Faults.Parse(["random:3"], 7, 2, 60, 20));
        Assert.NotEqual(Faults.Parse(["random:3"], 7, 2, 60, 20), Faults.Parse(["random:3"], 8, 2, 60, 20));
        var drawn = Enumerable.Range(1, 60).SelectMany(seed => Faults.Parse(["random:1"], seed, 2, 60, 20)).ToList();
        Assert.Equal(Enum.GetValues<FaultKind>().Except(Faults.Waits).Order(), drawn.Select(f => f.Kind).Distinct().Order());
        Assert.Equal([0, 1], drawn.Where(f => f.Kind == FaultKind.KillWorker).Select(f => f.Rank).Distinct().Order());
        // Every drawn fault fires: steps inside the run, checkpoint faults on checkpoint steps.
        Assert.All(drawn.Where(f => f.Kind != FaultKind.DelayLink), f => Assert.InRange(f.Step, 1, 59));
        Assert.All(drawn.Where(f => f.Kind is FaultKind.CorruptShard or FaultKind.KillDuringCheckpoint), f => Assert.Equal(0, f.Step % 20));
    }
}
