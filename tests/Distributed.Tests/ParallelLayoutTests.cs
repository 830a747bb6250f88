using Distributed.Core;

namespace Distributed.Tests;

public class ParallelLayoutTests
{
    [Theory]
    [InlineData(1, 1, 1)]
    [InlineData(2, 1, 1)]
    [InlineData(1, 4, 1)]
    [InlineData(2, 2, 1)]
    [InlineData(3, 2, 2)]
    [InlineData(2, 4, 3)]
    public void EveryRankHasOnePlaceAndItsGroupsPartitionTheWorld(int dp, int tp, int pp)
    {
        var layout = new ParallelLayout(dp, tp, pp);
        var seen = new HashSet<RankCoordinates>();
        for (int rank = 0; rank < layout.World; rank++)
        {
            var c = layout.Coordinates(rank);
            Assert.True(seen.Add(c));
            Assert.Equal(rank, layout.RankAt(c));
            // Megatron's order: tp fastest, then dp, then pp.
            Assert.Equal(rank, c.Tp + tp * (c.Dp + dp * c.Pp));
            foreach (var axis in Enum.GetValues<ParallelAxis>())
            {
                var group = layout.Group(axis, rank);
                Assert.Contains(rank, group);
                Assert.Equal(axis switch { ParallelAxis.Tensor => tp, ParallelAxis.Data => dp, _ => pp }, group.Length);
                // Every member sees the same group, and the members differ only along the axis.
                foreach (int member in group)
                {
                    Assert.Equal(group, layout.Group(axis, member));
                    var m = layout.Coordinates(member);
                    if (axis != ParallelAxis.Tensor) Assert.Equal(c.Tp, m.Tp);
                    if (axis != ParallelAxis.Data) Assert.Equal(c.Dp, m.Dp);
                    if (axis != ParallelAxis.Pipeline) Assert.Equal(c.Pp, m.Pp);
                }
            }
        }
        // A TP group is a run of neighbouring ranks.
        Assert.Equal(Enumerable.Range(0, tp), layout.Group(ParallelAxis.Tensor, 0));
    }

    [Fact]
    public void DpFollowsFromTheWorkers()
    {
        var spec = TestSupport.TinyJob("unused", "model.n-head=4", "model.n-embd=32", "train.batch-size=4", "parallel.tp=2");
        Assert.Equal(new ParallelLayout(2, 2, 1), ParallelLayout.For(spec, 4));
        Assert.Equal(new ParallelLayout(1, 2, 1), ParallelLayout.For(spec, 2));
    }

    [Fact]
    public void AnInvalidLayoutNamesEveryDegreeThatDoesNotFit()
    {
        var spec = TestSupport.TinyJob("unused", "model.n-head=6", "model.n-embd=42", "train.batch-size=4", "parallel.tp=4");
        var error = Assert.Throws<ConfigException>(() => ParallelLayout.For(spec, 6));
        Assert.Contains("workers (6) must be divisible by tp x pp (4 x 1)", error.Message);
        Assert.Contains("model.n-head (6) must be divisible by tp (4)", error.Message);
        Assert.Contains("model.n-embd (42) must be divisible by tp (4)", error.Message);
        var batch = Assert.Throws<ConfigException>(() => ParallelLayout.For(TestSupport.TinyJob("unused", "train.batch-size=4", "model.n-head=2", "parallel.tp=2"), 6));
        Assert.Contains("train.batch-size (4) must be divisible by dp x train.grad-accum (3 x 1)", batch.Message);
        var pipeline = Assert.Throws<ConfigException>(() => ParallelLayout.For(TestSupport.TinyJob("unused", "parallel.pp=3", "parallel.micro-batches=3"), 3));
        Assert.Contains("parallel.pp (3) must not exceed model.n-layer (2)", pipeline.Message);
        Assert.Contains("train.batch-size / dp = 4) must be divisible by parallel.micro-batches (3)", pipeline.Message);
    }

    [Fact]
    public void StageLayersListTheBlocksOfEachStageAndAreChecked()
    {
        var spec = TestSupport.TinyJob("unused", "model.n-layer=5", "parallel.pp=3", "parallel.stage-layers=[2, 1, 2]", "train.batch-size=6", "parallel.micro-batches=2");
        Assert.Equal("2,1,2", spec.Parallel.StageLayers);
        var layout = ParallelLayout.For(spec, 3);
        Assert.Equal([(0, 2), (2, 1), (3, 2)], Enumerable.Range(0, 3).Select(r => layout.StageOf(r, 5)).Select(s => (s.FirstLayer, s.Layers)));
        // Without the key the split is balanced (earlier stages take the remainder).
        var balanced = ParallelLayout.For(TestSupport.TinyJob("unused", "model.n-layer=5", "parallel.pp=3", "train.batch-size=6", "parallel.micro-batches=2"), 3);
        Assert.Equal([2, 2, 1], Enumerable.Range(0, 3).Select(r => balanced.StageOf(r, 5).Layers));

        var wrongSum = Assert.Throws<ConfigException>(() => ParallelLayout.For(TestSupport.TinyJob("unused", "model.n-layer=5", "parallel.pp=3", "parallel.stage-layers=2,2,2", "train.batch-size=6", "parallel.micro-batches=2"), 3));
        Assert.Contains("parallel.stage-layers (2,2,2) must list parallel.pp (3) block counts that sum to model.n-layer (5)", wrongSum.Message);
        Assert.Throws<ConfigException>(() => ParallelLayout.For(TestSupport.TinyJob("unused", "model.n-layer=5", "parallel.pp=2", "parallel.stage-layers=2,2,1", "train.batch-size=6"), 2));
        var notCounts = Assert.Throws<ConfigException>(() => TestSupport.TinyJob("unused", "parallel.stage-layers=2,x"));
        Assert.Contains("parallel.stage-layers must list a positive block count per stage", notCounts.Message);
        Assert.Throws<ConfigException>(() => TestSupport.TinyJob("unused", "parallel.stage-layers=0,2"));
    }

    [Fact]
    public void TensorParallelGroupsAreKeptOnOneHostWhenTheyFit()
    {
        // Registration order mixes the hosts; each host has room for one whole TP group of 2, one worker is left over.
        string[] hosts = ["a", "b", "a", "c", "b"];
        var order = ParallelLayout.PlaceTensorParallelGroups(hosts, tp: 2);
        Assert.Equal(new[] { 0, 2, 1, 4, 3 }, order);
        Assert.Equal(Enumerable.Range(0, 5), order.Order());
        Assert.Equal(new[] { 0, 1, 2 }, ParallelLayout.PlaceTensorParallelGroups(["x", "x", "x"], tp: 1));
    }
}
