namespace Distributed.Core;

/// <summary>
/// Counter-based randomness: every random choice is a pure function of its coordinates (seed, stream, step, index),
/// so any rank can compute any draw without shared state, and a resumed run draws what an uninterrupted one would.
/// </summary>
public static class Seeds
{
    public const ulong TrainStream = 1, ValidationStream = 2, DropoutStream = 3, EvalStream = 4, FaultStream = 5,
        TensorParallelDropoutStream = 6;

    /// <summary>SplitMix64's finaliser: a bijection with good avalanche.</summary>
    public static ulong Mix(ulong x)
    {
        x += 0x9E3779B97F4A7C15UL;
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9UL;
        x = (x ^ (x >> 27)) * 0x94D049BB133111EBUL;
        return x ^ (x >> 31);
    }

    public static ulong Derive(long seed, ulong stream, long a, long b = 0)
    {
        ulong h = Mix((ulong)seed);
        h = Mix(h ^ stream);
        h = Mix(h ^ (ulong)a);
        return Mix(h ^ (ulong)b);
    }
}
