using static TorchSharp.torch;

namespace Distributed.Tests;

public class TorchRuntimeTests
{
    [Fact]
    public void TensorsComputeInsideTheTestProcess()
    {
        // Fails with TypeInitializationException if the build did not patch libLibTorchSharp.so on Debian 12.
        using var a = tensor(new float[] { 1, 2, 3, 4 }, [2, 2]);
        using var b = a.matmul(a);
        Assert.Equal(new float[] { 7, 10, 15, 22 }, b.data<float>().ToArray());
    }
}
