using System.Security.Cryptography;
using System.Text.Json;
using Distributed.Core;
using Microsoft.Extensions.Logging;
using TorchSharp;
using static TorchSharp.torch;

namespace Distributed.Training.Checkpoints;

/// <summary>One shard file of a checkpoint, as its writer reported it and the commit recorded it.</summary>
public sealed record ShardRecord(int Rank, string File, string Sha256, long Bytes);

/// <summary>
/// Written after a checkpoint is committed (every shard reported): what the checkpoint holds and how to check it.
/// A checkpoint directory without a manifest was never committed.
/// </summary>
public sealed record CheckpointManifest(string Format, long Step, long Generation, ShardRecord[] Shards, string Job)
{
    public static CheckpointManifest For(long step, long generation, ShardRecord[] shards, JobSpec job) =>
        new(Trainer.CheckpointFormat, step, generation, shards, JsonSerializer.Serialize(job));
}

/// <summary>A shard whose bytes are not the ones recorded at commit.</summary>
public sealed record ShardMismatch(string Path, string Expected, string Actual)
{
    public override string ToString() => $"'{Path}' has SHA-256 {Actual}, recorded {Expected}";
}

/// <summary>Where one tensor of a checkpoint lies: its shard file and its safetensors entry.</summary>
public sealed record StoredTensor(string File, long DataStart, TensorEntry Entry);

/// <summary>
/// A verified checkpoint on disk (all shards merged): its metadata, and its tensors, which are read from the shard
/// files when asked for. <see cref="CopyInto"/> streams them straight into a model's tensors, so loading a state
/// never needs a second copy of it in memory.
/// </summary>
public sealed class LoadedCheckpoint(string path, Dictionary<string, string> metadata, Dictionary<string, StoredTensor> stored) : IDisposable
{
    Dictionary<string, Tensor>? _tensors;

    public string Path { get; } = path;
    public IReadOnlyDictionary<string, string> Metadata { get; } = metadata;

    /// <summary>Every tensor's name and place, without reading any bytes.</summary>
    public IReadOnlyDictionary<string, StoredTensor> Stored { get; } = stored;

    /// <summary>Every tensor, read into memory on first use (the whole state: for inspection and tests; training uses <see cref="CopyInto"/>).</summary>
    public IReadOnlyDictionary<string, Tensor> Tensors => _tensors ??= ReadAll();

    public string Require(string key) => Metadata.TryGetValue(key, out var v)
        ? v : throw new CheckpointException($"checkpoint '{Path}' lacks metadata '{key}'");

    /// <summary>
    /// Reads the named tensors into <paramref name="targets"/>, straight from the files; a missing tensor or another
    /// shape is an error naming both. A target that is not a contiguous CPU tensor goes through a temporary copy.
    /// </summary>
    public void CopyInto(IEnumerable<(string Name, Tensor Tensor)> targets)
    {
        var files = new Dictionary<string, FileStream>();
        try
        {
            using var noGrad = no_grad();
            foreach (var (name, target) in targets)
            {
                if (!Stored.TryGetValue(name, out var stored))
                    throw new CheckpointException($"checkpoint '{Path}' lacks tensor '{name}'");
                if (!stored.Entry.Shape.SequenceEqual(target.shape))
                    throw new CheckpointException(
                        $"checkpoint '{Path}' tensor '{name}' has shape [{string.Join(", ", stored.Entry.Shape)}], the model needs [{string.Join(", ", target.shape)}]");
                if (!files.TryGetValue(stored.File, out var stream)) files[stored.File] = stream = File.OpenRead(stored.File);
                if (target.device_type == DeviceType.CPU && target.is_contiguous())
                    SafeTensors.ReadInto(stream, stored.DataStart, stored.Entry, stored.File, target);
                else
                {
                    using var staged = SafeTensors.ReadTensor(stream, stored.DataStart, stored.Entry, stored.File);
                    target.copy_(staged);
                }
            }
        }
        finally
        {
            foreach (var stream in files.Values) stream.Dispose();
        }
    }

