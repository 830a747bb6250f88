namespace Distributed.Training.Schedules;

/// <summary>One pass of a stage over one micro-batch: its forward or its backward.</summary>
public readonly record struct PipelinePass(bool Forward, int MicroBatch)
{
    public override string ToString() => $"{(Forward ? "F" : "B")}{MicroBatch}";
}

/// <summary>
/// The order in which a stage runs its passes in one step (a pure function of the schedule and the coordinates, so
/// neighbours agree on the order of what they send each other). Activations go forward and their gradients come back
/// in micro-batch order on every stage, which is what makes the point-to-point streams between neighbours line up.
/// GPipe: every forward, then every backward (M micro-batches of activations alive). 1F1B as Megatron runs it:
/// (P - stage - 1) warm-up forwards, then one forward and one backward in turn, then the remaining backwards (at most
/// P - stage micro-batches alive). Both have the bubble (P - 1) / (M + P - 1).
/// </summary>
public static class PipelineSchedule
{
    public static IReadOnlyList<PipelinePass> Passes(string schedule, int stage, int stages, int microBatches)
    {
        var passes = new List<PipelinePass>(2 * microBatches);
        switch (schedule)
        {
            case "gpipe":
                for (int m = 0; m < microBatches; m++) passes.Add(new(true, m));
                for (int m = 0; m < microBatches; m++) passes.Add(new(false, m));
                break;
            case "1f1b":
                int warmup = Math.Min(stages - stage - 1, microBatches);
                int forward = 0, backward = 0;
                for (; forward < warmup; forward++) passes.Add(new(true, forward));
                while (forward < microBatches)
                {
                    passes.Add(new(true, forward++));
                    passes.Add(new(false, backward++));
                }
                while (backward < microBatches) passes.Add(new(false, backward++));
                break;
            default:
                throw new ArgumentException($"unknown pipeline schedule '{schedule}' (gpipe or 1f1b)", nameof(schedule));
        }
        return passes;
    }

    /// <summary>The most micro-batches whose activations a stage holds at once under <paramref name="passes"/>.</summary>
    public static int PeakInFlight(IReadOnlyList<PipelinePass> passes)
    {
        int alive = 0, peak = 0;
        foreach (var p in passes) peak = Math.Max(peak, alive += p.Forward ? 1 : -1);
        return peak;
    }
}
