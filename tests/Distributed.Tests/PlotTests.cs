using System.Text.Json;
using SkiaSharp;

namespace Distributed.Tests;

/// <summary>dtrain plot on a run directory: the PNG decodes, has the size it should, and its panels hold plotted curves and marks.</summary>
public class PlotTests
{
    static SKColor Rgb(OxyPlot.OxyColor c) => new(c.R, c.G, c.B);

    [Fact]
    public void PlotDecodesWithCurvesRestartsAndCheckpoints()
    {
        string dir = TestSupport.TempDir("plot");
        // A run of 300 steps, restarted once at step 200 (after a commit), as metrics.jsonl, eval.jsonl, commits.jsonl and recovery.jsonl hold it.
        double t0 = 1.79e9;
        File.WriteAllLines(Path.Combine(dir, "metrics.jsonl"), Enumerable.Range(1, 300).Select(s => JsonSerializer.Serialize(new
        {
            step = s, loss = 4.2 * Math.Exp(-s / 120.0) + 1.5, lr = 1e-3 * Math.Min(1, s / 50.0) * (0.55 + 0.45 * Math.Cos(Math.PI * s / 300)), grad_norm = 1.0, tokens_per_s = 19000 + 500 * Math.Sin(s / 10.0),
            step_ms = 40.0, wall_time = t0 + s * 0.04 + (s > 200 ? 5 : 0),
        })));
        File.WriteAllLines(Path.Combine(dir, "eval.jsonl"), new[] { 100, 200, 300 }.Select(s => JsonSerializer.Serialize(new
            { step = s, train_loss = 4.2 * Math.Exp(-s / 120.0) + 1.5, val_loss = 4.2 * Math.Exp(-s / 120.0) + 1.6, val_perplexity = 1.0 })));
        foreach (var s in new[] { 100, 200, 300 })
            Distributed.Training.Checkpoints.CommitLog.Append(dir, new(s, 1, 1000, 0.05, DateTime.UnixEpoch.AddSeconds(t0 + s * 0.04)));
        File.WriteAllText(Path.Combine(dir, "recovery.jsonl"), JsonSerializer.Serialize(new { resumed_step = 200, fault_wall_time = t0 + 8.2 }) + "\n");

        string png = Path.Combine(dir, "out", "curves.png");
        var result = TestSupport.RunCli(dir, "plot", dir, "--out", png);
        Assert.True(result.ExitCode == 0, result.Stderr + result.Stdout);
        Assert.Contains("wrote", result.Stdout);

        using var bitmap = SKBitmap.Decode(png);
        Assert.NotNull(bitmap);
        Assert.Equal((1400, 1200), (bitmap.Width, bitmap.Height));
        // Count each series' colour in its panel (left column: against steps; right: against wall time; rows: loss, lr, tokens/s).
        int Count(SKColor color, int column, int row)
        {
            int n = 0;
            for (int y = row * 400; y < (row + 1) * 400; y++)
                for (int x = column * 700; x < (column + 1) * 700; x++)
                {
                    var p = bitmap.GetPixel(x, y);
                    if (Math.Abs(p.Red - color.Red) + Math.Abs(p.Green - color.Green) + Math.Abs(p.Blue - color.Blue) < 40) n++;
                }
            return n;
        }
        foreach (int column in new[] { 0, 1 })
        {
            Assert.True(Count(Rgb(Distributed.Cli.RunPlot.TrainColor), column, 0) > 500, $"train loss curve, column {column}");
            Assert.True(Count(Rgb(Distributed.Cli.RunPlot.ValColor), column, 0) > 30, $"validation dots, column {column}");
            Assert.True(Count(Rgb(Distributed.Cli.RunPlot.RateColor), column, 1) > 300, $"learning rate, column {column}");
            Assert.True(Count(Rgb(Distributed.Cli.RunPlot.ThroughputColor), column, 2) > 500, $"tokens/s, column {column}");
            Assert.True(Count(SKColors.Red, column, 2) > 200, $"the restart mark, column {column}");
        }
        if (Environment.GetEnvironmentVariable("DTRAIN_SCREENSHOTS") is { Length: > 0 } keep) File.Copy(png, Path.Combine(keep, "plot.png"), overwrite: true);
    }
}
