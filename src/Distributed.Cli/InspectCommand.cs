using System.CommandLine;
using Distributed.Training.Checkpoints;

namespace Distributed.Cli;

static class InspectCommand
{
    public static Command Create()
    {
        var path = new Argument<string>("path") { Description = "a checkpoint file, or a run directory (lists its checkpoints)" };
        var command = new Command("inspect", "show a checkpoint's step, config, tensors and whether its hash verifies") { path };
        command.SetAction(parse =>
        {
            string target = parse.GetValue(path)!;
            if (Directory.Exists(target))
            {
                string dir = Directory.Exists(Path.Combine(target, "checkpoints")) ? Path.Combine(target, "checkpoints") : target;
                var files = CheckpointFiles.List(dir);
                if (files.Count == 0) throw new Core.CheckpointException($"no checkpoints in '{dir}'");
                foreach (var (step, file) in files)
                {
                    var (ok, _, actual) = CheckpointFiles.Verify(file);
                    Console.WriteLine($"step {step,8}  {(ok ? "verified" : "CORRUPT ")}  sha256 {actual}  {new FileInfo(file).Length,12:N0} bytes  {file}");
                }
                return 0;
            }
            var (verified, expected, hash) = CheckpointFiles.Verify(target);
            if (!verified)
            {
                Console.Error.WriteLine($"error: checkpoint '{target}' is corrupt: SHA-256 {hash}, recorded {expected}");
                return 3;
            }
            using var checkpoint = CheckpointFiles.Load(target);
            Console.WriteLine($"checkpoint {target}");
            Console.WriteLine($"sha256     {hash} (verified)");
            foreach (var (key, value) in checkpoint.Metadata.OrderBy(p => p.Key, StringComparer.Ordinal))
                Console.WriteLine($"{key,-16} {(key == "vocab" ? System.Text.Json.JsonSerializer.Serialize(value) : value)}");
            long total = 0;
            foreach (var (name, tensor) in checkpoint.Tensors)
            {
                total += tensor.numel();
                Console.WriteLine($"  {name,-48} {tensor.dtype,-8} [{string.Join(", ", tensor.shape)}]");
            }
            Console.WriteLine($"{checkpoint.Tensors.Count} tensors, {total:N0} elements");
            return 0;
        });
        return command;
    }
}
