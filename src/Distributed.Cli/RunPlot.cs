using System.CommandLine;
using System.Text.Json;
using Distributed.Core;
using Distributed.Training.Checkpoints;
using Microsoft.Extensions.Logging;
using OxyPlot;
using OxyPlot.Annotations;
using OxyPlot.Axes;
using OxyPlot.Legends;
using OxyPlot.Series;
using OxyPlot.SkiaSharp;
using SkiaSharp;

namespace Distributed.Cli;

/// <summary>
/// A run's curves in one PNG: train and validation loss, learning rate and tokens/s against steps (left) and against
/// wall time (right), with checkpoint commits (grey dashes, from commits.jsonl) and restarts (red, from
/// recovery.jsonl) marked. Drawn with OxyPlot on SkiaSharp (text shaping off: HarfBuzz's natives are not needed).
/// </summary>
public static class RunPlot
{
    public const int Width = 1400, Height = 1200;
    public static readonly OxyColor TrainColor = OxyColor.FromRgb(0x2f, 0x6f, 0xdf), ValColor = OxyColor.FromRgb(0xe0, 0x66, 0x2b),
        RateColor = OxyColor.FromRgb(0x8e, 0x44, 0xad), ThroughputColor = OxyColor.FromRgb(0x1f, 0x9d, 0x55);

    public static Command Create()
    {
        var runDir = new Argument<string>("run-dir") { Description = "a run directory (metrics.jsonl, eval.jsonl, commits.jsonl, recovery.jsonl)" };
        var output = new Option<string?>("--out") { Description = "the PNG to write (default: RUN_DIR/loss.png)" };
        var command = new Command("plot", "draw a run's loss, learning rate and tokens/s against steps and wall time, with restarts and checkpoints") { runDir, output };
        command.SetAction(parse =>
        {
            string dir = parse.GetValue(runDir)!;
            if (!File.Exists(RunFiles.In(dir, RunFiles.Metrics))) throw new UserFacingException($"'{dir}' has no {RunFiles.Metrics} to plot");
            string file = parse.GetValue(output) ?? RunFiles.In(dir, RunFiles.LossPlot);
            Write(dir, file);
            Console.WriteLine($"wrote {file}");
            return 0;
        });
        return command;
    }

    /// <summary>Writes run.dir/loss.png at the end of a run; a failure to draw is logged, never fails the run.</summary>
    public static void TryWrite(string runDir, ILogger logger)
    {
        if (!File.Exists(RunFiles.In(runDir, RunFiles.Metrics))) return;
        try
        {
            Write(runDir, RunFiles.In(runDir, RunFiles.LossPlot));
            logger.LogInformation("Plot: {File}", RunFiles.In(runDir, RunFiles.LossPlot));
        }
        catch (Exception e) when (e is IOException or JsonException or DllNotFoundException or TypeInitializationException)
        {
            logger.LogWarning("Could not draw {File}: {Error}", RunFiles.In(runDir, RunFiles.LossPlot), e.Message);
        }
    }

    sealed record Step(long Number, double Loss, double LearningRate, double TokensPerSecond, double WallTime);
    sealed record Eval(long Step, double TrainLoss, double ValLoss);
    sealed record Mark(long Step, double WallTime);

    static IEnumerable<JsonElement> Lines(string path) =>
        File.Exists(path) ? File.ReadLines(path).Where(l => l.Trim().Length > 0).Select(l => JsonDocument.Parse(l).RootElement) : [];

