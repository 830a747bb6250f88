using Distributed.Cluster.Config;
using Distributed.Core;

namespace Distributed.Tests;

public class ConfigTests
{
    static readonly string DefaultConfig = Path.Combine(TestSupport.RepoRoot, "cluster-config", "shakespeare-char.conf");

    [Fact]
    public void DefaultConfigIsNanoGptsCpuRecipe()
    {
        var spec = JobConfigLoader.Load(DefaultConfig);
        Assert.Equal(new ModelSpec(4, 4, 128, 64, 0.0, false), spec.Model);
        Assert.Equal(new TrainSpec(12, 1, 2000, 250, 20, 10), spec.Train);
        Assert.Equal(new OptimizerSpec(1e-3, 1e-4, 100, 2000, 0.9, 0.99, 1e-8, 0.1, 1.0), spec.Optimizer);
        Assert.Equal(0.9, spec.Data.TrainFraction);
    }

    [Fact]
    public void AnEmptyConfigGivesTheSameDefaults()
    {
        Assert.Equal(JobConfigLoader.Load(DefaultConfig), JobConfigLoader.Parse(""));
    }

    [Fact]
    public void SetOverridesAKey()
    {
        var spec = JobConfigLoader.Load(DefaultConfig, ["train.max-iters=7", "model.bias=true"]);
        Assert.Equal(7, spec.Train.MaxIters);
        Assert.True(spec.Model.Bias);
    }

    [Fact]
    public void HoconRoundTripsThroughToHocon()
    {
        var spec = JobConfigLoader.Load(DefaultConfig, ["optimizer.learning-rate=0.00123", "run.name=x y"]);
        Assert.Equal(spec, JobConfigLoader.Parse(JobConfigLoader.ToHocon(spec)));
    }

    [Theory]
    [InlineData("train { bach-size = 12 }", "unknown config key 'train.bach-size'", "did you mean 'train.batch-size'")]
    [InlineData("train { batch-size = twelve }", "config key 'train.batch-size' must be an integer, got 'twelve'", null)]
    [InlineData("train { batch-size = 1.5 }", "config key 'train.batch-size' must be an integer", null)]
    [InlineData("optimizer { learning-rate = fast }", "config key 'optimizer.learning-rate' must be a number, got 'fast'", null)]
    [InlineData("model { bias = maybe }", "config key 'model.bias' must be true or false, got 'maybe'", null)]
    [InlineData("train { batch-size = 0 }", "config key 'train.batch-size' is out of range: 0", null)]
    [InlineData("model { dropout = 1.5 }", "config key 'model.dropout' is out of range: 1.5", null)]
    [InlineData("model { n-embd = 130 }", "config key 'model.n-embd' (130) must be divisible by 'model.n-head' (4)", null)]
    [InlineData("train { batch-size = 12, grad-accum = 5 }", "config key 'train.batch-size' (12) must be divisible by 'train.grad-accum' (5)", null)]
    [InlineData("cluster { compression = fp8 }", "config key 'cluster.compression' must be none or bf16, got 'fp8'", null)]
    [InlineData("cluster { transport = udp }", "config key 'cluster.transport' must be shm, tcp or grpc, got 'udp'", null)]
    [InlineData("cluster { kernels = cuda }", "config key 'cluster.kernels' must be auto, simd or ilgpu, got 'cuda'", null)]
    [InlineData("cluster { kernels = SIMD }", "config key 'cluster.kernels' must be auto, simd or ilgpu, got 'SIMD'", null)]
    [InlineData("model { n-layer = ${missing} }", "is not valid HOCON: Unresolved substitution: missing", null)]
    public void BadConfigNamesTheKey(string hocon, string expected, string? hint)
    {
        var error = Assert.Throws<ConfigException>(() => JobConfigLoader.Parse(hocon));
        Assert.Contains(expected, error.Message);
        if (hint is not null) Assert.Contains(hint, error.Message);
    }

    [Fact]
    public void BadSetNamesTheKey()
    {
        Assert.Contains("unknown config key 'nope'", Assert.Throws<ConfigException>(() => JobConfigLoader.Load(DefaultConfig, ["nope=1"])).Message);
        Assert.Contains("key=value", Assert.Throws<ConfigException>(() => JobConfigLoader.Load(DefaultConfig, ["train.max-iters"])).Message);
    }

    [Fact]
    public void MissingConfigFileIsNamed()
    {
        Assert.Contains("config file 'no/such.conf' does not exist", Assert.Throws<ConfigException>(() => JobConfigLoader.Load("no/such.conf")).Message);
    }

    [Fact]
    public void AkkaSectionsAreNotJobKeys()
    {
        var spec = JobConfigLoader.Parse("akka { loglevel = INFO }\ntrain { max-iters = 3 }");
        Assert.Equal(3, spec.Train.MaxIters);
    }
}
