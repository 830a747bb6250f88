using System.Diagnostics;

namespace Distributed.Cli;

/// <summary>One process of a local simulation: its role, its command line, and the last lines it printed.</summary>
sealed class ChildProcess
{
    public required string Role { get; init; }
    public required string[] Arguments { get; init; }
    public required Process Process { get; init; }
    public Queue<string> Tail { get; } = new();

    public string LastOutput
    {
        get { lock (Tail) return Tail.LastOrDefault(l => l.Trim().Length > 0)?.Trim() ?? "(no output)"; }
    }

    public string DescribeExit()
    {
        int code = Process.ExitCode;
        string how = code > 128 ? $"was killed by signal {code - 128}" : $"exited with code {code}";
        return $"{Role} pid {Process.Id} {how}; its last output: {LastOutput}";
    }
}

/// <summary>
/// The processes of a local simulation (the role torchrun's agent plays): one coordinator and N workers, real OS
/// processes running <c>dtrain coordinator</c> / <c>dtrain worker</c>. A process that dies is replaced by a new one
/// with the same command line, until the job ends; on every way out all of them are stopped. Each child also
/// watches this process and exits if it disappears.
/// </summary>
sealed class JobProcesses : IDisposable
{
    /// <summary>A child exiting with this code failed in a way a restart would repeat (an unreadable journal).</summary>
    public const int DoNotRestartExitCode = Core.ExitCodes.Unrecoverable;

    readonly List<ChildProcess> _children = [];
    readonly object _gate = new();
    readonly string _logDirectory;

    /// <param name="logDirectory">every child's output goes to role-pid.log here (warnings and errors also to this console)</param>
    /// <param name="workerArguments">what every worker is also given (its security)</param>
    public JobProcesses(string[] coordinatorArguments, int workers, string seed, string logDirectory, string[] workerArguments)
    {
        _logDirectory = logDirectory;
        Directory.CreateDirectory(logDirectory);
        Start("coordinator", [.. coordinatorArguments, "--parent-pid", Environment.ProcessId.ToString()]);
        for (int i = 0; i < workers; i++) Start("worker", ["worker", "--seed", seed, "--parent-pid", Environment.ProcessId.ToString(), .. workerArguments]);
    }

    public IReadOnlyList<ChildProcess> Children { get { lock (_gate) return _children.ToList(); } }

    public int Restarts { get; private set; }

    /// <summary>Completes with the first child (of those running now) that exits.</summary>
    public async Task<ChildProcess> NextExit(CancellationToken cancellationToken)
    {
        var running = Children;
        var exited = await Task.WhenAny(running.Select(async c => { await c.Process.WaitForExitAsync(cancellationToken); return c; }));
        return await exited;
    }

    /// <summary>Starts a replacement for a child that exited: same role, same command line.</summary>
    public ChildProcess Replace(ChildProcess dead)
    {
        lock (_gate)
        {
            _children.Remove(dead);
            Restarts++;
        }
        dead.Process.Dispose();
        return Start(dead.Role, dead.Arguments);
    }

    ChildProcess Start(string role, string[] arguments)
    {
        var info = SelfProcess.StartInfo(arguments);
        info.RedirectStandardOutput = true;
        info.RedirectStandardError = true;
        info.Environment["DOTNET_gcServer"] = "0";
        // The coordinator is control plane: nothing in it runs hot enough to repay the optimizing JIT, which took 1.2-1.4 s
        // of CPU from the workers during their first 300 steps on 2 cores (README "Scaling"). Its code stays at tier 0
        // (65535 calls is the runtime's cap); a value the user set wins.
        if (role == "coordinator") info.Environment.TryAdd("DOTNET_TC_CallCountThreshold", "65535");
        var process = Process.Start(info) ?? throw new InvalidOperationException($"could not start a {role} process");
        var child = new ChildProcess { Role = role, Arguments = arguments, Process = process };
        var log = new StreamWriter(Path.Combine(_logDirectory, $"{role}-{process.Id}.log")) { AutoFlush = true };
        void Keep(string? line)
        {
            if (line is null) return;
            lock (log) log.WriteLine(line);
            lock (child.Tail) { child.Tail.Enqueue(line); if (child.Tail.Count > 20) child.Tail.Dequeue(); }
            if (line.Contains("warn:", StringComparison.Ordinal) || line.Contains("fail:", StringComparison.Ordinal) ||
                line.Contains("crit:", StringComparison.Ordinal))
                Logging.WriteLine($"[{role} pid {process.Id}] {line.Trim()}", error: true);
        }
        process.OutputDataReceived += (_, e) => Keep(e.Data);
        process.ErrorDataReceived += (_, e) => Keep(e.Data);
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        lock (_gate) _children.Add(child);
        return child;
    }

    /// <summary>Kills every child now (the job is abandoned: nothing to wait for).</summary>
    public void KillAll()
    {
        foreach (var child in Children)
        {
            try { child.Process.Kill(entireProcessTree: true); }
            catch (InvalidOperationException) { }
        }
    }

    public void Dispose()
    {
        var grace = Stopwatch.StartNew();
        foreach (var child in Children)
        {
            var process = child.Process;
            try
            {
                // A process that was told to stop gets up to 3 s (in total) to exit by itself; then it is killed.
                var left = TimeSpan.FromSeconds(3) - grace.Elapsed;
                if (left > TimeSpan.Zero) process.WaitForExit(left);
                if (!process.HasExited) process.Kill(entireProcessTree: true);
                process.WaitForExit(5000);
            }
            catch (InvalidOperationException) { }
            process.Dispose();
        }
    }
}