    Dictionary<string, Tensor> ReadAll()
    {
        var tensors = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        try
        {
            foreach (var group in Stored.GroupBy(s => s.Value.File))
            {
                using var stream = File.OpenRead(group.Key);
                foreach (var (name, stored) in group)
                    tensors[name] = SafeTensors.ReadTensor(stream, stored.DataStart, stored.Entry, stored.File).DetachFromDisposeScope();
            }
        }
        catch
        {
            foreach (var t in tensors.Values) t.Dispose();
            throw;
        }
        return tensors;
    }

    public void Dispose()
    {
        if (_tensors is null) return;
        foreach (var t in _tensors.Values) t.Dispose();
        _tensors = null;
    }
}

/// <summary>How two checkpoints compare: the tensors looked at, and the first difference (null when identical).</summary>
public sealed record CheckpointComparison(int Tensors, string? Difference)
{
    public bool Identical => Difference is null;
}

/// <summary>
/// Checkpoints on disk, one directory per step: <c>checkpoints/step-00000250/shard-0-of-2.safetensors</c>, ... and
/// <c>manifest.json</c>. Every rank writes its own shard (temporary file, fsync, rename) and reports its SHA-256;
/// the manifest is written only once all shards are in (the commit), and every load verifies every shard.
/// </summary>
public static class CheckpointFiles
{
    public const string ManifestName = "manifest.json";
    const string Prefix = "step-";
    static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    public static string DirectoryName(long step) => $"{Prefix}{step:D8}";
    public static string DirectoryFor(string checkpoints, long step) => Path.Combine(checkpoints, DirectoryName(step));
    public static string ShardName(int rank, int count) => $"shard-{rank}-of-{count}.safetensors";

    /// <summary>
    /// Which state tensors shard <paramref name="rank"/> of <paramref name="count"/> holds: whole tensors, dealt in
    /// order to the shard with the fewest bytes so far, so shards are balanced and the split is the same on every rank.
    /// </summary>
    public static IReadOnlyList<(string Name, Tensor Tensor)> ShardOf(IReadOnlyList<(string Name, Tensor Tensor)> state, int rank, int count)
    {
        var load = new long[count];
        var mine = new List<(string, Tensor)>();
        foreach (var entry in state)
        {
            int owner = Array.IndexOf(load, load.Min());
            load[owner] += entry.Tensor.NumberOfElements * entry.Tensor.ElementSize;
            if (owner == rank) mine.Add(entry);
        }
        return mine;
    }

    /// <summary>
    /// Writes one shard atomically into <paramref name="directory"/> and returns what the commit records.
    /// <paramref name="beforeRename"/> runs once the bytes are durable in the temporary file (fault injection).
    /// </summary>
    public static ShardRecord WriteShard(string directory, int rank, int count, IReadOnlyList<(string Name, Tensor Tensor)> tensors,
        IReadOnlyDictionary<string, string> metadata, Action? beforeRename = null)
    {
        Directory.CreateDirectory(directory);
        string name = ShardName(rank, count);
        string path = Path.Combine(directory, name);
        string temp = path + ".tmp";
        byte[] hash;
        using (var stream = new FileStream(temp, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20))
            hash = SafeTensors.Write(stream, tensors, metadata, afterData: () => stream.Flush(flushToDisk: true));
        long bytes = new FileInfo(temp).Length;
        beforeRename?.Invoke();
        File.Move(temp, path, overwrite: true);
        return new ShardRecord(rank, name, Convert.ToHexStringLower(hash), bytes);
    }

    /// <summary>Writes the manifest (atomically, durably): from now on the checkpoint is visible to loaders.</summary>
    public static void WriteManifest(string directory, CheckpointManifest manifest)
    {
        if (!Directory.Exists(directory)) throw new CheckpointException($"checkpoint '{directory}' does not exist: no manifest to write");
        string path = Path.Combine(directory, ManifestName);
        string temp = path + ".tmp";
        using (var stream = new FileStream(temp, FileMode.Create, FileAccess.Write))
        {
            JsonSerializer.Serialize(stream, manifest, Indented);
            stream.Flush(flushToDisk: true);
        }
        File.Move(temp, path, overwrite: true);
    }

