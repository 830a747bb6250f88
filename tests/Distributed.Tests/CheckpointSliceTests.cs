using System.Buffers.Binary;
using System.Text.Json;
using Distributed.Core;
using Distributed.Training;
using Distributed.Training.Checkpoints;
using static TorchSharp.torch;

namespace Distributed.Tests;

/// <summary>
/// Checkpoints written as tensor-parallel ranks write them (slices of global tensors, padding not stored), loaded
/// into other layouts, compared, inspected and exported; all in process, written by hand with <see cref="CheckpointFiles.WriteShard"/>.
/// </summary>
public class CheckpointSliceTests
{
    const long C = 8, Vocab = 65;
    const float Padding = -7;
    const string Qkv = "model.h.0.attn.c_attn.weight", Wte = "model.wte.weight", Proj = "model.h.0.mlp.c_proj.weight",
        LnWeight = "model.ln_f.weight", LnBias = "model.ln_f.bias", WteMoment = "optim.exp_avg.wte.weight";
    static readonly string[] Sliced = [Qkv, Wte, Proj, WteMoment];

    sealed class Quiet : ITrainingObserver;

    /// <summary>A small state's global tensors: the same numbers every time.</summary>
    static Dictionary<string, Tensor> Globals()
    {
        manual_seed(11);
        return new()
        {
            [Qkv] = randn(3 * C, C),
            [Wte] = randn(Vocab, 4),
            [Proj] = randn(C, 4 * C),
            [LnWeight] = randn(C),
            [LnBias] = randn(C),
            [WteMoment] = randn(Vocab, 4),
        };
    }

    /// <summary>
    /// What rank <paramref name="rank"/> of <paramref name="tp"/> holds of a split tensor, as Megatron splits it, and
    /// its local length along the slice's dimension (padding included): q/k/v by heads (three segments), the
    /// vocabulary padded to a multiple of tp by rows, the MLP's output projection by columns.
    /// </summary>
    static (TensorSlice Slice, long Local) SliceOf(string name, int tp, int rank)
    {
        switch (name)
        {
            case Qkv:
                long heads = C / tp;
                return (new TensorSlice([3 * C, C], 0, [.. Enumerable.Range(0, 3).Select(i => new SliceSegment(i * C + rank * heads, heads))]), 3 * heads);
            case Wte or WteMoment:
                long rows = (Vocab + tp - 1) / tp;
                return (TensorSlice.Range([Vocab, 4], 0, rank * rows, Math.Min(rows, Vocab - rank * rows)), rows);
            case Proj:
                return (TensorSlice.Range([C, 4 * C], 1, rank * 4 * C / tp, 4 * C / tp), 4 * C / tp);
            default:
                throw new ArgumentException(name);
        }
    }

    /// <summary>The local tensor of rank <paramref name="rank"/> of <paramref name="tp"/>: its padding set to <paramref name="padding"/>, its held rows from <paramref name="global"/> unless null.</summary>
    static StateEntry Local(string name, Tensor? global, int tp, int rank, float padding = Padding)
    {
        var (slice, length) = SliceOf(name, tp, rank);
        return new StateEntry(name, Holding(global, slice, length, padding), slice);
    }

    /// <summary>A local tensor of <paramref name="length"/> indices along the slice's dimension: the slice's rows of <paramref name="global"/> (unless null), then padding.</summary>
    static Tensor Holding(Tensor? global, TensorSlice slice, long length, float padding)
    {
        var local = full(slice.GlobalShape.Select((d, i) => i == slice.Dim ? length : d).ToArray(), padding);
        long at = 0;
        foreach (var s in slice.Segments)
        {
            if (global is not null)
            {
                using var to = local.narrow(slice.Dim, at, s.Length);
                using var from = global.narrow(slice.Dim, s.Start, s.Length);
                to.copy_(from);
            }
            at += s.Length;
        }
        return local;
    }

