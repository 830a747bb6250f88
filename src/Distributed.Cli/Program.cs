using System.CommandLine;
using Distributed.Cli;
using Distributed.Core;

var root = new RootCommand("dtrain: distributed training of GPT models on TorchSharp")
{
    TrainCommand.Create(),
    SampleCommand.Create(),
    InspectCommand.Create(),
    ExportCommand.Create(),
    StatusCommand.Create(),
    RunPlot.Create(),
    CoordinatorCommand.Create(),
    WorkerCommand.Create(),
    BenchCommand.Create(),
};

try
{
    return await root.Parse(args).InvokeAsync(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
}
catch (UserFacingException e)
{
    // Bad input is one line that names the key, file or checkpoint; no stack trace.
    Console.Error.WriteLine($"error: {e.Message}");
    return 2;
}
catch (OperationCanceledException)
{
    Console.Error.WriteLine("stopped");
    return 130;
}
