using Distributed.Core;
using Distributed.Training;
using Microsoft.Extensions.Logging;
using Spectre.Console;

namespace Distributed.Cli;

/// <summary>A live progress bar for a terminal: step, loss, learning rate, tokens/s and time left.</summary>
static class ProgressDisplay
{
    /// <summary>Runs <paramref name="body"/> with a live display on a terminal, plain log lines otherwise.</summary>
    public static T Run<T>(JobSpec spec, ILogger logger, Func<ITrainingObserver, T> body) =>
        Logging.Interactive ? RunLive(body) : body(new LogLineObserver(logger, spec.Train.LogInterval));

    static T RunLive<T>(Func<ITrainingObserver, T> body)
    {
        T result = default!;
        // Cleared when training ends: the run's summary lines follow, and no half-drawn bar stays behind them.
        AnsiConsole.Progress()
            .AutoClear(true)
            .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(),
                     new ElapsedTimeColumn(), new RemainingTimeColumn())
            .Start(context =>
            {
                var task = context.AddTask("starting");
                result = body(new Observer(task));
            });
        return result;
    }

    sealed class Observer(ProgressTask task) : ITrainingObserver
    {
        public void OnStart(long firstStep, long lastStep)
        {
            task.MaxValue = lastStep;
            task.Value = firstStep;
        }

        public void OnStep(StepMetrics m)
        {
            task.Value = m.Step;
            task.Description = $"step {m.Step,5}  loss {m.Loss:F4}  lr {m.LearningRate:E2}  {m.TokensPerSecond,7:N0} tok/s";
        }

        public void OnCheckpoint(long step, string path) => Logging.WriteLine($"checkpoint {path}");

        public void OnEval(EvalResult r) =>
            AnsiConsole.MarkupLineInterpolated($"[green]step {r.Step}[/]: train loss {r.TrainLoss:F4}, val loss [bold]{r.ValLoss:F4}[/] (perplexity {r.ValPerplexity:F2})");
    }
}
