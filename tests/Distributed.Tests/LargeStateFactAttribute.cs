namespace Distributed.Tests;

/// <summary>
/// A test that needs several GiB of memory and disk (a tensor over 2 GiB, written and read back), so it runs only
/// where $DTRAIN_LARGE_TESTS=1 asks for it; elsewhere it is reported as skipped, with the reason, never passed.
/// </summary>
public sealed class LargeStateFactAttribute : FactAttribute
{
    public const string Variable = "DTRAIN_LARGE_TESTS";

    public LargeStateFactAttribute()
    {
        if (Environment.GetEnvironmentVariable(Variable) != "1") Skip = $"needs about 5 GiB of memory and 2.2 GB of disk: set {Variable}=1 to run it";
    }
}