    /// <summary>Asserts that the target holds the global tensor's rows of its slice, and its padding is still <see cref="Padding"/>.</summary>
    static void AssertHolds(StateEntry target, Tensor global)
    {
        var slice = target.Slice!;
        long at = 0;
        foreach (var s in slice.Segments)
        {
            using var held = target.Tensor.narrow(slice.Dim, at, s.Length);
            using var expected = global.narrow(slice.Dim, s.Start, s.Length);
            Assert.True(Same(held, expected), $"{target.Name} rank slice {slice}: rows from {s.Start} differ");
            at += s.Length;
        }
        long padding = target.Tensor.shape[slice.Dim] - at;
        if (padding > 0)
        {
            using var pad = target.Tensor.narrow(slice.Dim, at, padding);
            Assert.True(pad.eq(Padding).all().item<bool>(), $"{target.Name}: the padding of {slice} was written");
        }
    }

    static readonly string Vocabulary = new(Enumerable.Range(32, (int)Vocab).Select(i => (char)i).ToArray());

    static Dictionary<string, string> Metadata() => new()
    {
        ["format"] = Trainer.CheckpointFormat,
        ["step"] = "7",
        ["vocab"] = Vocabulary,
    };

    static JobSpec Job(string dir, int tp) => TestSupport.TinyJob(dir, $"parallel.tp={tp}");

    /// <summary>
    /// The state as two tensor-parallel ranks write it: each its slices of the split tensors (padding rows set to 999,
    /// which must not be stored; the column slices as non-contiguous views), both the ln_f bias (replicated), rank 0
    /// alone the ln_f weight.
    /// </summary>
    static string WriteTp2(string checkpoints, Dictionary<string, Tensor> globals, int shards = 2)
    {
        string dir = CheckpointFiles.DirectoryFor(checkpoints, 7);
        var records = new List<ShardRecord>();
        for (int rank = 0; rank < shards; rank++)
        {
            var (proj, _) = SliceOf(Proj, 2, rank);
            var state = new List<StateEntry>
            {
                Local(Qkv, globals[Qkv], 2, rank, padding: 999),
                Local(Wte, globals[Wte], 2, rank, padding: 999),
                new(Proj, globals[Proj].narrow(1, proj.Segments[0].Start, proj.Held), proj),
                Local(WteMoment, globals[WteMoment], 2, rank, padding: 999),
                new(LnBias, globals[LnBias]),
            };
            if (rank == 0) state.Add(new(LnWeight, globals[LnWeight]));
            records.Add(CheckpointFiles.WriteShard(dir, rank, 2, state, Metadata()));
            DisposeAll(state.Select(e => e.Tensor).Where(t => !globals.ContainsValue(t)));
        }
        CheckpointFiles.WriteManifest(dir, CheckpointManifest.For(7, 1, [.. records], Job(checkpoints, tp: 2)));
        return dir;
    }

    /// <summary>The same state written without tensor parallelism: whole tensors, one shard.</summary>
    static string WriteWhole(string checkpoints, Dictionary<string, Tensor> globals, long step = 7)
    {
        string dir = CheckpointFiles.DirectoryFor(checkpoints, step);
        var record = CheckpointFiles.WriteShard(dir, 0, 1, globals.Select(g => new StateEntry(g.Key, g.Value)).ToList(), Metadata());
        CheckpointFiles.WriteManifest(dir, CheckpointManifest.For(step, 1, [record], Job(checkpoints, tp: 1)));
        return dir;
    }

    /// <summary>Same shape and every element equal (TorchSharp's <c>equal</c> is element-wise).</summary>
    static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.equal(b).all().item<bool>();

    static void DisposeAll(IEnumerable<Tensor> tensors)
    {
        foreach (var t in tensors) t.Dispose();
    }

