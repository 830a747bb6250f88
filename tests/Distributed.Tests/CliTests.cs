namespace Distributed.Tests;

/// <summary>dtrain as a user runs it: a real process, its exit code and its one-line errors.</summary>
public class CliTests
{
    static void AssertOneLineError((int ExitCode, string Stdout, string Stderr) result, string expected)
    {
        Assert.NotEqual(0, result.ExitCode);
        Assert.Contains(expected, result.Stderr);
        Assert.DoesNotContain("   at ", result.Stderr);          // no stack trace
        Assert.DoesNotContain("Exception", result.Stderr);
        Assert.Single(result.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries));
    }

    static string Config => Path.Combine(TestSupport.RepoRoot, "cluster-config", "shakespeare-char.conf");

    [Fact]
    public void UnknownKeyWrongTypeAndRangeAreOneLineErrors()
    {
        string dir = TestSupport.TempDir("cli-config");
        AssertOneLineError(TestSupport.RunCli(dir, "train", "--config", Config, "--set", "train.max-itres=5"), "unknown config key 'train.max-itres'");
        AssertOneLineError(TestSupport.RunCli(dir, "train", "--config", Config, "--set", "train.max-iters=many"), "config key 'train.max-iters' must be an integer, got 'many'");
        AssertOneLineError(TestSupport.RunCli(dir, "train", "--config", Config, "--set", "optimizer.beta2=2"), "config key 'optimizer.beta2' is out of range: 2");
        AssertOneLineError(TestSupport.RunCli(dir, "train", "--config", "missing.conf"), "config file 'missing.conf' does not exist");
    }

    [Fact]
    public void MissingDataFileIsAOneLineError()
    {
        string dir = TestSupport.TempDir("cli-data");
        AssertOneLineError(TestSupport.RunCli(dir, "train", "--config", Config, "--set", "data.path=nowhere.txt"),
            "data file 'nowhere.txt' does not exist (config key 'data.path')");
    }

    [Fact]
    public void MissingAndCorruptCheckpointsAreOneLineErrors()
    {
        string dir = TestSupport.TempDir("cli-ckpt");
        AssertOneLineError(TestSupport.RunCli(dir, "sample", "--checkpoint", "none"), "checkpoint 'none' does not exist");
        AssertOneLineError(TestSupport.RunCli(dir, "train", "--config", Config, "--resume", "--set", "run.dir=empty-run", "--set", $"data.path={TestSupport.Corpus}"),
            "no checkpoint to resume from in 'empty-run'");

        var train = TestSupport.RunCli(dir, "train", "--workers", "0", "--config", Config, "--set", $"data.path={TestSupport.Corpus}", "--set", "run.dir=r",
            "--set", "train.max-iters=2", "--set", "model.n-layer=1", "--set", "model.n-embd=16", "--set", "train.eval-iters=1", "--set", "run.threads=1");
        Assert.True(train.ExitCode == 0, train.Stderr + train.Stdout);
        Assert.Contains("val loss", train.Stdout);
        string checkpoint = Path.Combine(dir, "r", "checkpoints", "step-00000002");
        string shard = Path.Combine(checkpoint, "shard-0-of-1.safetensors");

        var inspect = TestSupport.RunCli(dir, "inspect", checkpoint);
        Assert.Equal(0, inspect.ExitCode);
        Assert.Contains(", verified)", inspect.Stdout);
        Assert.Contains("model.wte.weight", inspect.Stdout);
        Assert.Contains("[65, 16]", inspect.Stdout);
        Assert.Contains("layout dp=1 x tp=1 x pp=1", inspect.Stdout);

        var export = TestSupport.RunCli(dir, "export", checkpoint, "model.safetensors");
        Assert.True(export.ExitCode == 0, export.Stderr + export.Stdout);
        Assert.Contains("exported", export.Stdout);
        Assert.True(File.Exists(Path.Combine(dir, "model.safetensors")));

        var sample = TestSupport.RunCli(dir, "sample", "--checkpoint", checkpoint, "--prompt", "ROMEO:", "--tokens", "20", "--seed", "3");
        Assert.Equal(0, sample.ExitCode);
        Assert.StartsWith("ROMEO:", sample.Stdout);
        Assert.Equal(sample.Stdout, TestSupport.RunCli(dir, "sample", "--checkpoint", checkpoint, "--prompt", "ROMEO:", "--tokens", "20", "--seed", "3").Stdout);

        var bytes = File.ReadAllBytes(shard);
        bytes[^1] ^= 0xff;
        File.WriteAllBytes(shard, bytes);
        AssertOneLineError(TestSupport.RunCli(dir, "sample", "--checkpoint", checkpoint), $"checkpoint '{checkpoint}' is corrupt: '{shard}' has SHA-256");
        AssertOneLineError(TestSupport.RunCli(dir, "inspect", checkpoint), "is corrupt");
        AssertOneLineError(TestSupport.RunCli(dir, "export", checkpoint, "again.safetensors"), "is corrupt");

        // Starting over in a run directory that holds checkpoints needs --overwrite.
        AssertOneLineError(TestSupport.RunCli(dir, "train", "--config", Config, "--set", "run.dir=r", "--set", $"data.path={TestSupport.Corpus}"), "already holds a job");
    }
}
