using System.Diagnostics;

namespace Distributed.Tests;

/// <summary>Runs a tool to completion with a deadline (kubectl, node, build scripts, ip/nft), capturing its output.</summary>
static class TestProcesses
{
    public sealed record Result(int ExitCode, string Stdout, string Stderr)
    {
        public string Output => Stdout + Stderr;
    }

    /// <param name="environment">null: this process's; otherwise exactly these variables</param>
    public static Result Run(string file, IEnumerable<string> args, TimeSpan timeout, string? workingDirectory = null, string? stdin = null,
        IReadOnlyDictionary<string, string>? environment = null)
    {
        var info = new ProcessStartInfo(file)
        {
            WorkingDirectory = workingDirectory ?? TestSupport.RepoRoot, RedirectStandardOutput = true, RedirectStandardError = true,
            RedirectStandardInput = stdin is not null,
        };
        foreach (var a in args) info.ArgumentList.Add(a);
        if (environment is not null)
        {
            info.Environment.Clear();
            foreach (var (k, v) in environment) info.Environment[k] = v;
        }
        using var process = Process.Start(info)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        if (stdin is not null)
        {
            process.StandardInput.Write(stdin);
            process.StandardInput.Close();
        }
        if (!process.WaitForExit(timeout))
        {
            process.Kill(entireProcessTree: true);
            throw new TimeoutException($"{file} {string.Join(' ', args)} did not finish within {timeout.TotalSeconds:0} s");
        }
        return new Result(process.ExitCode, stdout.Result, stderr.Result);
    }

    /// <summary>Whether <paramref name="file"/> runs at all (`--version` or the given arguments exit 0).</summary>
    public static bool Works(string file, params string[] args)
    {
        try { return Run(file, args.Length > 0 ? args : ["--version"], TimeSpan.FromSeconds(30)).ExitCode == 0; }
        catch (System.ComponentModel.Win32Exception) { return false; }
    }
}
