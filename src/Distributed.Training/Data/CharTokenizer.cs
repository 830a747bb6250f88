using Distributed.Core;

namespace Distributed.Training.Data;

/// <summary>
/// nanoGPT's character tokenizer: the vocabulary is the sorted set of characters in the corpus.
/// It travels with the model (checkpoint metadata), because ids mean nothing without it.
/// </summary>
public sealed class CharTokenizer
{
    readonly Dictionary<char, int> _ids;

    public CharTokenizer(string vocabulary)
    {
        if (vocabulary.Length == 0) throw new UserFacingException("the vocabulary is empty");
        Vocabulary = vocabulary;
        _ids = new Dictionary<char, int>(vocabulary.Length);
        for (int i = 0; i < vocabulary.Length; i++)
            if (!_ids.TryAdd(vocabulary[i], i))
                throw new UserFacingException($"the vocabulary repeats the character '{vocabulary[i]}'");
    }

    public static CharTokenizer FromCorpus(string text) =>
        new(new string(text.Distinct().Order().ToArray()));

    /// <summary>All characters in id order.</summary>
    public string Vocabulary { get; }

    public int Size => Vocabulary.Length;

    public int[] Encode(string text)
    {
        var ids = new int[text.Length];
        for (int i = 0; i < text.Length; i++)
            ids[i] = _ids.TryGetValue(text[i], out int id)
                ? id
                : throw new UserFacingException($"the character '{text[i]}' (U+{(int)text[i]:X4}) is not in the model's vocabulary");
        return ids;
    }

    public string Decode(IEnumerable<int> ids) => new(ids.Select(i => Vocabulary[i]).ToArray());
}