    public static CheckpointManifest ReadManifest(string directory)
    {
        string path = Path.Combine(directory, ManifestName);
        if (!Directory.Exists(directory)) throw new CheckpointException($"checkpoint '{directory}' does not exist");
        if (!File.Exists(path)) throw new CheckpointException($"checkpoint '{directory}' has no {ManifestName}: it was never committed");
        try
        {
            return JsonSerializer.Deserialize<CheckpointManifest>(File.ReadAllText(path))
                ?? throw new CheckpointException($"checkpoint manifest '{path}' is empty");
        }
        catch (JsonException e)
        {
            throw new CheckpointException($"checkpoint manifest '{path}' is unreadable: {e.Message}");
        }
    }

    /// <summary>Committed checkpoints (those with a manifest) in a checkpoints directory, newest step first.</summary>
    public static IReadOnlyList<(long Step, string Path)> List(string checkpoints) =>
        AllDirectories(checkpoints).Where(c => File.Exists(Path.Combine(c.Path, ManifestName))).ToList();

    /// <summary>The shards whose bytes differ from <paramref name="shards"/> (the manifest's, by default); empty when all verify.</summary>
    public static IReadOnlyList<ShardMismatch> Verify(string directory, IReadOnlyList<ShardRecord>? shards = null)
    {
        shards ??= ReadManifest(directory).Shards;
        var bad = new List<ShardMismatch>();
        foreach (var shard in shards)
        {
            string path = Path.Combine(directory, shard.File);
            string actual = File.Exists(path) ? Sha256Of(path)
                : $"(missing file; the directory holds {string.Join(", ", Directory.Exists(directory) ? Directory.GetFileSystemEntries(directory).Select(Path.GetFileName) : ["nothing"])})";
            if (!string.Equals(actual, shard.Sha256, StringComparison.OrdinalIgnoreCase)) bad.Add(new ShardMismatch(path, shard.Sha256, actual));
        }
        return bad;
    }

    public static string Sha256Of(string path)
    {
        using var stream = File.OpenRead(path);
        return Convert.ToHexStringLower(SHA256.HashData(stream));
    }

    /// <summary>The newest committed checkpoint in a checkpoints directory whose shards all verify against its manifest.</summary>
    public static string? FindNewestValid(string checkpoints, ILogger logger) =>
        FirstValid(List(checkpoints).Select(c => (c.Step, c.Path, (IReadOnlyList<ShardRecord>)ReadManifest(c.Path).Shards)), logger)?.Directory;

    /// <summary>
    /// The first of <paramref name="candidates"/> (newest first) whose shards all match the recorded hashes (a
    /// manifest's, or the coordinator's journal's). Each corrupt one is logged with the file and both hashes.
    /// </summary>
    public static (long Step, string Directory)? FirstValid(IEnumerable<(long Step, string Directory, IReadOnlyList<ShardRecord> Shards)> candidates, ILogger logger)
    {
        foreach (var (step, directory, shards) in candidates)
        {
            var bad = Verify(directory, shards);
            if (bad.Count == 0) return (step, directory);
            logger.LogWarning("Checkpoint at step {Step} is corrupt: {Problems}; falling back to an older commit", step, string.Join("; ", bad));
        }
        return null;
    }

    /// <summary>
    /// Opens a committed checkpoint: verifies every shard against the manifest, then merges their headers. The
    /// tensors' bytes stay in the files until asked for.
    /// </summary>
    public static LoadedCheckpoint Load(string directory)
    {
        if (File.Exists(directory)) throw new CheckpointException($"'{directory}' is a file: a checkpoint is a directory holding {ManifestName} and its shards");
        var manifest = ReadManifest(directory);
        var bad = Verify(directory, manifest.Shards);
        if (bad.Count > 0) throw new CheckpointException($"checkpoint '{directory}' is corrupt: {string.Join("; ", bad)}");
        Dictionary<string, string>? metadata = null;
        var stored = new Dictionary<string, StoredTensor>(StringComparer.Ordinal);
        foreach (var shard in manifest.Shards.OrderBy(s => s.Rank))
        {
            string path = Path.Combine(directory, shard.File);
            using var stream = File.OpenRead(path);
            var (shardMetadata, entries, dataStart) = SafeTensors.ReadHeader(stream, path);
            metadata ??= shardMetadata;
            foreach (var entry in entries) stored[entry.Name] = new StoredTensor(path, dataStart, entry);
        }
        return new LoadedCheckpoint(directory, metadata ?? [], stored);
    }

