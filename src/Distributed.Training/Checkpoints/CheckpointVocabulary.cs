using System.Text;
using System.Text.Json;
using Distributed.Core;
using Distributed.Training.Data;

namespace Distributed.Training.Checkpoints;

/// <summary>
/// How a checkpoint stores its tokenizer's vocabulary: under <see cref="Key"/>, the code points in id order as a JSON
/// array of integers, which no encoding step can alter. Checkpoints written before code-point vocabularies hold
/// <c>vocab</c>, a string of UTF-16 code units: they still load when every character is in the Basic Multilingual
/// Plane (units and code points are then the same ids). Those with characters outside it stored UTF-16 halves, which
/// the header's JSON turned into U+FFFD: that vocabulary is lost, and loading it is an error naming the checkpoint.
/// </summary>
public static class CheckpointVocabulary
{
    public const string Key = "vocab-code-points";
    public const string LegacyKey = "vocab";

    public static string Encode(CharTokenizer tokenizer) => JsonSerializer.Serialize(tokenizer.Symbols.Select(s => s.Value));

    public static CharTokenizer Read(LoadedCheckpoint checkpoint) => Read(checkpoint.Metadata, checkpoint.Path);

    /// <param name="checkpoint">the checkpoint (or file) the metadata came from, for the errors</param>
    public static CharTokenizer Read(IReadOnlyDictionary<string, string> metadata, string checkpoint)
    {
        if (metadata.TryGetValue(Key, out var json)) return Decode(json, checkpoint);
        if (metadata.TryGetValue(LegacyKey, out var units)) return DecodeLegacy(units, checkpoint);
        throw new CheckpointException($"checkpoint '{checkpoint}' lacks metadata '{Key}' (its vocabulary)");
    }

    static CharTokenizer Decode(string json, string checkpoint)
    {
        int[] codePoints;
        try
        {
            codePoints = JsonSerializer.Deserialize<int[]>(json) ?? [];
        }
        catch (JsonException e)
        {
            throw new CheckpointException($"checkpoint '{checkpoint}' has an unreadable vocabulary ('{Key}'): {e.Message}");
        }
        int bad = Array.FindIndex(codePoints, c => !Rune.IsValid(c));
        if (bad >= 0)
            throw new CheckpointException($"checkpoint '{checkpoint}' has a vocabulary ('{Key}') holding {codePoints[bad]}, which is not a Unicode scalar value");
        try
        {
            return new CharTokenizer(codePoints.Select(c => new Rune(c)));
        }
        catch (DataException e)
        {
            throw new CheckpointException($"checkpoint '{checkpoint}' has a bad vocabulary ('{Key}'): {e.Message}");
        }
    }

    static CharTokenizer DecodeLegacy(string units, string checkpoint)
    {
        if (units.Any(char.IsSurrogate) || units.Distinct().Count() != units.Length)
            throw new CheckpointException(
                $"checkpoint '{checkpoint}' stores its vocabulary the old way ('{LegacyKey}', UTF-16 code units), which lost its characters outside the " +
                "Basic Multilingual Plane (emoji, some CJK): it cannot be resumed or sampled; train it again with this version");
        try
        {
            return new CharTokenizer(units);
        }
        catch (DataException e)
        {
            throw new CheckpointException($"checkpoint '{checkpoint}' has a bad vocabulary ('{LegacyKey}'): {e.Message}");
        }
    }
}