    [Fact]
    public void SlicesWrittenByTwoRanksAssembleIntoTheGlobalTensorsExactly()
    {
        var globals = Globals();
        string dir = WriteTp2(TestSupport.TempDir("slices"), globals);
        Assert.Equal("dp=1 x tp=2 x pp=1", CheckpointFiles.ReadManifest(dir).Layout);

        using var loaded = CheckpointFiles.Load(dir);
        Assert.Equal(globals.Keys.Order(), loaded.Stored.Keys.Order());
        foreach (var (name, global) in globals)
        {
            Assert.Equal(global.shape, loaded.Stored[name].Shape);
            Assert.Equal("F32", loaded.Stored[name].DType);
            Assert.True(Same(loaded.Tensors[name], global), $"{name} assembled differs");
            using var read = loaded.ReadGlobal(name);
            Assert.True(Same(read, global), $"{name} read differs");
        }
        // Only the held rows are stored: rank 1's vocabulary slice is 32 rows, its padding row is not in the file.
        Assert.Equal(new long[][] { [33, 4], [32, 4] }, loaded.Stored[Wte].Pieces.Select(p => p.Entry.Shape));
        Assert.Equal(new long[][] { [12, 8], [12, 8] }, loaded.Stored[Qkv].Pieces.Select(p => p.Entry.Shape));
        Assert.Equal(2, loaded.Stored[LnBias].Pieces.Count);
        Assert.Null(loaded.Stored[Qkv].Whole);
        Assert.NotNull(loaded.Stored[LnWeight].Whole);
        Assert.DoesNotContain(CheckpointFiles.SlicesKey, loaded.Metadata.Keys);
        Assert.Equal("7", loaded.Metadata["step"]);

        // In the file: sliced entries under names that say which part, described in the metadata; whole ones plain.
        string shard1 = Path.Combine(dir, CheckpointFiles.ShardName(1, 2));
        using var stream = File.OpenRead(shard1);
        var (metadata, entries, _) = SafeTensors.ReadHeader(stream, shard1);
        Assert.Contains(entries, e => e.Name == Qkv + "@0:4+4,12+4,20+4");
        Assert.Contains(entries, e => e.Name == Wte + "@0:33+32");
        Assert.Contains(entries, e => e.Name == LnBias);
        using var slices = JsonDocument.Parse(metadata[CheckpointFiles.SlicesKey]);
        var wte = slices.RootElement.GetProperty(Wte + "@0:33+32");
        Assert.Equal(Wte, wte.GetProperty("name").GetString());
        Assert.Equal("[65,4]", wte.GetProperty("shape").GetRawText());
        Assert.Equal("[[33,32]]", wte.GetProperty("segments").GetRawText());
        DisposeAll(globals.Values);
    }

    [Theory]
    [InlineData(2)]   // the layout that wrote it: each piece is read straight into its target
    [InlineData(4)]   // vocabulary 65 padded to 68: 17, 17, 17 and 14 rows, 3 of padding on the last rank
    public void SlicesOfAnyLayoutFillTheirHeldRowsAndLeaveThePaddingAlone(int tp)
    {
        var globals = Globals();
        using var loaded = CheckpointFiles.Load(WriteTp2(TestSupport.TempDir("slices-into"), globals));
        for (int rank = 0; rank < tp; rank++)
        {
            var targets = Sliced.Select(name => Local(name, null, tp, rank)).Append(new StateEntry(LnWeight, full(C, Padding))).ToList();
            loaded.CopyInto(targets);
            foreach (var target in targets.Where(t => t.Slice is not null)) AssertHolds(target, globals[target.Name]);
            Assert.True(Same(targets[^1].Tensor, globals[LnWeight]));
            DisposeAll(targets.Select(t => t.Tensor));
        }
        DisposeAll(globals.Values);
    }

    [Fact]
    public void WholeTargetsAreAssembledFromTheSlices()
    {
        var globals = Globals();
        using var loaded = CheckpointFiles.Load(WriteTp2(TestSupport.TempDir("slices-whole"), globals));
        var targets = globals.Select(g => new StateEntry(g.Key, zeros(g.Value.shape))).ToList();
        using var transposed = zeros(4 * C, C);
        using var columns = transposed.t();   // not contiguous: goes through the temporary piece
        using var padded = full(Vocab + 1, 4, Padding);   // the whole vocabulary and one row of padding
        loaded.CopyInto([.. targets, new StateEntry(Proj, columns), new StateEntry(Wte, padded, TensorSlice.Whole([Vocab, 4]))]);
        foreach (var target in targets) Assert.True(Same(target.Tensor, globals[target.Name]), target.Name);
        Assert.True(Same(columns, globals[Proj]));
        using (var rows = padded.narrow(0, 0, Vocab)) Assert.True(Same(rows, globals[Wte]));
        using (var last = padded.narrow(0, Vocab, 1)) Assert.True(last.eq(Padding).all().item<bool>());
        DisposeAll(targets.Select(t => t.Tensor));
        DisposeAll(globals.Values);
    }