    /// <summary>
    /// Whether two committed checkpoints hold the same tensors (names, dtypes, shapes and every byte), however their
    /// shards split them. Reads both in bounded pieces, so states of any size compare in little memory.
    /// </summary>
    public static CheckpointComparison Compare(string a, string b)
    {
        using var first = Load(a);
        using var second = Load(b);
        var names = first.Stored.Keys.Union(second.Stored.Keys).Order(StringComparer.Ordinal).ToList();
        foreach (var name in names)
        {
            if (!first.Stored.TryGetValue(name, out var x) || !second.Stored.TryGetValue(name, out var y))
                return new CheckpointComparison(names.Count, $"tensor '{name}' is in only one of them");
            if (x.Entry.DType != y.Entry.DType || !x.Entry.Shape.SequenceEqual(y.Entry.Shape))
                return new CheckpointComparison(names.Count,
                    $"tensor '{name}' is {x.Entry.DType} [{string.Join(", ", x.Entry.Shape)}] in one, {y.Entry.DType} [{string.Join(", ", y.Entry.Shape)}] in the other");
            if (FirstDifference(x, y) is long at)
                return new CheckpointComparison(names.Count, $"tensor '{name}' differs (first at byte {at:N0})");
        }
        return new CheckpointComparison(names.Count, null);
    }

    const int ComparePieceBytes = 16 << 20;

    /// <summary>Null when both tensors' bytes are equal, else the offset of the first byte that differs.</summary>
    static long? FirstDifference(StoredTensor x, StoredTensor y)
    {
        using var a = File.OpenRead(x.File);
        using var b = File.OpenRead(y.File);
        a.Position = x.DataStart + x.Entry.Begin;
        b.Position = y.DataStart + y.Entry.Begin;
        var bufferA = new byte[ComparePieceBytes];
        var bufferB = new byte[ComparePieceBytes];
        foreach (var (offset, length) in TensorBytes.Split(x.Entry.End - x.Entry.Begin, ComparePieceBytes))
        {
            a.ReadExactly(bufferA, 0, length);
            b.ReadExactly(bufferB, 0, length);
            int common = bufferA.AsSpan(0, length).CommonPrefixLength(bufferB.AsSpan(0, length));
            if (common < length) return offset + common;
        }
        return null;
    }

    /// <summary>
    /// Deletes committed checkpoints beyond the newest <paramref name="keep"/>, and uncommitted directories older than
    /// the newest commit (abandoned by an aborted generation). Called only after that newest commit is durable.
    /// <paramref name="committedSteps"/> is the authority on what is committed (the coordinator's journal); without it,
    /// the directories holding a manifest are.
    /// </summary>
    public static void Retain(string checkpoints, int keep, IReadOnlyCollection<long>? committedSteps = null)
    {
        var committed = (committedSteps ?? List(checkpoints).Select(c => c.Step).ToList()).OrderDescending().ToList();
        if (committed.Count == 0) return;
        long newest = committed[0];
        var kept = committed.Take(keep).ToHashSet();
        var all = committed.ToHashSet();
        foreach (var (step, path) in AllDirectories(checkpoints))
            if (all.Contains(step) ? !kept.Contains(step) : step < newest) Directory.Delete(path, recursive: true);
    }

    static IEnumerable<(long Step, string Path)> AllDirectories(string checkpoints)
    {
        if (!Directory.Exists(checkpoints)) return [];
        return Directory.EnumerateDirectories(checkpoints, Prefix + "*")
            .Select(p => (Step: long.TryParse(Path.GetFileName(p)[Prefix.Length..], out long s) ? s : -1, Path: p))
            .Where(p => p.Step >= 0)
            .OrderByDescending(p => p.Step);
    }
}
