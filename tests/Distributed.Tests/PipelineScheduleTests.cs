using Distributed.Training.Schedules;

namespace Distributed.Tests;

public class PipelineScheduleTests
{
    public static IEnumerable<object[]> Shapes() =>
        from schedule in new[] { "gpipe", "1f1b" }
        from stages in new[] { 1, 2, 3, 4 }
        from micro in new[] { 1, 2, 4, 7, 16 }
        select new object[] { schedule, stages, micro };

    /// <summary>
    /// Runs every stage's passes as a message-passing simulation with unbounded mailboxes (as the data plane's are):
    /// a forward needs the previous stage's activation, a backward the next stage's gradient. Every stage must finish
    /// (no deadlock), each forward and backward exactly once per micro-batch, backward after its forward.
    /// </summary>
    [Theory]
    [MemberData(nameof(Shapes))]
    public void EveryStageRunsEachPassOnceAndTheStagesNeverDeadlock(string schedule, int stages, int micro)
    {
        var passes = Enumerable.Range(0, stages).Select(s => PipelineSchedule.Passes(schedule, s, stages, micro)).ToArray();
        var next = new int[stages];
        var activations = Enumerable.Range(0, stages).Select(_ => new HashSet<int>()).ToArray();   // arrived from the previous stage
        var gradients = Enumerable.Range(0, stages).Select(_ => new HashSet<int>()).ToArray();     // arrived from the next stage
        bool progress = true;
        while (progress)
        {
            progress = false;
            for (int s = 0; s < stages; s++)
            {
                if (next[s] == passes[s].Count) continue;
                var pass = passes[s][next[s]];
                bool ready = pass.Forward ? s == 0 || activations[s].Contains(pass.MicroBatch) : s == stages - 1 || gradients[s].Contains(pass.MicroBatch);
                if (!ready) continue;
                if (pass.Forward && s < stages - 1) activations[s + 1].Add(pass.MicroBatch);
                if (!pass.Forward && s > 0) gradients[s - 1].Add(pass.MicroBatch);
                next[s]++;
                progress = true;
            }
        }
        for (int s = 0; s < stages; s++)
        {
            if (next[s] < passes[s].Count)
                Assert.Fail($"{schedule} P={stages} M={micro}: stage {s} stuck at {passes[s][next[s]]} after {string.Join(" ", passes[s].Take(next[s]))}");
            Assert.Equal(Enumerable.Range(0, micro), passes[s].Where(p => p.Forward).Select(p => p.MicroBatch));
            Assert.Equal(Enumerable.Range(0, micro), passes[s].Where(p => !p.Forward).Select(p => p.MicroBatch));
            for (int m = 0; m < micro; m++)
                Assert.True(passes[s].ToList().IndexOf(new PipelinePass(true, m)) < passes[s].ToList().IndexOf(new PipelinePass(false, m)));
        }
    }

    [Fact]
    public void OneFOneBWarmsUpWithStagesMinusStageMinusOneForwardsAndHoldsAtMostThatManyPlusOne()
    {
        Assert.Equal("F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7", string.Join(" ", PipelineSchedule.Passes("1f1b", 0, 4, 8)));
        Assert.Equal("F0 B0 F1 B1 F2 B2", string.Join(" ", PipelineSchedule.Passes("1f1b", 3, 4, 3)));
        for (int stage = 0; stage < 4; stage++)
        {
            Assert.Equal(Math.Min(4 - stage, 16), PipelineSchedule.PeakInFlight(PipelineSchedule.Passes("1f1b", stage, 4, 16)));
            Assert.Equal(16, PipelineSchedule.PeakInFlight(PipelineSchedule.Passes("gpipe", stage, 4, 16)));
        }
    }
}