    [Fact]
    public void ErrorsNameTheCheckpointTheTensorAndTheProblem()
    {
        var globals = Globals();
        string checkpoints = TestSupport.TempDir("slices-errors");
        // Rank 0's shard alone: rows 33..64 of the vocabulary and half of every head split are in no file.
        string partial = WriteTp2(checkpoints, globals, shards: 1);
        using var loaded = CheckpointFiles.Load(partial);
        using var whole = zeros(Vocab, 4);
        string missing = Assert.Throws<CheckpointException>(() => loaded.CopyInto([new StateEntry(Wte, whole)])).Message;
        Assert.Contains($"checkpoint '{partial}' tensor '{Wte}'", missing);
        Assert.Contains("no stored piece holds indices [33, 65) of dimension 0", missing);
        using var qkv = zeros(3 * C, C);
        Assert.Contains("indices [4, 8), [12, 16), [20, 24) of dimension 0", Assert.Throws<CheckpointException>(() => loaded.CopyInto([new StateEntry(Qkv, qkv)])).Message);
        var rank0 = Local(Wte, null, 2, 0);
        loaded.CopyInto([rank0]);   // what is there loads
        AssertHolds(rank0, globals[Wte]);

        using var complete = CheckpointFiles.Load(WriteTp2(TestSupport.TempDir("slices-errors"), globals));
        using var wider = zeros(34, 4);
        string shape = Assert.Throws<CheckpointException>(() => complete.CopyInto([new StateEntry(Wte, wider, TensorSlice.Range([66, 4], 0, 0, 33))])).Message;
        Assert.Contains($"tensor '{Wte}' has shape [65, 4], the model needs [66, 4]", shape);
        Assert.Contains("lacks tensor 'model.nope'", Assert.Throws<CheckpointException>(() => complete.CopyInto([new StateEntry("model.nope", whole)])).Message);
        using var rows = zeros(4, 4 * C);
        string across = Assert.Throws<CheckpointException>(() => complete.CopyInto([new StateEntry(Proj, rows, TensorSlice.Range([C, 4 * C], 0, 0, 4))])).Message;
        Assert.Contains($"tensor '{Proj}' is stored sliced along dimension 1", across);
        Assert.Contains("the target along dimension 0", across);
        // A local tensor that does not fit its slice is the caller's bug, named when the entry is made.
        Assert.Contains($"state entry '{Wte}' of local shape [10, 4] does not fit its slice", Assert.Throws<ArgumentException>(
            () => new StateEntry(Wte, wider.narrow(0, 0, 10), TensorSlice.Range([Vocab, 4], 0, 0, 33))).Message);
        DisposeAll([.. globals.Values, rank0.Tensor]);
    }

    [Fact]
    public void CompareSeesTheGlobalTensorsWhateverTheLayout()
    {
        var globals = Globals();
        string checkpoints = TestSupport.TempDir("slices-compare");
        string tp2 = WriteTp2(checkpoints, globals);
        string whole = WriteWhole(checkpoints, globals, step: 8);
        var same = CheckpointFiles.Compare(tp2, whole);
        Assert.True(same.Identical, same.Difference);
        Assert.Equal(globals.Count, same.Tensors);
        Assert.Equal("dp=1 x tp=1 x pp=1", CheckpointFiles.ReadManifest(whole).Layout);

        using (var element = globals[Proj].narrow(1, 20, 1)) element.add_(1);   // row 0, column 20: byte 80 of the global tensor
        string changed = WriteWhole(checkpoints, globals, step: 9);
        Assert.Equal($"tensor '{Proj}' differs (first at byte 80)", CheckpointFiles.Compare(tp2, changed).Difference);
        Assert.Equal($"tensor '{Proj}' differs (first at byte 80)", CheckpointFiles.Compare(whole, changed).Difference);   // the piece-wise path agrees
        DisposeAll(globals.Values);
    }

