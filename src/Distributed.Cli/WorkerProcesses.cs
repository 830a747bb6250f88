using System.Diagnostics;

namespace Distributed.Cli;

/// <summary>
/// Worker processes of a local simulation: real OS processes running <c>dtrain worker</c>, killed (with their
/// process trees) on every way out. Each worker also watches this process and exits if it disappears.
/// </summary>
sealed class WorkerProcesses : IDisposable
{
    readonly List<(Process Process, Queue<string> Tail)> _workers = [];

    public WorkerProcesses(int count, string seed)
    {
        for (int i = 0; i < count; i++)
        {
            var info = SelfProcess.StartInfo("worker", "--seed", seed, "--parent-pid", Environment.ProcessId.ToString());
            info.RedirectStandardOutput = true;
            info.RedirectStandardError = true;
            info.Environment["DOTNET_gcServer"] = "0";
            var process = Process.Start(info) ?? throw new InvalidOperationException("could not start a worker process");
            var tail = new Queue<string>();
            void Keep(string? line)
            {
                if (line is null) return;
                lock (tail) { tail.Enqueue(line); if (tail.Count > 20) tail.Dequeue(); }
                if (line.Contains("fail:", StringComparison.Ordinal) || line.Contains("crit:", StringComparison.Ordinal))
                    Console.Error.WriteLine($"[worker pid {process.Id}] {line}");
            }
            process.OutputDataReceived += (_, e) => Keep(e.Data);
            process.ErrorDataReceived += (_, e) => Keep(e.Data);
            process.BeginOutputReadLine();
            process.BeginErrorReadLine();
            _workers.Add((process, tail));
        }
    }

    public IReadOnlyList<Process> Processes => _workers.Select(w => w.Process).ToList();

    /// <summary>Completes with a description when a worker exits before the job is over.</summary>
    public async Task<string> FirstUnexpectedExit(CancellationToken cancellationToken)
    {
        var exits = _workers.Select(async w =>
        {
            await w.Process.WaitForExitAsync(cancellationToken);
            string last;
            lock (w.Tail) last = w.Tail.LastOrDefault(l => l.Trim().Length > 0) ?? "(no output)";
            int code = w.Process.ExitCode;
            string how = code > 128 ? $"was killed by signal {code - 128}" : $"exited with code {code}";
            return $"worker pid {w.Process.Id} {how}; its last output: {last.Trim()}";
        });
        return await await Task.WhenAny(exits);
    }

    public void Dispose()
    {
        var grace = System.Diagnostics.Stopwatch.StartNew();
        foreach (var (process, _) in _workers)
        {
            try
            {
                // A worker that was told to stop gets up to 3 s (in total) to exit by itself; then it is killed.
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
