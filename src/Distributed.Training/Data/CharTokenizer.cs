using System.Text;
using Distributed.Core;

namespace Distributed.Training.Data;

/// <summary>
/// nanoGPT's character tokenizer over Unicode code points: the vocabulary is the sorted set of code points in the
/// corpus, so a character outside the Basic Multilingual Plane (an emoji, CJK extension B) is one token rather than
/// two UTF-16 halves, and any Unicode text round-trips. It travels with the model (checkpoint metadata, see
/// <see cref="Checkpoints.CheckpointVocabulary"/>), because ids mean nothing without it.
/// </summary>
public sealed class CharTokenizer
{
    readonly Rune[] _symbols;
    readonly string[] _texts;   // each symbol as UTF-16, for Decode
    readonly Dictionary<Rune, int> _ids;

    public CharTokenizer(IEnumerable<Rune> symbols)
    {
        _symbols = symbols.ToArray();
        if (_symbols.Length == 0) throw new DataException("the vocabulary is empty");
        _texts = _symbols.Select(s => s.ToString()).ToArray();
        _ids = new Dictionary<Rune, int>(_symbols.Length);
        for (int i = 0; i < _symbols.Length; i++)
            if (!_ids.TryAdd(_symbols[i], i))
                throw new DataException($"the vocabulary repeats the character {Describe(_symbols[i])}");
    }

    /// <summary>The code points of <paramref name="vocabulary"/>, in id order.</summary>
    public CharTokenizer(string vocabulary) : this(Runes(vocabulary, "the vocabulary")) { }

    public static CharTokenizer FromCorpus(string text) => new(Runes(text, "the corpus").Distinct().Order());

    /// <summary>The symbols (code points) in id order.</summary>
    public IReadOnlyList<Rune> Symbols => _symbols;

    /// <summary>All characters in id order, as one string.</summary>
    public string Vocabulary => string.Concat(_texts);

    public int Size => _symbols.Length;

    public int[] Encode(string text)
    {
        var ids = new List<int>(text.Length);
        foreach (var rune in Runes(text, "the text"))
            ids.Add(_ids.TryGetValue(rune, out int id) ? id : throw new DataException($"the character {Describe(rune)} is not in the model's vocabulary"));
        return ids.ToArray();
    }

    public string Decode(IEnumerable<int> ids)
    {
        var text = new StringBuilder();
        foreach (int id in ids) text.Append(_texts[id]);
        return text.ToString();
    }

    /// <summary>'x' (U+0078): the character and its code point.</summary>
    public static string Describe(Rune rune) => $"'{rune}' (U+{rune.Value:X4})";

    /// <summary>The code points of <paramref name="text"/>; a lone UTF-16 surrogate (not Unicode text) is an error naming where it is.</summary>
    static IEnumerable<Rune> Runes(string text, string what)
    {
        for (int i = 0; i < text.Length;)
        {
            if (Rune.TryCreate(text[i], out var single)) { yield return single; i++; }
            else if (i + 1 < text.Length && Rune.TryCreate(text[i], text[i + 1], out var pair)) { yield return pair; i += 2; }
            else throw new DataException($"{what} holds a lone UTF-16 surrogate (U+{(int)text[i]:X4}) at index {i}: it is not Unicode text");
        }
    }
}