    [Fact]
    public void ManifestsWithoutALayoutReadAsDataParallelShards()
    {
        string checkpoints = TestSupport.TempDir("slices-manifest");
        using var t = ones(3);
        string dir = CheckpointFiles.DirectoryFor(checkpoints, 1);
        var records = Enumerable.Range(0, 2).Select(r => CheckpointFiles.WriteShard(dir, r, 2, [new StateEntry($"t{r}", t)], Metadata())).ToArray();
        CheckpointFiles.WriteManifest(dir, CheckpointManifest.For(1, 1, records, Job(checkpoints, tp: 1)));
        string path = Path.Combine(dir, CheckpointFiles.ManifestName);
        var json = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        Assert.Equal("dp=2 x tp=1 x pp=1", json["Layout"]!.GetValue<string>());
        json.Remove("Layout");   // as written before tensor parallelism
        File.WriteAllText(path, json.ToJsonString());
        Assert.Equal("dp=2 x tp=1 x pp=1", CheckpointFiles.ReadManifest(dir).Layout);
        using var loaded = CheckpointFiles.Load(dir);
        Assert.Equal(["t0", "t1"], loaded.Stored.Keys.Order());
    }

    [Fact]
    public void ExportWritesTheGlobalModelWeightsForAPlainSafetensorsReader()
    {
        var globals = Globals();
        string checkpoints = TestSupport.TempDir("slices-export");
        string fromTp2 = Path.Combine(checkpoints, "tp2.safetensors"), fromWhole = Path.Combine(checkpoints, "whole.safetensors");
        Assert.Equal(5, CheckpointExport.Write(WriteTp2(checkpoints, globals), fromTp2).Tensors);
        CheckpointExport.Write(WriteWhole(checkpoints, globals, step: 8), fromWhole);

        var (metadata, tensors) = PlainSafetensors(fromTp2);
        Assert.Equal(["h.0.attn.c_attn.weight", "h.0.mlp.c_proj.weight", "ln_f.bias", "ln_f.weight", "wte.weight"], tensors.Keys.Order(StringComparer.Ordinal));
        foreach (var (name, (dtype, shape, data)) in tensors)
        {
            var global = globals[CheckpointFiles.ModelPrefix + name];
            Assert.Equal("F32", dtype);
            Assert.Equal(global.shape, shape);
            Assert.True(data.AsSpan().SequenceEqual(global.contiguous().bytes), $"{name} exported differs");
        }
        Assert.Equal(CheckpointExport.Format, metadata["format"]);
        Assert.Equal("7", metadata["step"]);
        Assert.Equal(Vocabulary, CheckpointVocabulary.Read(metadata, fromTp2).Vocabulary);
        // Layout-independent: the same state written whole exports the same bytes.
        Assert.Equal(File.ReadAllBytes(fromTp2), File.ReadAllBytes(fromWhole));
        DisposeAll(globals.Values);
    }

