using System.CommandLine;
using Distributed.Training.Checkpoints;

namespace Distributed.Cli;

/// <summary>
/// <c>dtrain export</c>: a checkpoint's model weights, whatever layout wrote it, as one plain safetensors file under
/// the single-process parameter names (for Python tools, or to share a model without its optimizer state).
/// </summary>
static class ExportCommand
{
    public static Command Create()
    {
        var checkpoint = new Argument<string>("checkpoint") { Description = "a checkpoint directory (runs/NAME/checkpoints/step-NNNNNNNN)" };
        var output = new Argument<string>("output") { Description = "the safetensors file to write (replaced if it exists)" };
        var command = new Command("export", "write a checkpoint's model weights as one safetensors file") { checkpoint, output };
        command.SetAction(parse =>
        {
            string from = parse.GetValue(checkpoint)!, to = parse.GetValue(output)!;
            var (tensors, bytes) = CheckpointExport.Write(from, to);
            Console.WriteLine($"exported {tensors} tensors ({bytes:N0} bytes) of {from} to {to}");
            return 0;
        });
        return command;
    }
}
