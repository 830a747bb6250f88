using System.Security.Cryptography;
using System.Text.Json;
using System.Text.Json.Nodes;
using Distributed.Core;
using Microsoft.Extensions.Logging;
using TorchSharp;
using static TorchSharp.torch;

namespace Distributed.Training.Checkpoints;

/// <summary>One shard file of a checkpoint, as its writer reported it and the commit recorded it.</summary>
public sealed record ShardRecord(int Rank, string File, string Sha256, long Bytes);

/// <summary>
/// Written after a checkpoint is committed (every shard reported): what the checkpoint holds and how to check it.
/// A checkpoint directory without a manifest was never committed. <see cref="Layout"/> is the parallel layout that
/// wrote it (<see cref="ParallelLayout.ToString"/>); any layout can load it.
/// </summary>
public sealed record CheckpointManifest(string Format, long Step, long Generation, ShardRecord[] Shards, string Job, string? Layout = null)
{
    // Manifests from before tensor parallelism name no layout: each of their shards was a data-parallel rank.
    public string Layout { get; init; } = Layout ?? new ParallelLayout(Shards.Length, 1, 1).ToString();

    /// <summary>The manifest of a commit: every rank of the dp x tp x pp grid wrote one of <paramref name="shards"/>.</summary>
    public static CheckpointManifest For(long step, long generation, ShardRecord[] shards, JobSpec job)
    {
        var (tp, pp) = (job.Parallel.Tp, job.Parallel.Pp);
        var layout = new ParallelLayout(Math.Max(1, shards.Length / (tp * pp)), tp, pp);
        return new(Trainer.CheckpointFormat, step, generation, shards, JsonSerializer.Serialize(job), layout.ToString());
    }
}

/// <summary>A shard whose bytes are not the ones recorded at commit.</summary>
public sealed record ShardMismatch(string Path, string Expected, string Actual)
{
    public override string ToString() => $"'{Path}' has SHA-256 {Actual}, recorded {Expected}";
}

/// <summary>One stored piece of a global tensor: its shard file, its safetensors entry, and which part of the global tensor it is.</summary>
public sealed record StoredPiece(string File, long DataStart, TensorEntry Entry, TensorSlice Slice);

/// <summary>A global tensor of a checkpoint (named as in every layout): its dtype, its global shape, and the pieces that hold it.</summary>
public sealed record StoredTensor(string Name, string DType, long[] Shape, IReadOnlyList<StoredPiece> Pieces)
{
    public long Elements => Shape.Aggregate(1L, (product, d) => product * d);

    /// <summary>A piece that is the whole tensor, if any (every tensor of a checkpoint written without tensor parallelism has one).</summary>
    public StoredPiece? Whole => Pieces.FirstOrDefault(p => p.Slice.IsWhole);
}

/// <summary>
/// A verified checkpoint on disk, seen as its global tensors whatever layout wrote it: its metadata, and for each
/// global tensor the pieces that hold it, read from the shard files when asked for. <see cref="CopyInto"/> streams
/// them straight into a model's tensors (whole or slices of any layout), so loading a state never needs a second
/// copy of it in memory.
/// </summary>
public sealed class LoadedCheckpoint(string path, Dictionary<string, string> metadata, Dictionary<string, StoredTensor> stored) : IDisposable
{
    Dictionary<string, Tensor>? _tensors;

    public string Path { get; } = path;
    public IReadOnlyDictionary<string, string> Metadata { get; } = metadata;

    /// <summary>Every global tensor's name, dtype, shape and pieces, without reading any bytes.</summary>
    public IReadOnlyDictionary<string, StoredTensor> Stored { get; } = stored;

    /// <summary>
    /// Every global tensor, assembled from its pieces and read into memory on first use (the whole state: for
    /// inspection and tests; training uses <see cref="CopyInto"/>).
    /// </summary>
    public IReadOnlyDictionary<string, Tensor> Tensors => _tensors ??= ReadAll();

    public string Require(string key) => Metadata.TryGetValue(key, out var v)
        ? v : throw new CheckpointException($"checkpoint '{Path}' lacks metadata '{key}'");

