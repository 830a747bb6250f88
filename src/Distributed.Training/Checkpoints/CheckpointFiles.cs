using System.Security.Cryptography;
using Distributed.Core;
using Microsoft.Extensions.Logging;
using TorchSharp;
using static TorchSharp.torch;

namespace Distributed.Training.Checkpoints;

/// <summary>A checkpoint read back from disk: its metadata and its tensors by name.</summary>
public sealed class LoadedCheckpoint(string path, Dictionary<string, string> metadata, Dictionary<string, Tensor> tensors) : IDisposable
{
    public string Path { get; } = path;
    public IReadOnlyDictionary<string, string> Metadata { get; } = metadata;
    public IReadOnlyDictionary<string, Tensor> Tensors { get; } = tensors;

    public string Require(string key) => Metadata.TryGetValue(key, out var v)
        ? v : throw new CheckpointException($"checkpoint '{Path}' lacks metadata '{key}'");

    /// <summary>Copies the named tensors into <paramref name="targets"/>; a missing tensor or another shape is an error naming both.</summary>
    public void CopyInto(IEnumerable<(string Name, Tensor Tensor)> targets)
    {
        using var noGrad = no_grad();
        foreach (var (name, target) in targets)
        {
            if (!Tensors.TryGetValue(name, out var source))
                throw new CheckpointException($"checkpoint '{Path}' lacks tensor '{name}'");
            if (!source.shape.SequenceEqual(target.shape))
                throw new CheckpointException(
                    $"checkpoint '{Path}' tensor '{name}' has shape [{string.Join(", ", source.shape)}], the model needs [{string.Join(", ", target.shape)}]");
            target.copy_(source);
        }
    }

    public void Dispose()
    {
        foreach (var t in Tensors.Values) t.Dispose();
    }
}

/// <summary>
/// Checkpoint files on disk: <c>step-00000250.safetensors</c> plus <c>step-00000250.safetensors.sha256</c> in
/// sha256sum's format. Written atomically (temporary file, fsync, rename), verified before every load.
/// </summary>
public static class CheckpointFiles
{
    const string Extension = ".safetensors";

    public static string FileName(long step) => $"step-{step:D8}{Extension}";

    /// <summary>Writes a checkpoint atomically and returns its path and SHA-256 (hex).</summary>
    public static (string Path, string Sha256, long Bytes) Write(string directory, long step,
        IReadOnlyList<(string Name, Tensor Tensor)> tensors, IReadOnlyDictionary<string, string> metadata)
    {
        Directory.CreateDirectory(directory);
        string path = System.IO.Path.Combine(directory, FileName(step));
        string temp = path + ".tmp";
        byte[] hash;
        using (var stream = new FileStream(temp, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20))
        {
            hash = SafeTensors.Write(stream, tensors, metadata);
            stream.Flush(flushToDisk: true);
        }
        string hex = Convert.ToHexStringLower(hash);
        long bytes = new FileInfo(temp).Length;
        // The hash lands first, so a visible checkpoint always has one; a hash file without data is ignored.
        WriteAllTextDurably(path + ".sha256", $"{hex}  {System.IO.Path.GetFileName(path)}\n");
        File.Move(temp, path, overwrite: true);
        return (path, hex, bytes);
    }

    /// <summary>Checkpoint files in a directory, newest step first.</summary>
    public static IReadOnlyList<(long Step, string Path)> List(string directory)
    {
        if (!Directory.Exists(directory)) return [];
        return Directory.EnumerateFiles(directory, "step-*" + Extension)
            .Select(p => (Step: ParseStep(p), Path: p))
            .Where(p => p.Step >= 0)
            .OrderByDescending(p => p.Step)
            .ToList();
    }

    /// <summary>Verifies a checkpoint file against the SHA-256 recorded beside it; returns (ok, expected, actual).</summary>
    public static (bool Ok, string Expected, string Actual) Verify(string path)
    {
        if (!File.Exists(path)) throw new CheckpointException($"checkpoint '{path}' does not exist");
        string hashFile = path + ".sha256";
        if (!File.Exists(hashFile)) throw new CheckpointException($"checkpoint '{path}' has no recorded hash ('{hashFile}' is missing)");
        string expected = File.ReadAllText(hashFile).Split(' ', 2)[0].Trim();
        using var stream = File.OpenRead(path);
        string actual = Convert.ToHexStringLower(SHA256.HashData(stream));
        return (string.Equals(expected, actual, StringComparison.OrdinalIgnoreCase), expected, actual);
    }

    /// <summary>The newest checkpoint in <paramref name="directory"/> whose hash verifies; corrupt ones are logged and skipped.</summary>
    public static string? FindNewestValid(string directory, ILogger logger)
    {
        foreach (var (_, path) in List(directory))
        {
            var (ok, expected, actual) = Verify(path);
            if (ok) return path;
            logger.LogWarning("Checkpoint {Path} is corrupt: SHA-256 {Actual}, recorded {Expected}; trying an older one", path, actual, expected);
        }
        return null;
    }

    /// <summary>Loads a checkpoint after verifying its hash.</summary>
    public static LoadedCheckpoint Load(string path)
    {
        var (ok, expected, actual) = Verify(path);
        if (!ok) throw new CheckpointException($"checkpoint '{path}' is corrupt: SHA-256 {actual}, recorded {expected}");
        using var stream = File.OpenRead(path);
        var (metadata, entries, dataStart) = SafeTensors.ReadHeader(stream, path);
        var tensors = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        foreach (var entry in entries)
            tensors[entry.Name] = SafeTensors.ReadTensor(stream, dataStart, entry, path).DetachFromDisposeScope();
        return new LoadedCheckpoint(path, metadata, tensors);
    }

    /// <summary>Deletes all but the newest <paramref name="keep"/> checkpoints. Called only after a newer one is durable.</summary>
    public static void Retain(string directory, int keep)
    {
        foreach (var (_, path) in List(directory).Skip(keep))
        {
            File.Delete(path);
            File.Delete(path + ".sha256");
        }
    }

    static long ParseStep(string path)
    {
        string name = System.IO.Path.GetFileName(path);
        string digits = name["step-".Length..^Extension.Length];
        return long.TryParse(digits, out long step) ? step : -1;
    }

    static void WriteAllTextDurably(string path, string text)
    {
        string temp = path + ".tmp";
        using (var stream = new FileStream(temp, FileMode.Create, FileAccess.Write))
        using (var writer = new StreamWriter(stream))
        {
            writer.Write(text);
            writer.Flush();
            stream.Flush(flushToDisk: true);
        }
        File.Move(temp, path, overwrite: true);
    }
}
