using Akka.Actor;
using Distributed.Cluster;
using Distributed.Core;
using Distributed.Training.Checkpoints;

namespace Distributed.Tests;

/// <summary>The coordinator's journal: what replaying events means, and that every event and the snapshot survive Akka's serializer.</summary>
public class JournalTests
{
    static readonly DateTime At = new(2026, 11, 30, 1, 2, 3, DateTimeKind.Utc);
    static CheckpointCommitted Commit(long step, long generation, string sha = "ab") => new(step, generation, [new ShardRecord(0, "shard-0-of-1.safetensors", sha, 10)], At);

    [Fact]
    public void ReplayRebuildsTheJobAndANewSubmissionStartsAFreshAttempt()
    {
        object[] events =
        [
            new JobSubmitted("first", "job", 2, At), new GenerationStarted(1, 2, 0, At), Commit(10, 1), new FaultInjected("kill-worker:1@15", At),
            new GenerationAborted(1, "rank 1 was killed", At), new GenerationStarted(2, 2, 10, At), Commit(20, 2), Commit(10, 2, "cd"),
            new JobEnded(false, -1, "gave up", At),
        ];
        var state = events.Aggregate(JobState.Empty, (s, e) => s.Apply(e));
        Assert.Equal(2, state.Generation);
        Assert.Equal(1, state.Restarts);
        Assert.Equal([20L, 10L], state.CommitsNewestFirst().Select(c => c.Step));
        Assert.Equal("cd", state.Commits.Single(c => c.Step == 10).Shards[0].Sha256);   // a step committed again replaces the older commit
        Assert.True(state.HasFired(new Fault(FaultKind.KillWorker, 1, -1, 15, 0)));
        Assert.NotNull(state.End);

        var resubmitted = state.Apply(new JobSubmitted("second", "job", 3, At));
        Assert.Null(resubmitted.End);
        Assert.Equal(0, resubmitted.Restarts);
        Assert.Equal(2, resubmitted.Commits.Length);   // commits and fired faults stay: the job goes on from them
        Assert.Single(resubmitted.FiredFaults);
    }

    [Fact]
    public void RetiredCommitsLeaveTheJobsState()
    {
        object[] events = [new JobSubmitted("s", "job", 2, At), Commit(10, 1), Commit(20, 1), Commit(30, 1), new CheckpointsRetired([10, 20], At)];
        var state = events.Aggregate(JobState.Empty, (s, e) => s.Apply(e));
        // Retention deleted their files: a fallback never offers them (they would read as corrupt).
        Assert.Equal([30L], state.CommitsNewestFirst().Select(c => c.Step));
        // Step 30 did not verify, so generation 2 resumed from scratch: its commits are the job's now.
        Assert.Empty(state.Apply(new GenerationStarted(2, 2, 0, At)).Commits);
    }

    [Fact]
    public async Task EveryEventAndTheSnapshotRoundTripThroughAkkasSerializer()
    {
        using var system = ActorSystem.Create("journal-test", "akka.loglevel = ERROR\nakka.suppress-json-serializer-warning = on");
        try
        {
            var snapshot = new[] { new JobSubmitted("s", "job", 2, At), new GenerationStarted(1, 2, 0, At), (object)Commit(10, 1), new FaultInjected("kill-coordinator@5", At) }
                .Aggregate(JobState.Empty, (s, e) => s.Apply(e));
            Assert.True(snapshot.GenerationRunning);   // a coordinator restored from this snapshot adopts generation 1
            object[] all =
            [
                new JobSubmitted("s", "job", 2, At), new GenerationStarted(1, 2, 0, At), new GenerationAborted(1, "why", At), new GenerationAdopted(1, At), Commit(10, 1), new CheckpointsRetired([10], At),
                new FaultInjected("f", At), new JobEnded(true, 40, "done", At), snapshot,
            ];
            foreach (var value in all)
            {
                var serializer = system.Serialization.FindSerializerFor(value);
                var back = serializer.FromBinary(serializer.ToBinary(value), value.GetType());
                Assert.Equal(System.Text.Json.JsonSerializer.Serialize(value, value.GetType()), System.Text.Json.JsonSerializer.Serialize(back, value.GetType()));
            }
        }
        finally
        {
            await system.Terminate();
        }
    }
}