    /// <summary>The global tensor <paramref name="name"/>, assembled from its pieces into a new CPU tensor.</summary>
    public Tensor ReadGlobal(string name)
    {
        var tensor = EmptyOf(Find(name));
        try
        {
            CopyInto([new StateEntry(name, tensor)]);
            return tensor;
        }
        catch
        {
            tensor.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Fills each target (a whole tensor or a slice) from the stored pieces that overlap it, straight from the files;
    /// the padding of a slice is left as it is. A missing tensor, another global shape or dtype, or a part of a target
    /// that no piece holds is an error naming the tensor. A piece that lands in one contiguous CPU block of its target
    /// (every whole-to-whole load) is read straight into it; others go through one temporary piece at a time.
    /// </summary>
    public void CopyInto(IEnumerable<StateEntry> targets)
    {
        var files = new Dictionary<string, FileStream>();
        try
        {
            using var noGrad = no_grad();
            foreach (var target in targets)
                CopyInto(target, file => files.TryGetValue(file, out var stream) ? stream : files[file] = File.OpenRead(file));
        }
        finally
        {
            foreach (var stream in files.Values) stream.Dispose();
        }
    }

    void CopyInto(StateEntry target, Func<string, FileStream> open)
    {
        var stored = Find(target.Name);
        if (!stored.Shape.SequenceEqual(target.GlobalShape))
            throw new CheckpointException(
                $"checkpoint '{Path}' tensor '{target.Name}' has shape [{string.Join(", ", stored.Shape)}], the model needs [{string.Join(", ", target.GlobalShape)}]");
        if (target.Tensor.dtype != DTypeOf(stored))
            throw new CheckpointException($"checkpoint '{Path}' tensor '{target.Name}' is {stored.DType}, the target is {target.Tensor.dtype}");
        var (dim, plan) = Plan(stored, target);
        using var held = target.Held();
        foreach (var (piece, runs) in plan)
        {
            var stream = open(piece.File);
            // The whole piece fills one block of the target (so does every whole-to-whole load): read straight into it.
            if (runs is [var only] && only.From == 0 && only.Length == Extent(piece.Entry.Shape, dim))
            {
                using var block = Region(held, dim, only.To, only.Length);
                if (block.device_type == DeviceType.CPU && block.is_contiguous())
                {
                    SafeTensors.ReadInto(stream, piece.DataStart, piece.Entry, piece.File, block);
                    continue;
                }
            }
            using var staged = SafeTensors.ReadTensor(stream, piece.DataStart, piece.Entry, piece.File);
            foreach (var run in runs)
            {
                using var from = Region(staged, dim, run.From, run.Length);
                using var to = Region(held, dim, run.To, run.Length);
                to.copy_(from);
            }
        }
    }

    /// <summary>One copy of a plan: <see cref="Length"/> indices along its dimension, from local index <see cref="From"/> of a piece to <see cref="To"/> of the target.</summary>
    readonly record struct Run(long From, long To, long Length);

    /// <summary>
    /// Which pieces fill <paramref name="target"/>, and what each copies: intervals along one dimension (the target's
    /// if it is a slice, else the pieces'; a whole piece or target is one interval along any). Whole pieces come
    /// first and a piece adds only indices no earlier one gave, so each needed piece is read once per target, and a
    /// tensor stored by several ranks once.
    /// </summary>
    (int Dim, List<(StoredPiece Piece, List<Run> Runs)> Plan) Plan(StoredTensor stored, StateEntry target)
    {
        var firstSliced = stored.Pieces.FirstOrDefault(p => !p.Slice.IsWhole);
        int dim = !target.IsWhole ? target.Slice!.Dim : firstSliced?.Slice.Dim ?? 0;
        var need = Placed(target.Slice ?? TensorSlice.Whole(stored.Shape), dim, stored.Shape).ToList();
        var covered = new List<(long Start, long End)>();
        var plan = new List<(StoredPiece, List<Run>)>();
        StoredPiece? across = null;
        foreach (var piece in stored.Pieces.OrderBy(p => p.Slice.IsWhole ? 0 : 1))
        {
            if (!piece.Slice.IsWhole && piece.Slice.Dim != dim)
            {
                across ??= piece;
                continue;
            }
            var runs = new List<Run>();
            var gained = new List<(long Start, long End)>();
            foreach (var t in need)
                foreach (var p in Placed(piece.Slice, dim, stored.Shape))
                    foreach (var (start, end) in Gaps(covered, Math.Max(t.Global, p.Global), Math.Min(t.Global + t.Length, p.Global + p.Length)))
                    {
                        runs.Add(new Run(p.Local + start - p.Global, t.Local + start - t.Global, end - start));
                        gained.Add((start, end));
                    }
            if (runs.Count == 0) continue;
            covered = Merged(covered.Concat(gained));
            plan.Add((piece, Merged(runs)));
        }
        var missing = need.SelectMany(t => Gaps(covered, t.Global, t.Global + t.Length)).ToList();
        if (missing.Count > 0 && across is not null)
            throw new CheckpointException(
                $"checkpoint '{Path}' tensor '{target.Name}' is stored sliced along dimension {across.Slice.Dim} (entry '{across.Entry.Name}' of '{across.File}'), " +
                $"{(target.IsWhole ? "other pieces" : "the target")} along dimension {dim}: slices along different dimensions do not combine");
        if (missing.Count > 0)
            throw new CheckpointException(
                $"checkpoint '{Path}' tensor '{target.Name}' [{string.Join(", ", stored.Shape)}] is incomplete: no stored piece holds indices " +
                $"{string.Join(", ", missing.Select(m => $"[{m.Start}, {m.End})"))} of dimension {dim}");
        return (dim, plan);
    }

    /// <summary>A slice's segments along <paramref name="dim"/> with the local index each starts at; a whole slice is one segment along any dimension.</summary>
    static IEnumerable<(long Global, long Local, long Length)> Placed(TensorSlice slice, int dim, long[] shape)
    {
        if (slice.IsWhole)
        {
            yield return (0, 0, Extent(shape, dim));
            yield break;
        }
        long local = 0;
        foreach (var s in slice.Segments)
        {
            yield return (s.Start, local, s.Length);
            local += s.Length;
        }
    }

    /// <summary>The parts of [start, end) outside <paramref name="covered"/> (sorted, disjoint).</summary>
    static IEnumerable<(long Start, long End)> Gaps(List<(long Start, long End)> covered, long start, long end)
    {
        foreach (var (s, e) in covered)
        {
            if (e <= start) continue;
            if (s >= end) break;
            if (s > start) yield return (start, s);
            start = e;
        }
        if (start < end) yield return (start, end);
    }

    static List<(long Start, long End)> Merged(IEnumerable<(long Start, long End)> intervals)
    {
        var merged = new List<(long Start, long End)>();
        foreach (var (s, e) in intervals.Order())
            if (merged.Count > 0 && s <= merged[^1].End) merged[^1] = (merged[^1].Start, Math.Max(merged[^1].End, e));
            else merged.Add((s, e));
        return merged;
    }

    /// <summary>Runs that continue each other in both the piece and the target become one (a piece read into one block).</summary>
    static List<Run> Merged(List<Run> runs)
    {
        var merged = new List<Run>();
        foreach (var run in runs.OrderBy(r => r.From))
            if (merged.Count > 0 && merged[^1] is var last && last.From + last.Length == run.From && last.To + last.Length == run.To)
                merged[^1] = last with { Length = last.Length + run.Length };
            else merged.Add(run);
        return merged;
    }

    static long Extent(long[] shape, int dim) => shape.Length == 0 ? 1 : shape[dim];

    static Tensor Region(Tensor tensor, int dim, long start, long length) => tensor.dim() == 0 ? tensor.detach() : tensor.narrow(dim, start, length);

    StoredTensor Find(string name) => Stored.TryGetValue(name, out var stored)
        ? stored : throw new CheckpointException($"checkpoint '{Path}' lacks tensor '{name}'");

    static ScalarType DTypeOf(StoredTensor stored) => SafeTensors.ScalarTypeOf(stored.Pieces[0].Entry, stored.Pieces[0].File);

    static Tensor EmptyOf(StoredTensor stored) => empty(stored.Shape, DTypeOf(stored));

    Dictionary<string, Tensor> ReadAll()
    {
        var tensors = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        try
        {
            foreach (var (name, stored) in Stored) tensors[name] = EmptyOf(stored).DetachFromDisposeScope();
            CopyInto(tensors.Select(t => new StateEntry(t.Key, t.Value)));   // one call: each file is opened once
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

    /// <summary>The prefix of the model's weights among the state entries ("model.wte.weight"); the rest is optimizer state.</summary>
    public const string ModelPrefix = "model.";

    /// <summary>
    /// The key of a shard file's metadata that says which of its entries are slices:
    /// <c>{"ENTRY": {"name": GLOBAL NAME, "shape": [GLOBAL SHAPE], "dim": D, "segments": [[START, LENGTH], ...]}}</c>.
    /// Entries it does not name are whole tensors under their global names (so are all entries of older checkpoints).
    /// </summary>
    public const string SlicesKey = "slices";

    /// <summary>
    /// Which state entries shard <paramref name="rank"/> of <paramref name="count"/> holds: whole entries (a tensor or
    /// a rank's slice of one), dealt in order to the shard with the fewest bytes so far, so shards are balanced and the
    /// split is the same on every rank.
    /// </summary>
    public static IReadOnlyList<StateEntry> ShardOf(IReadOnlyList<StateEntry> state, int rank, int count)
    {
        var load = new long[count];
        var mine = new List<StateEntry>();
        foreach (var entry in state)
        {
            int owner = Array.IndexOf(load, load.Min());
            load[owner] += entry.StoredBytes;
            if (owner == rank) mine.Add(entry);
        }
        return mine;
    }

    /// <summary>
    /// Writes one shard atomically into <paramref name="directory"/> and returns what the commit records. A sliced
    /// entry is stored without its padding, under a name that says which part it is, and described under
    /// <see cref="SlicesKey"/>. <paramref name="beforeRename"/> runs once the bytes are durable in the temporary file
    /// (fault injection).
    /// </summary>
    public static ShardRecord WriteShard(string directory, int rank, int count, IReadOnlyList<StateEntry> entries,
        IReadOnlyDictionary<string, string> metadata, Action? beforeRename = null)
    {
        // ShardWriter hands over storable entries (so its writer thread creates no torch object); other callers' are made so here.
        var stored = entries.Select(e => e.IsStorable ? e : e.ToStored(copy: false)).ToList();
        try
        {
            var named = stored.Select(e => (Name: StoredName(e), e.Tensor)).ToList();
            if (named.GroupBy(e => e.Name).FirstOrDefault(g => g.Count() > 1) is { } twice)
                throw new ArgumentException($"shard {rank} of {count} would hold entry '{twice.Key}' twice", nameof(entries));
            var sliced = stored.Where(e => !e.IsWhole).ToList();
            var fileMetadata = sliced.Count == 0 ? metadata : new Dictionary<string, string>(metadata) { [SlicesKey] = SlicesJson(sliced) };

            Directory.CreateDirectory(directory);
            string name = ShardName(rank, count);
            string path = Path.Combine(directory, name);
            string temp = path + ".tmp";
            byte[] hash = WriteRemovingOnFailure(temp, stream => SafeTensors.Write(stream, named, fileMetadata, afterData: () => stream.Flush(flushToDisk: true)));
            long bytes = new FileInfo(temp).Length;
            beforeRename?.Invoke();
            File.Move(temp, path, overwrite: true);
            return new ShardRecord(rank, name, Convert.ToHexStringLower(hash), bytes);
        }
        finally
        {
            foreach (var (entry, original) in stored.Zip(entries))
                if (!ReferenceEquals(entry, original)) entry.Tensor.Dispose();
        }
    }

    /// <summary>
    /// The entry name a shard file stores <paramref name="entry"/> under: a whole tensor's own name; for a slice one
    /// that also says which part (<c>NAME@DIM:START+LENGTH,...</c>), so the slices ranks write of one tensor never clash.
    /// </summary>
    static string StoredName(StateEntry entry) => entry.IsWhole ? entry.Name
        : $"{entry.Name}@{entry.Slice!.Dim}:{string.Join(",", entry.Slice.Segments.Select(s => $"{s.Start}+{s.Length}"))}";

    static string SlicesJson(IEnumerable<StateEntry> sliced)
    {
        var slices = new JsonObject();
        foreach (var entry in sliced)
            slices[StoredName(entry)] = new JsonObject
            {
                ["name"] = entry.Name,
                ["shape"] = new JsonArray(entry.Slice!.GlobalShape.Select(d => (JsonNode)d).ToArray()),
                ["dim"] = entry.Slice.Dim,
                ["segments"] = new JsonArray(entry.Slice.Segments.Select(s => (JsonNode)new JsonArray(s.Start, s.Length)).ToArray()),
            };
        return slices.ToJsonString();
    }

    /// <summary>A shard file's sliced entries: stored entry name to global name and slice.</summary>
    static Dictionary<string, (string Name, TensorSlice Slice)> ReadSlices(IReadOnlyDictionary<string, string> metadata, string path)
    {
        var slices = new Dictionary<string, (string, TensorSlice)>(StringComparer.Ordinal);
        if (!metadata.TryGetValue(SlicesKey, out var json)) return slices;
        try
        {
            foreach (var (entry, node) in JsonNode.Parse(json)!.AsObject())
                slices[entry] = (node!["name"]!.GetValue<string>(), new TensorSlice(
                    node["shape"]!.AsArray().Select(d => d!.GetValue<long>()).ToArray(),
                    node["dim"]!.GetValue<int>(),
                    node["segments"]!.AsArray().Select(s => new SliceSegment(s![0]!.GetValue<long>(), s[1]!.GetValue<long>())).ToArray()));
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException or NullReferenceException or ArgumentOutOfRangeException)
        {
            throw new CheckpointException($"checkpoint '{path}' has unreadable '{SlicesKey}' metadata: {e.Message}");
        }
        return slices;
    }

    /// <summary>The shape a piece of <paramref name="slice"/> is stored with: the global one, with the held indices along its dimension.</summary>
    static long[] StoredShape(TensorSlice slice) => slice.IsWhole ? slice.GlobalShape
        : slice.GlobalShape.Select((d, i) => i == slice.Dim ? slice.Held : d).ToArray();

    /// <summary>Writes the manifest (atomically, durably): from now on the checkpoint is visible to loaders.</summary>
    public static void WriteManifest(string directory, CheckpointManifest manifest)
    {
        if (!Directory.Exists(directory)) throw new CheckpointException($"checkpoint '{directory}' does not exist: no manifest to write");
        string path = Path.Combine(directory, ManifestName);
        string temp = path + ".tmp";
        WriteRemovingOnFailure(temp, stream =>
        {
            JsonSerializer.Serialize(stream, manifest, Indented);
            stream.Flush(flushToDisk: true);
            return 0;
        });
        File.Move(temp, path, overwrite: true);
    }

    /// <summary>
    /// Writes a temporary file; if that fails (a full disk), the partial file is removed, so that it neither holds the
    /// space nor looks like part of a checkpoint, and a full disk is reported as <see cref="DiskFullException"/> naming the file.
    /// </summary>
    static T WriteRemovingOnFailure<T>(string temp, Func<FileStream, T> write)
    {
        try
        {
            using var stream = new FileStream(temp, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20);
            return write(stream);
        }
        catch (Exception e)
        {
            try { File.Delete(temp); } catch (IOException) { }   // best effort: the original error is the one to report
            if (e is IOException io && DiskFullException.Cause(io) is { } cause)
                throw new DiskFullException($"the disk is full ({cause}) writing '{temp}'", io);
            throw;
        }
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
        var pieces = new Dictionary<string, List<StoredPiece>>(StringComparer.Ordinal);
        foreach (var shard in manifest.Shards.OrderBy(s => s.Rank))
        {
            string path = Path.Combine(directory, shard.File);
            using var stream = File.OpenRead(path);
            var (shardMetadata, entries, dataStart) = SafeTensors.ReadHeader(stream, path);
            var slices = ReadSlices(shardMetadata, path);
            shardMetadata.Remove(SlicesKey);   // it describes this file's entries, not the checkpoint
            metadata ??= shardMetadata;
            foreach (var entry in entries)
            {
                var (name, slice) = slices.Remove(entry.Name, out var s) ? s : (entry.Name, TensorSlice.Whole(entry.Shape));
                if (!StoredShape(slice).SequenceEqual(entry.Shape))
                    throw new CheckpointException($"checkpoint '{path}' entry '{entry.Name}' has shape [{string.Join(", ", entry.Shape)}], " +
                        $"its slice ({slice}) of '{name}' needs [{string.Join(", ", StoredShape(slice))}]");
                (pieces.TryGetValue(name, out var list) ? list : pieces[name] = []).Add(new StoredPiece(path, dataStart, entry, slice));
            }
            if (slices.Count > 0)
                throw new CheckpointException($"checkpoint '{path}' describes slices it does not hold: {string.Join(", ", slices.Keys)}");
        }
        var stored = new Dictionary<string, StoredTensor>(StringComparer.Ordinal);
        foreach (var (name, list) in pieces)
        {
            var first = list[0];
            if (list.FirstOrDefault(p => p.Entry.DType != first.Entry.DType || !p.Slice.GlobalShape.SequenceEqual(first.Slice.GlobalShape)) is { } other)
                throw new CheckpointException($"checkpoint '{directory}' tensor '{name}' is {first.Entry.DType} [{string.Join(", ", first.Slice.GlobalShape)}] " +
                    $"in '{first.File}' but {other.Entry.DType} [{string.Join(", ", other.Slice.GlobalShape)}] in '{other.File}'");
            stored[name] = new StoredTensor(name, first.Entry.DType, first.Slice.GlobalShape, list);
        }
        return new LoadedCheckpoint(directory, metadata ?? [], stored);
    }

    /// <summary>
    /// Whether two committed checkpoints hold the same global tensors (names, dtypes, shapes and every byte), however
    /// their shards and layouts split them. Tensors stored whole on both sides (every checkpoint written without tensor
    /// parallelism) are read in bounded pieces straight from the files, so such states of any size compare in little
    /// memory; others are assembled one tensor at a time.
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
            if (x.DType != y.DType || !x.Shape.SequenceEqual(y.Shape))
                return new CheckpointComparison(names.Count,
                    $"tensor '{name}' is {x.DType} [{string.Join(", ", x.Shape)}] in one, {y.DType} [{string.Join(", ", y.Shape)}] in the other");
            long? difference = x.Whole is { } wholeX && y.Whole is { } wholeY ? FirstDifference(wholeX, wholeY) : FirstDifference(first, second, name);
            if (difference is long at)
                return new CheckpointComparison(names.Count, $"tensor '{name}' differs (first at byte {at:N0})");
        }
        return new CheckpointComparison(names.Count, null);
    }

    const int ComparePieceBytes = 16 << 20;

    /// <summary>Null when both pieces' bytes are equal, else the offset of the first byte that differs.</summary>
    static long? FirstDifference(StoredPiece x, StoredPiece y)
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

    /// <summary>The same for a global tensor assembled from each checkpoint's pieces.</summary>
    static long? FirstDifference(LoadedCheckpoint first, LoadedCheckpoint second, string name)
    {
        using var x = first.ReadGlobal(name);
        using var y = second.ReadGlobal(name);
        var (a, b) = (TensorBytes.Of(x, name), TensorBytes.Of(y, name));
        foreach (var (offset, length) in a.Pieces(ComparePieceBytes))
        {
            int common = a.Span(offset, length).CommonPrefixLength(b.Span(offset, length));
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
