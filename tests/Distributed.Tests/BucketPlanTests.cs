using Distributed.Training;

namespace Distributed.Tests;

/// <summary>The gradient buckets and ZeRO-1's partition of them: a pure function of the parameters' sizes.</summary>
public class BucketPlanTests
{
    [Fact]
    public void BucketsHoldEveryParameterOnceInReverseOrderWithTheLossAtTheEnd()
    {
        long[] elements = [300, 50, 200, 200, 10, 400];
        var plan = BucketPlan.Of(elements, bucketBytes: 500 * sizeof(float), ranks: 1);
        Assert.Equal([5, 4, 3, 2, 1, 0], plan.Members.SelectMany(m => m));
        Assert.Equal([[5, 4, 3], [2, 1, 0]], plan.Members);
        Assert.Equal(elements.Sum() + 1, Enumerable.Range(0, plan.Members.Length).Sum(plan.Length));
        Assert.False(plan.Sharded);
    }

    [Theory]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(4)]
    public void EachRankOwnsAContiguousRunOfWholeParametersAboutItsShare(int ranks)
    {
        long[] elements = [.. Enumerable.Range(0, 48).Select(i => (long)(100 + 37 * (i % 5)))];
        var plan = BucketPlan.Of(elements, bucketBytes: 3000 * sizeof(float), ranks);
        var owned = new long[ranks];
        for (int b = 0; b < plan.Members.Length; b++)
        {
            var segments = plan.Segments(b);
            Assert.Equal(0, segments[0].Start);
            for (int r = 1; r < ranks; r++) Assert.Equal(segments[r - 1].Start + segments[r - 1].Length, segments[r].Start);
            Assert.Equal(plan.Length(b), segments[^1].Start + segments[^1].Length);
            // Every parameter lies inside its owner's segment, so owners ascend along the bucket.
            long offset = 0;
            for (int k = 0; k < plan.Members[b].Length; k++)
            {
                var (start, length) = segments[plan.Owners[b][k]];
                long size = elements[plan.Members[b][k]];
                Assert.True(offset >= start && offset + size <= start + length, $"bucket {b}: parameter {plan.Members[b][k]} at {offset} is outside its owner's segment");
                owned[plan.Owners[b][k]] += size;
                offset += size;
            }
        }
        long largest = elements.Max() * plan.Members.Length;
        foreach (long o in owned)
            Assert.True(Math.Abs(o - elements.Sum() / (double)ranks) <= largest, $"a rank owns {o} of {elements.Sum()} elements over {ranks} ranks");
    }

    /// <summary>
    /// The end of the last bucket (parameter 0, the token embedding, and the loss) always belongs to the last rank,
    /// however large: a pipeline's two copies of the embedding are then owned, and reduced, alike on both stages.
    /// </summary>
    [Fact]
    public void TheFirstParameterAndTheLossBelongToTheLastRankHoweverLarge()
    {
        var plan = BucketPlan.Of([10_000, 10, 10, 10], bucketBytes: 1 << 20, ranks: 3);
        Assert.Equal([3, 2, 1, 0], plan.Members.Single());
        Assert.Equal(2, plan.Owners.Single()[^1]);
        var segments = plan.Segments(0);
        Assert.Equal(plan.Length(0), segments[2].Start + segments[2].Length);
        Assert.True(segments[2].Length >= 10_001);
    }
}
