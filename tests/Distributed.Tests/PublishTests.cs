namespace Distributed.Tests;

/// <summary>
/// build/publish, the step the Dockerfile runs, makes a folder that works on its own: with only the .NET and ASP.NET
/// Core runtimes (what the runtime image has: no SDK, no NuGet cache), from an empty working directory, it prints its
/// help and runs a 20-step cluster job (the launcher starts the coordinator and a worker from the folder's apphost).
/// </summary>
public class PublishTests(Xunit.Abstractions.ITestOutputHelper log)
{
    [Fact]
    public void ThePublishedFolderRunsAJobFromACleanDirectoryWithTheRuntimeAlone()
    {
        if (!OperatingSystem.IsLinux()) return;
        string root = TestSupport.TempDir("publish");
        try
        {
            string output = Path.Combine(root, "app");
            // A build tree of its own (kept between runs: incremental), so the Release build never touches the Debug one running these tests.
            string artifacts = Path.Combine(TestSupport.RepoRoot, "tests", "Distributed.Tests", "obj", "publish-artifacts");
            var clock = System.Diagnostics.Stopwatch.StartNew();
            var publish = TestProcesses.Run(Path.Combine(TestSupport.RepoRoot, "build", "publish"), [output, "--artifacts-path", artifacts], TimeSpan.FromMinutes(10));
            Assert.True(publish.ExitCode == 0, publish.Output);
            log.WriteLine($"build/publish: {clock.Elapsed.TotalSeconds:F1} s, {Directory.GetFiles(output, "*", SearchOption.AllDirectories).Sum(f => new FileInfo(f).Length) / 1e6:F0} MB");

            Assert.True(File.Exists(Path.Combine(output, "dtrain")), "no apphost");
            Assert.True(File.Exists(Path.Combine(output, "akka.conf")), "akka.conf is not beside the binary");
            Assert.True(File.Exists(Path.Combine(output, "libLibTorchSharp.so")), "TorchSharp's native library is not in the folder");
            Assert.Empty(Directory.GetFiles(output, "*.runtimeconfig.dev.json"));
            Assert.False(Directory.Exists(Path.Combine(output, "ref")), "reference assemblies (SDK-only) were published");
            Assert.Empty(Directory.GetFiles(output, "xunit*.dll"));

            // The runtime image: .NET and ASP.NET Core, no SDK; an empty home, so no NuGet cache can fill a gap.
            string runtime = RuntimeOnlyDotnet(Path.Combine(root, "runtime"));
            string home = Directory.CreateDirectory(Path.Combine(root, "home")).FullName;
            string clean = Directory.CreateDirectory(Path.Combine(root, "clean")).FullName;
            var environment = new Dictionary<string, string> { ["PATH"] = "/usr/bin:/bin", ["HOME"] = home, ["DOTNET_ROOT"] = runtime, ["CI"] = "true" };
            string dtrain = Path.Combine(output, "dtrain");

            clock.Restart();
            var help = TestProcesses.Run(dtrain, ["--help"], TimeSpan.FromMinutes(1), clean, environment: environment);
            log.WriteLine($"dtrain --help: exit {help.ExitCode} in {clock.Elapsed.TotalSeconds:F1} s");
            Assert.True(help.ExitCode == 0, help.Output);
            Assert.Contains("coordinator", help.Output);
            Assert.Contains("worker", help.Output);

            string run = Path.Combine(clean, "run");
            string[] job =
            [
                "train", "--workers", "1", "--config", Path.Combine(output, "cluster-config", "shakespeare-char.conf"),
                .. TestSupport.TinyJobOverrides(run).Where(o => !o.StartsWith("data.path=", StringComparison.Ordinal))
                    .Append($"data.path={Path.Combine(output, "data", "tinyshakespeare.txt")}").SelectMany(o => new[] { "--set", o }),
            ];
            clock.Restart();
            var train = TestProcesses.Run(dtrain, job, TimeSpan.FromMinutes(3), clean, environment: environment);
            log.WriteLine($"dtrain train (a coordinator and a worker, 20 steps): exit {train.ExitCode} in {clock.Elapsed.TotalSeconds:F1} s");
            Assert.True(train.ExitCode == 0, train.Output);
            Assert.Contains("20 steps in", train.Output);
            Assert.True(File.Exists(Path.Combine(run, "checkpoints", "step-00000020", "manifest.json")), train.Output);
            Assert.Equal(["run"], Directory.GetFileSystemEntries(clean).Select(Path.GetFileName));   // nothing else written to the working directory
        }
        finally
        {
            Directory.Delete(root, recursive: true);   // about 500 MB
        }
    }

    /// <summary>A .NET root with the host and the shared runtimes of this one, and nothing of the SDK.</summary>
    static string RuntimeOnlyDotnet(string directory)
    {
        // typeof(object) lives in <root>/shared/Microsoft.NETCore.App/<version>/.
        string dotnetRoot = Path.GetFullPath(Path.Combine(Path.GetDirectoryName(typeof(object).Assembly.Location)!, "..", "..", ".."));
        Directory.CreateDirectory(Path.Combine(directory, "shared"));
        File.CreateSymbolicLink(Path.Combine(directory, "dotnet"), Path.Combine(dotnetRoot, "dotnet"));
        Directory.CreateSymbolicLink(Path.Combine(directory, "host"), Path.Combine(dotnetRoot, "host"));
        foreach (string framework in new[] { "Microsoft.NETCore.App", "Microsoft.AspNetCore.App" })
            Directory.CreateSymbolicLink(Path.Combine(directory, "shared", framework), Path.Combine(dotnetRoot, "shared", framework));
        Assert.False(Directory.Exists(Path.Combine(directory, "sdk")));
        return directory;
    }
}
