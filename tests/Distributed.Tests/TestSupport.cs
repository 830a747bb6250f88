using System.Diagnostics;
using Distributed.Cluster.Config;
using Distributed.Core;
using Microsoft.Extensions.Logging.Abstractions;

namespace Distributed.Tests;

static class TestSupport
{
    public static readonly string RepoRoot = FindRepoRoot();

    public static string Corpus => Path.Combine(RepoRoot, "data", "tinyshakespeare.txt");

    static string FindRepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "Distributed.sln"))) return dir.FullName;
        throw new InvalidOperationException("Distributed.sln not found above the test binaries");
    }

    public static string TempDir(string name)
    {
        string dir = Path.Combine(Path.GetTempPath(), "dtrain-tests", name + "-" + Guid.NewGuid().ToString("N")[..8]);
        Directory.CreateDirectory(dir);
        return dir;
    }

    /// <summary>A small job on the real corpus that trains in well under a second per few steps.</summary>
    public static JobSpec TinyJob(string runDir, params string[] overrides) => JobConfigLoader.Load(
        Path.Combine(RepoRoot, "cluster-config", "shakespeare-char.conf"), [.. TinyJobOverrides(runDir), .. overrides]);

    public static string[] TinyJobOverrides(string runDir) =>
    [
        $"run.dir={runDir}", $"data.path={Corpus}", "run.threads=1",
        "model.n-layer=2", "model.n-head=2", "model.n-embd=32", "model.block-size=16",
        "train.batch-size=4", "train.max-iters=20", "train.eval-interval=10", "train.eval-iters=2",
        "optimizer.warmup-iters=5", "optimizer.lr-decay-iters=20", "checkpoint.every=10",
    ];

    public static readonly NullLogger Logger = NullLogger.Instance;

    /// <summary>Arguments of `dtrain train --workers N` on the tiny job in <paramref name="runDir"/>, plus overrides.</summary>
    public static string[] TrainArgs(string runDir, int workers, IEnumerable<string> overrides, bool resume = false)
    {
        var args = new List<string> { "train", "--workers", $"{workers}", "--config", Path.Combine(RepoRoot, "cluster-config", "shakespeare-char.conf") };
        if (resume) args.Add("--resume");
        foreach (var kv in TinyJobOverrides(runDir).Concat(overrides)) { args.Add("--set"); args.Add(kv); }
        return [.. args];
    }

    /// <summary>Runs dtrain as a real process (the binary built beside the tests).</summary>
    public static (int ExitCode, string Stdout, string Stderr) RunCli(string workingDirectory, params string[] args)
    {
        var info = new ProcessStartInfo("dotnet") { WorkingDirectory = workingDirectory, RedirectStandardOutput = true, RedirectStandardError = true };
        info.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "dtrain.dll"));
        foreach (var a in args) info.ArgumentList.Add(a);
        info.Environment["CI"] = "true";
        using var process = Process.Start(info)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        if (!process.WaitForExit(TimeSpan.FromMinutes(3)))
        {
            process.Kill(entireProcessTree: true);
            throw new TimeoutException($"dtrain {string.Join(' ', args)} did not finish in 3 minutes");
        }
        return (process.ExitCode, stdout.Result, stderr.Result);
    }
}