    /// <summary>
    /// A minimal safetensors reader of its own (8-byte little-endian header length, JSON header, raw data), so the
    /// export is checked against the format and not against our writer; it also checks that the entries tile the data.
    /// </summary>
    internal static (Dictionary<string, string> Metadata, Dictionary<string, (string DType, long[] Shape, byte[] Data)> Tensors) PlainSafetensors(string path)
    {
        var bytes = File.ReadAllBytes(path);
        long headerLength = (long)BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        long dataStart = 8 + headerLength;
        using var header = JsonDocument.Parse(bytes.AsMemory(8, (int)headerLength));
        var metadata = new Dictionary<string, string>();
        var tensors = new Dictionary<string, (string, long[], byte[])>();
        long end = 0;
        foreach (var property in header.RootElement.EnumerateObject().OrderBy(p => p.Name == "__metadata__" ? -1 : p.Value.GetProperty("data_offsets")[0].GetInt64()))
        {
            if (property.Name == "__metadata__")
            {
                foreach (var m in property.Value.EnumerateObject()) metadata[m.Name] = m.Value.GetString()!;
                continue;
            }
            long begin = property.Value.GetProperty("data_offsets")[0].GetInt64(), stop = property.Value.GetProperty("data_offsets")[1].GetInt64();
            Assert.Equal(end, begin);
            end = stop;
            tensors[property.Name] = (property.Value.GetProperty("dtype").GetString()!,
                property.Value.GetProperty("shape").EnumerateArray().Select(d => d.GetInt64()).ToArray(),
                bytes[(int)(dataStart + begin)..(int)(dataStart + stop)]);
        }
        Assert.Equal(bytes.Length - dataStart, end);
        return (metadata, tensors);
    }

    [Fact]
    public void ATrainedCheckpointReslicedAsTp2SamplesResumesAndComparesAsTheOriginal()
    {
        string run = TestSupport.TempDir("slices-trained");
        var spec = TestSupport.TinyJob(run, "train.max-iters=1");
        using (var trainer = new Trainer(spec, TestSupport.Logger)) trainer.Run(new Quiet());
        string original = Path.Combine(run, "checkpoints", CheckpointFiles.DirectoryName(1));

        // Rewritten as two tensor-parallel ranks would: q/k/v by heads, the MLP's output projection by columns, other
        // matrices (the vocabulary among them) by rows, vectors whole on rank 0.
        string resliced = Path.Combine(TestSupport.TempDir("slices-trained"), CheckpointFiles.DirectoryName(1));
        using (var loaded = CheckpointFiles.Load(original))
        {
            var records = new List<ShardRecord>();
            for (int rank = 0; rank < 2; rank++)
            {
                var state = new List<StateEntry>();
                foreach (var (name, global) in loaded.Tensors)
                {
                    long n = global.shape[0], half = n / 2;
                    TensorSlice? slice = name.Contains("c_attn") ? new TensorSlice(global.shape, 0, [.. Enumerable.Range(0, 3).Select(i => new SliceSegment(i * n / 3 + rank * n / 6, n / 6))])
                        : name.EndsWith("mlp.c_proj.weight", StringComparison.Ordinal) ? TensorSlice.Range(global.shape, 1, rank * global.shape[1] / 2, global.shape[1] / 2)
                        : global.dim() == 2 ? TensorSlice.Range(global.shape, 0, rank == 0 ? 0 : half, rank == 0 ? half : n - half)
                        : null;
                    if (slice is not null) state.Add(new StateEntry(name, Holding(global, slice, slice.Held, 0), slice));
                    else if (rank == 0) state.Add(new StateEntry(name, global.clone()));
                }
                records.Add(CheckpointFiles.WriteShard(resliced, rank, 2, state, loaded.Metadata));
                DisposeAll(state.Select(e => e.Tensor));
            }
            CheckpointFiles.WriteManifest(resliced, CheckpointManifest.For(1, 1, [.. records], spec with { Parallel = new ParallelSpec(2, 1) }));
        }
        using (var loaded = CheckpointFiles.Load(resliced)) Assert.Contains(loaded.Stored.Values, s => s.Name.Contains("c_attn") && s.Pieces.Count == 2);

        var same = CheckpointFiles.Compare(original, resliced);
        Assert.True(same.Identical, same.Difference);
        using (var a = InferenceModel.Load(original))
        using (var b = InferenceModel.Load(resliced))
        {
            var expected = a.Model.named_parameters().ToDictionary(p => p.name, p => p.parameter);
            foreach (var (name, p) in b.Model.named_parameters()) Assert.True(Same(p, expected[name]), $"{name} differs");
        }
        using var resumed = new Trainer(spec, TestSupport.Logger, resliced);
        Assert.Equal(1, resumed.Step);
    }
}
