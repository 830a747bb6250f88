using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Distributed.Core;
using TorchSharp;
using static TorchSharp.torch;

namespace Distributed.Training.Checkpoints;

/// <summary>A tensor's name, shape and where its bytes lie, as a safetensors header lists it.</summary>
public sealed record TensorEntry(string Name, string DType, long[] Shape, long Begin, long End);

/// <summary>
/// The safetensors format (8-byte little-endian header length, JSON header, raw little-endian data), so our
/// checkpoints open in Python tools. Only float32 and int64 are used here.
/// </summary>
public static class SafeTensors
{
    // Reads and writes go in pieces this large: a tensor's bytes may exceed what one Span can hold.
    const int PieceBytes = 64 << 20;

    /// <summary>
    /// Writes contiguous CPU tensors and string metadata to <paramref name="stream"/>; returns the SHA-256 of all bytes
    /// written. <paramref name="afterData"/> runs once the last byte is written (an fsync overlaps the hashing).
    /// </summary>
    public static byte[] Write(Stream stream, IReadOnlyList<(string Name, Tensor Tensor)> tensors, IReadOnlyDictionary<string, string> metadata,
        Action? afterData = null)
    {
        var header = new JsonObject();
        var meta = new JsonObject();
        foreach (var (k, v) in metadata.OrderBy(p => p.Key, StringComparer.Ordinal)) meta[k] = v;
        header["__metadata__"] = meta;
        long offset = 0;
        foreach (var (name, tensor) in tensors)
        {
            long bytes = tensor.NumberOfElements * tensor.ElementSize;
            header[name] = new JsonObject
            {
                ["dtype"] = DTypeName(tensor.dtype),
                ["shape"] = new JsonArray(tensor.shape.Select(d => (JsonNode)d).ToArray()),
                ["data_offsets"] = new JsonArray(offset, offset + bytes),
            };
            offset += bytes;
        }
        byte[] json = Encoding.UTF8.GetBytes(header.ToJsonString());
        int padded = (json.Length + 7) / 8 * 8;   // the format recommends 8-byte alignment of the data section
        var headerBytes = new byte[8 + padded];
        BinaryPrimitives.WriteUInt64LittleEndian(headerBytes, (ulong)padded);
        json.CopyTo(headerBytes, 8);
        headerBytes.AsSpan(8 + json.Length).Fill((byte)' ');

        // Reads only bytes, in pieces (a tensor may exceed 2 GiB, the most one Span holds). This runs on a checkpoint
        // writer's thread beside the training thread, so it creates no torch object, except the view TensorBytes
        // needs to find the address of a tensor over 2 GiB, disposed at once (dispose scopes are per thread).
        var data = tensors.Select(t => TensorBytes.Of(t.Tensor, $"tensor '{t.Name}'")).ToList();
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        stream.Write(headerBytes);
        hash.AppendData(headerBytes);
        // Hashing (about 2 GB/s with SHA extensions) runs beside the writing instead of after each block, and
        // afterData (the fsync) runs before waiting for it, so a checkpoint costs about one pass over the bytes.
        var hashing = Task.Run(() =>
        {
            foreach (var t in data)
                foreach (var (at, length) in t.Pieces(PieceBytes)) hash.AppendData(t.Span(at, length));
        });
        try
        {
            foreach (var t in data)
                foreach (var (at, length) in t.Pieces(PieceBytes)) stream.Write(t.Span(at, length));
            afterData?.Invoke();
        }
        finally
        {
            hashing.GetAwaiter().GetResult();   // the hasher reads the tensors until it is done, also when the write failed
        }
        return hash.GetHashAndReset();
    }

    /// <summary>Reads the header of a safetensors file: its metadata and tensor entries.</summary>
    public static (Dictionary<string, string> Metadata, List<TensorEntry> Entries, long DataStart) ReadHeader(Stream stream, string path)
    {
        Span<byte> lengthBytes = stackalloc byte[8];
        if (stream.ReadAtLeast(lengthBytes, 8, throwOnEndOfStream: false) != 8)
            throw new CheckpointException($"checkpoint '{path}' is not a safetensors file: shorter than its header length");
        ulong length = BinaryPrimitives.ReadUInt64LittleEndian(lengthBytes);
        if (length > 100_000_000 || (long)length > stream.Length - 8)
            throw new CheckpointException($"checkpoint '{path}' is not a safetensors file: header length {length} is impossible");
        var json = new byte[length];
        stream.ReadExactly(json);
        JsonObject header;
        try { header = JsonNode.Parse(json)?.AsObject() ?? throw new JsonException("empty header"); }
        catch (Exception e) when (e is JsonException or InvalidOperationException)
        {
            throw new CheckpointException($"checkpoint '{path}' has a corrupt safetensors header: {e.Message}");
        }
        var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
        var entries = new List<TensorEntry>();
        foreach (var (name, node) in header)
        {
            if (node is null) continue;
            if (name == "__metadata__")
            {
                foreach (var (k, v) in node.AsObject()) metadata[k] = v?.GetValue<string>() ?? "";
                continue;
            }
            var offsets = node["data_offsets"]!.AsArray();
            entries.Add(new TensorEntry(name, node["dtype"]!.GetValue<string>(),
                node["shape"]!.AsArray().Select(d => d!.GetValue<long>()).ToArray(),
                offsets[0]!.GetValue<long>(), offsets[1]!.GetValue<long>()));
        }
        return (metadata, entries, 8 + (long)length);
    }

    /// <summary>Reads one tensor's bytes into a new CPU tensor.</summary>
    public static Tensor ReadTensor(Stream stream, long dataStart, TensorEntry entry, string path)
    {
        var tensor = empty(entry.Shape, ScalarTypeOf(entry, path));
        try
        {
            ReadInto(stream, dataStart, entry, path, tensor);
            return tensor;
        }
        catch
        {
            tensor.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Reads one tensor's bytes straight into <paramref name="target"/> (contiguous, on the CPU, of the entry's dtype
    /// and element count), in pieces: no buffer of the whole tensor.
    /// </summary>
    public static void ReadInto(Stream stream, long dataStart, TensorEntry entry, string path, Tensor target)
    {
        if (target.dtype != ScalarTypeOf(entry, path))
            throw new CheckpointException($"checkpoint '{path}' tensor '{entry.Name}' is {entry.DType}, the target is {target.dtype}");
        var bytes = TensorBytes.Of(target, $"the target of tensor '{entry.Name}'");
        if (entry.End - entry.Begin != bytes.Length || entry.Begin < 0 || dataStart + entry.End > stream.Length)
            throw new CheckpointException($"checkpoint '{path}' tensor '{entry.Name}' has {entry.End - entry.Begin} bytes, expected {bytes.Length}");
        stream.Position = dataStart + entry.Begin;
        foreach (var (offset, length) in bytes.Pieces(PieceBytes)) stream.ReadExactly(bytes.Span(offset, length));
    }

    public static ScalarType ScalarTypeOf(TensorEntry entry, string path) => entry.DType switch
    {
        "F32" => ScalarType.Float32,
        "I64" => ScalarType.Int64,
        _ => throw new CheckpointException($"checkpoint '{path}' tensor '{entry.Name}' has unsupported dtype {entry.DType}"),
    };

    static string DTypeName(ScalarType type) => type switch
    {
        ScalarType.Float32 => "F32",
        ScalarType.Int64 => "I64",
        _ => throw new NotSupportedException($"safetensors writer: dtype {type} is not used by checkpoints"),
    };
}
