using Microsoft.Extensions.Logging;
using Spectre.Console;

namespace Distributed.Cli;

static class Logging
{
    /// <summary>
    /// Plain single-line console logs; on a terminal they go through Spectre.Console instead, which prints them above
    /// its live display and redraws the display below (the console logger's own thread would write across it).
    /// </summary>
    public static ILoggerFactory CreateFactory() => LoggerFactory.Create(builder =>
    {
        builder.SetMinimumLevel(LogLevel.Information);
        if (Interactive) builder.AddProvider(new LiveDisplayLoggerProvider());
        else builder.AddSimpleConsole(options =>
        {
            options.SingleLine = true;
            options.TimestampFormat = "HH:mm:ss ";
        });
    });

    /// <summary>Live displays only where a person watches a terminal; plain lines in CI and when redirected.</summary>
    public static bool Interactive =>
        !Console.IsOutputRedirected && string.IsNullOrEmpty(Environment.GetEnvironmentVariable("CI"));

    static readonly object Gate = new();

    /// <summary>A whole line to the terminal: above the live display when there is one, else to stdout or stderr.</summary>
    public static void WriteLine(string line, bool error = false)
    {
        if (!Interactive) { (error ? Console.Error : Console.Out).WriteLine(line); return; }
        lock (Gate) AnsiConsole.Write(new Text(line + "\n"));
    }

    sealed class LiveDisplayLoggerProvider : ILoggerProvider
    {
        public ILogger CreateLogger(string categoryName) => new LiveDisplayLogger(categoryName);
        public void Dispose() { }
    }

    /// <summary>The simple console format ("HH:mm:ss info: category[0] message"), one line per entry, written synchronously.</summary>
    sealed class LiveDisplayLogger(string category) : ILogger
    {
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(LogLevel logLevel) => logLevel >= LogLevel.Information;

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            if (!IsEnabled(logLevel)) return;
            string level = logLevel switch
            {
                LogLevel.Information => "info", LogLevel.Warning => "warn", LogLevel.Error => "fail", LogLevel.Critical => "crit", _ => "dbug",
            };
            string message = formatter(state, exception) + (exception is null ? "" : " " + exception.Message);
            WriteLine($"{DateTime.Now:HH:mm:ss} {level}: {category}[{eventId.Id}] {message.ReplaceLineEndings(" ")}");
        }
    }
}
