using Distributed.Core;
using static TorchSharp.torch;

namespace Distributed.Training.Checkpoints;

/// <summary>
/// A checkpoint's model weights as one plain safetensors file, under the names a single-process model gives its
/// parameters ("wte.weight", "h.0.attn.c_attn.weight"): for tools that know nothing of shards, slices or layouts.
/// </summary>
public static class CheckpointExport
{
    public const string Format = "distributed-gpt-weights/1";

    /// <summary>
    /// Writes the global model weights of <paramref name="checkpoint"/> (assembled from any layout, in name order, so
    /// every layout of one state exports the same bytes) with its step, vocabulary and job into <paramref name="output"/>
    /// (a temporary file, then a rename). The weights are held in memory at once: a single-process model's worth.
    /// </summary>
    public static (int Tensors, long Bytes) Write(string checkpoint, string output)
    {
        using var loaded = CheckpointFiles.Load(checkpoint);
        var names = loaded.Stored.Keys.Where(n => n.StartsWith(CheckpointFiles.ModelPrefix, StringComparison.Ordinal)).Order(StringComparer.Ordinal).ToList();
        if (names.Count == 0) throw new CheckpointException($"checkpoint '{checkpoint}' holds no model weights ('{CheckpointFiles.ModelPrefix}*' tensors)");
        var metadata = new Dictionary<string, string>
        {
            ["format"] = Format,
            ["step"] = loaded.Require("step"),
            [CheckpointVocabulary.Key] = CheckpointVocabulary.Encode(CheckpointVocabulary.Read(loaded)),   // older checkpoints' too
        };
        if (loaded.Metadata.TryGetValue("job", out var job)) metadata["job"] = job;   // the model's shape, to rebuild it

        var tensors = new List<(string Name, Tensor Tensor)>();
        try
        {
            foreach (var name in names) tensors.Add((name[CheckpointFiles.ModelPrefix.Length..], loaded.ReadGlobal(name)));
            Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(output))!);
            string temp = output + ".tmp";
            using (var stream = new FileStream(temp, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20))
                SafeTensors.Write(stream, tensors, metadata, afterData: () => stream.Flush(flushToDisk: true));
            File.Move(temp, output, overwrite: true);
            return (tensors.Count, new FileInfo(output).Length);
        }
        finally
        {
            foreach (var (_, t) in tensors) t.Dispose();
        }
    }
}
