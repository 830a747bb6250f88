using System.CommandLine;
using Distributed.Cli;
using Distributed.Core;

var worker = WorkerCommand.Create();
var root = new RootCommand("dtrain: distributed training of GPT models on TorchSharp")
{
    TrainCommand.Create(),
    SampleCommand.Create(),
    InspectCommand.Create(),
    ExportCommand.Create(),
    StatusCommand.Create(),
    RunPlot.Create(),
    CoordinatorCommand.Create(),
    worker,
    BenchCommand.Create(),
    CertsCommand.Create(),
};

try
{
    var parsed = root.Parse(args);
    // A worker handles SIGTERM itself (a preemption: it checkpoints within its grace period); System.CommandLine
    // would end the process 2 s after cancelling.
    var terminationTimeout = parsed.CommandResult.Command == worker ? (TimeSpan?)null : TimeSpan.FromSeconds(2);
    return await parsed.InvokeAsync(new InvocationConfiguration { EnableDefaultExceptionHandler = false, ProcessTerminationTimeout = terminationTimeout });
}
catch (UserFacingException e)
{
    // Bad input is one line that names the key, file or checkpoint; no stack trace.
    Console.Error.WriteLine($"error: {e.Message}");
    return ExitCodes.ConfigurationError;
}
catch (OperationCanceledException)
{
    Console.Error.WriteLine("stopped");
    return 130;
}
