using System.Text;
using Distributed.Core;

namespace Distributed.Training.Data;

/// <summary>A tokenized corpus split into a training part and a validation part (nanoGPT's 90/10 split).</summary>
public sealed class TextCorpus
{
    TextCorpus(CharTokenizer tokenizer, int[] train, int[] validation)
    {
        Tokenizer = tokenizer;
        Train = train;
        Validation = validation;
    }

    public CharTokenizer Tokenizer { get; }
    public int[] Train { get; }
    public int[] Validation { get; }

    /// <summary>Fails early, with the key to fix, when the data file is missing.</summary>
    public static void RequireFile(DataSpec spec)
    {
        if (!File.Exists(spec.Path))
            throw new DataException($"data file '{spec.Path}' does not exist (config key 'data.path')");
    }

    /// <summary>
    /// Loads the corpus. With a tokenizer from a checkpoint, the text must fit it; without one, the vocabulary
    /// is built from the text.
    /// </summary>
    public static TextCorpus Load(DataSpec spec, int blockSize, CharTokenizer? tokenizer = null)
    {
        RequireFile(spec);
        string text = ReadUtf8(spec.Path);
        tokenizer ??= CharTokenizer.FromCorpus(text);
        int[] ids = tokenizer.Encode(text);
        int split = (int)(ids.Length * spec.TrainFraction);
        var corpus = new TextCorpus(tokenizer, ids[..split], ids[split..]);
        if (corpus.Train.Length <= blockSize + 1 || corpus.Validation.Length <= blockSize + 1)
            throw new DataException(
                $"data file '{spec.Path}' is too short: each split needs more than block-size + 1 = {blockSize + 1} characters");
        return corpus;
    }

    // Strict: invalid bytes are an error, not U+FFFD, so what the model learns is exactly the file's text.
    static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    static string ReadUtf8(string path)
    {
        try
        {
            return File.ReadAllText(path, StrictUtf8);
        }
        catch (DecoderFallbackException e)
        {
            throw new DataException($"data file '{path}' is not UTF-8 text: it holds the invalid byte sequence {Convert.ToHexString(e.BytesUnknown ?? [])}");
        }
    }
}
