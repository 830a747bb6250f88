using System.Diagnostics;
using System.Text.RegularExpressions;

namespace Distributed.Tests;

/// <summary>
/// `dtrain train` on a real terminal (a tmux pane, 160 columns): log lines print above the live progress display
/// without tearing it, and the display ends with one clean summary. The screen is read back as a person sees it.
/// </summary>
public class TerminalTests
{
    static string Tmux(params string[] args)
    {
        var info = new ProcessStartInfo(ToolFactAttribute.Find("tmux")!) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in args) info.ArgumentList.Add(a);
        info.Environment["TERM"] = "xterm-256color";
        info.Environment.Remove("CI");   // a person's terminal: the live display is on
        using var p = Process.Start(info)!;
        string output = p.StandardOutput.ReadToEnd();
        string error = p.StandardError.ReadToEnd();
        p.WaitForExit();
        Assert.True(p.ExitCode == 0, $"tmux {string.Join(' ', args)}: {error}");
        return output;
    }

    static string Quote(string s) => "'" + s.Replace("'", "'\\''") + "'";

    static readonly Regex[] Allowed =
    [
        new(@"^\d\d:\d\d:\d\d (info|warn|fail|crit): \S+\[\d+\] \S"),   // a log line (ours or a worker's warning relayed)
        new(@"^\[(worker|coordinator) pid \d+\] "),
        new(@"^step \d+: train loss \d+\.\d{4}, val loss \d+\.\d{4} \(perplexity \d+\.\d\d\)$"),
        new(@"^checkpoint \S+step-\d{8}$"),
        new(@"^\d+ steps in \d+\.\d s, [\d,]+ tokens/s \(including evaluation and checkpoints\)$"),
        new(@"^metrics: \S+metrics\.jsonl; checkpoints: \S+$"),
        new(@"^dtrain exited 0$"),
    ];

    [ToolFact("tmux")]
    public void LogLinesPrintAboveTheLiveDisplayAndTheRunEndsWithOneSummary()
    {
        string dir = TestSupport.TempDir("terminal");
        string session = "dtrain-test-" + Guid.NewGuid().ToString("N")[..8];
        var args = TestSupport.TrainArgs(dir, 2, ["train.max-iters=60", "train.eval-interval=20", "checkpoint.every=20", "train.log-interval=5"]);
        string command = $"cd {Quote(dir)} && dotnet {Quote(Path.Combine(AppContext.BaseDirectory, "dtrain.dll"))} {string.Join(' ', args.Select(Quote))}; " +
            "echo \"dtrain exited $?\"; sleep 120";
        Tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "50", command);
        try
        {
            string screen = "";
            var clock = Stopwatch.StartNew();
            while (!(screen = Tmux("capture-pane", "-p", "-J", "-S", "-", "-t", session)).Contains("dtrain exited"))
            {
                Assert.True(clock.Elapsed < TimeSpan.FromMinutes(3), $"dtrain did not finish in 3 minutes; screen:\n{screen}");
                Thread.Sleep(500);
            }
            var lines = screen.Split('\n').Select(l => l.TrimEnd()).Where(l => l.Length > 0).ToList();
            Assert.Contains("dtrain exited 0", lines);
            // Every line whole: nothing but complete log lines, evaluations and the summary; no remnant of the progress bar.
            foreach (var line in lines)
            {
                Assert.True(Allowed.Any(r => r.IsMatch(line)), $"a torn or stray line on the screen: '{line}'\nscreen:\n{screen}");
                Assert.False(Regex.IsMatch(line, @".\d\d:\d\d:\d\d (info|warn|fail): "), $"two lines run together: '{line}'");
                Assert.DoesNotMatch(@"\d+%", line);
            }
            Assert.Single(lines, l => l.Contains(" steps in ", StringComparison.Ordinal));
            Assert.Matches(@"^step 60: train loss", lines[^4]);   // the summary, at the end, in one piece
            Assert.Matches(@"^60 steps in ", lines[^3]);
            Assert.True(File.Exists(Path.Combine(dir, "loss.png")), "the run draws loss.png when it ends");
        }
        finally
        {
            Tmux("kill-session", "-t", session);
        }
    }
}
