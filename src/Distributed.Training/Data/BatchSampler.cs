using Distributed.Core;

namespace Distributed.Training.Data;

/// <summary>
/// Draws (input, target) windows as a pure function of (seed, step, window index). Window i of a step's global
/// batch is the same whichever rank draws it; data-parallel rank r of n takes windows [r*B/n, (r+1)*B/n), split
/// further into accumulation micro-batches. So dp ranks together draw exactly what one process draws, and a
/// resumed run needs no sampler state beyond the step number.
/// </summary>
public sealed class BatchSampler(int[] tokens, int blockSize, long seed, ulong stream)
{
    // Valid starts leave room for the target shifted by one: [0, length - blockSize).
    readonly long _starts = tokens.Length - blockSize;

    public int BlockSize => blockSize;

    /// <summary>Start offset of window <paramref name="index"/> of step <paramref name="step"/>.</summary>
    public long WindowStart(long step, int index) => (long)(Seeds.Derive(seed, stream, step, index) % (ulong)_starts);

    /// <summary>The global-batch window indices that one rank's micro-batch covers.</summary>
    public static (int First, int Count) Slice(int globalBatch, int dpRank, int dpSize, int microStep, int gradAccum)
    {
        if (dpRank < 0 || dpRank >= dpSize) throw new ArgumentOutOfRangeException(nameof(dpRank), $"rank {dpRank} outside 0..{dpSize - 1}");
        if (globalBatch % (dpSize * gradAccum) != 0)
            throw new ArgumentException($"global batch {globalBatch} does not split over {dpSize} ranks x {gradAccum} accumulation steps");
        int perMicro = globalBatch / (dpSize * gradAccum);
        return (dpRank * (globalBatch / dpSize) + microStep * perMicro, perMicro);
    }

    /// <summary>Fills row-major [count, blockSize] inputs and targets (targets are inputs shifted by one).</summary>
    public (long[] Inputs, long[] Targets) Draw(long step, int first, int count)
    {
        var x = new long[count * blockSize];
        var y = new long[count * blockSize];
        for (int row = 0; row < count; row++)
        {
            long start = WindowStart(step, first + row);
            for (int t = 0; t < blockSize; t++)
            {
                x[row * blockSize + t] = tokens[start + t];
                y[row * blockSize + t] = tokens[start + t + 1];
            }
        }
        return (x, y);
    }
}