    public static void Write(string runDir, string file)
    {
        var steps = Lines(RunFiles.In(runDir, RunFiles.Metrics)).Select(e => new Step(e.GetProperty("step").GetInt64(), e.GetProperty("loss").GetDouble(),
            e.GetProperty("lr").GetDouble(), e.GetProperty("tokens_per_s").GetDouble(), e.TryGetProperty("wall_time", out var w) ? w.GetDouble() : 0)).ToList();
        var evals = Lines(RunFiles.In(runDir, RunFiles.Evals)).Select(e => new Eval(e.GetProperty("step").GetInt64(), e.GetProperty("train_loss").GetDouble(),
            e.GetProperty("val_loss").GetDouble())).ToList();
        var commits = CommitLog.Read(runDir).Select(c => new Mark(c.Step, c.WallTime)).ToList();
        var restarts = Lines(RunFiles.In(runDir, RunFiles.Recoveries)).Select(r => new Mark(r.GetProperty("resumed_step").GetInt64(), r.GetProperty("fault_wall_time").GetDouble())).ToList();
        double start = steps.Count > 0 ? steps.Min(s => s.WallTime) : 0;
        double Minutes(double wallTime) => (wallTime - start) / 60;
        // An evaluation happens right after its step: it is drawn at that step's time.
        var timeOf = steps.GroupBy(s => s.Number).ToDictionary(g => g.Key, g => g.Last().WallTime);

        PlotModel Panel(string title, string yTitle, bool byTime, bool logY = false)
        {
            var model = new PlotModel { Title = title, TitleFontSize = 14, Background = OxyColors.White, PlotAreaBorderColor = OxyColors.Gray };
            model.Axes.Add(new LinearAxis { Position = AxisPosition.Bottom, Title = byTime ? "wall time (minutes)" : "step", MajorGridlineStyle = LineStyle.Dot });
            model.Axes.Add(logY ? new LogarithmicAxis { Position = AxisPosition.Left, Title = yTitle, MajorGridlineStyle = LineStyle.Dot }
                : new LinearAxis { Position = AxisPosition.Left, Title = yTitle, MajorGridlineStyle = LineStyle.Dot });
            foreach (var c in commits)
                model.Annotations.Add(new LineAnnotation { Type = LineAnnotationType.Vertical, X = byTime ? Minutes(c.WallTime) : c.Step, Color = OxyColor.FromAColor(120, OxyColors.Gray), LineStyle = LineStyle.Dash });
            foreach (var r in restarts)
                model.Annotations.Add(new LineAnnotation { Type = LineAnnotationType.Vertical, X = byTime ? Minutes(r.WallTime) : r.Step, Color = OxyColors.Red, StrokeThickness = 2, Text = "restart" });
            model.Legends.Add(new Legend { LegendPosition = LegendPosition.TopRight, LegendBackground = OxyColor.FromAColor(200, OxyColors.White) });
            return model;
        }
        LineSeries Line(string title, OxyColor color, IEnumerable<DataPoint> points)
        {
            var series = new LineSeries { Title = title, Color = color, StrokeThickness = 1.5 };
            series.Points.AddRange(points);
            return series;
        }
        ScatterSeries Dots(string title, OxyColor color, IEnumerable<ScatterPoint> points)
        {
            var series = new ScatterSeries { Title = title, MarkerFill = color, MarkerType = MarkerType.Circle, MarkerSize = 4 };
            series.Points.AddRange(points);
            return series;
        }

        var panels = new List<PlotModel>();
        foreach (bool byTime in new[] { false, true })
        {
            double X(long step, double wallTime) => byTime ? Minutes(wallTime) : step;
            var loss = Panel(byTime ? "loss against wall time" : "loss against steps", "loss", byTime);
            loss.Series.Add(Line("train", TrainColor, steps.Select(s => new DataPoint(X(s.Number, s.WallTime), s.Loss))));
            loss.Series.Add(Dots("validation", ValColor, evals.Select(e => new ScatterPoint(X(e.Step, timeOf.GetValueOrDefault(e.Step, start)), e.ValLoss))));
            var rate = Panel("learning rate", "learning rate", byTime);
            rate.Series.Add(Line("lr", RateColor, steps.Select(s => new DataPoint(X(s.Number, s.WallTime), s.LearningRate))));
            var throughput = Panel("throughput", "tokens/s", byTime);
            throughput.Series.Add(Line("tokens/s", ThroughputColor, steps.Select(s => new DataPoint(X(s.Number, s.WallTime), s.TokensPerSecond))));
            panels.AddRange([loss, rate, throughput]);
        }

        using var bitmap = new SKBitmap(Width, Height);
        using (var canvas = new SKCanvas(bitmap))
        using (var context = new SkiaRenderContext { RenderTarget = RenderTarget.PixelGraphic, SkCanvas = canvas, UseTextShaping = false })
        {
            canvas.Clear(SKColors.White);
            const int rows = 3;
            float w = Width / 2f, h = Height / (float)rows;
            for (int i = 0; i < panels.Count; i++)
            {
                // Left column against steps, right against wall time; rows: loss, learning rate, tokens/s.
                int column = i / rows, row = i % rows;
                canvas.Save();
                canvas.Translate(column * w, row * h);
                canvas.ClipRect(new SKRect(0, 0, w, h));
                IPlotModel model = panels[i];
                model.Update(true);
                model.Render(context, new OxyRect(0, 0, w, h));
                canvas.Restore();
            }
        }
        Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(file))!);
        using var image = SKImage.FromBitmap(bitmap);
        using var data = image.Encode(SKEncodedImageFormat.Png, 100);
        using var stream = File.Create(file);
        data.SaveTo(stream);
    }
}
