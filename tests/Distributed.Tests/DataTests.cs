using Distributed.Core;
using Distributed.Training.Data;

namespace Distributed.Tests;

public class DataTests
{
    [Fact]
    public void TokenizerRoundTripsTheCorpus()
    {
        string text = File.ReadAllText(TestSupport.Corpus);
        var tokenizer = CharTokenizer.FromCorpus(text);
        Assert.Equal(65, tokenizer.Size);
        Assert.Equal(text, tokenizer.Decode(tokenizer.Encode(text)));
        Assert.Equal(0, tokenizer.Encode("\n")[0]);   // sorted: newline is the smallest character
    }

    [Fact]
    public void UnknownCharacterIsNamed()
    {
        var tokenizer = new CharTokenizer("ab");
        Assert.Contains("'z' (U+007A)", Assert.Throws<DataException>(() => tokenizer.Encode("abz")).Message);
    }

    /// <summary>Characters outside the BMP (emoji, CJK extension B) are one token each; a lone surrogate is not text.</summary>
    [Fact]
    public void TokenizerWorksOnCodePointsAndRoundTripsAnyUnicodeText()
    {
        const string text = "ab 😀 𠀀 é\u0301 ！ 你好 🎭 a😀";
        var tokenizer = CharTokenizer.FromCorpus(text);
        Assert.Equal(text.EnumerateRunes().Distinct().Count(), tokenizer.Size);
        Assert.Equal(text, tokenizer.Decode(tokenizer.Encode(text)));
        Assert.Equal(text.EnumerateRunes().Count(), tokenizer.Encode(text).Length);
        // Sorted by code point: U+FF01 comes before the emoji (UTF-16 order would put the emoji's surrogates first).
        Assert.Equal([.. text.EnumerateRunes().Distinct().Order()], tokenizer.Symbols);
        Assert.Equal(tokenizer.Vocabulary, new CharTokenizer(tokenizer.Vocabulary).Vocabulary);
        Assert.Contains("'🌍' (U+1F30D)", Assert.Throws<DataException>(() => tokenizer.Encode("a🌍")).Message);
        Assert.Contains("lone UTF-16 surrogate (U+D83D) at index 1", Assert.Throws<DataException>(() => tokenizer.Encode("a\uD83Db")).Message);
        Assert.Contains("repeats the character '😀'", Assert.Throws<DataException>(() => new CharTokenizer("😀a😀")).Message);
    }

    [Fact]
    public void ACorpusThatIsNotUtf8IsNamed()
    {
        string path = Path.Combine(TestSupport.TempDir("latin1"), "latin1.txt");
        File.WriteAllBytes(path, [.. "caf"u8, 0xE9, .. " au lait, encore et encore"u8]);
        var error = Assert.Throws<DataException>(() => TextCorpus.Load(new DataSpec(path, 0.5), 2));
        Assert.Contains($"data file '{path}' is not UTF-8 text", error.Message);
    }

    [Fact]
    public void SplitIsNinetyTen()
    {
        var corpus = TextCorpus.Load(new DataSpec(TestSupport.Corpus, 0.9), 64);
        Assert.Equal(1_003_854, corpus.Train.Length);
        Assert.Equal(111_540, corpus.Validation.Length);
    }

    [Fact]
    public void MissingDataFileIsNamed()
    {
        var error = Assert.Throws<DataException>(() => TextCorpus.Load(new DataSpec("no/such.txt", 0.9), 64));
        Assert.Contains("data file 'no/such.txt' does not exist (config key 'data.path')", error.Message);
    }

    static int[] Tokens() => Enumerable.Range(0, 10_000).Select(i => i % 97).ToArray();

    [Fact]
    public void SamplerIsAPureFunctionOfSeedAndStep()
    {
        var a = new BatchSampler(Tokens(), 16, seed: 5, Seeds.TrainStream);
        var b = new BatchSampler(Tokens(), 16, seed: 5, Seeds.TrainStream);
        Assert.Equal(a.Draw(42, 0, 8).Inputs, b.Draw(42, 0, 8).Inputs);
        Assert.Equal(a.Draw(42, 0, 8).Targets, b.Draw(42, 0, 8).Targets);
        Assert.NotEqual(a.Draw(42, 0, 8).Inputs, a.Draw(43, 0, 8).Inputs);
        Assert.NotEqual(a.Draw(42, 0, 8).Inputs, new BatchSampler(Tokens(), 16, seed: 6, Seeds.TrainStream).Draw(42, 0, 8).Inputs);
        var (x, y) = a.Draw(7, 0, 3);
        for (int i = 0; i < 3; i++)   // targets are inputs shifted by one
            Assert.Equal(x.Skip(i * 16 + 1).Take(15), y.Skip(i * 16).Take(15));
    }

    [Theory]
    [InlineData(12, 2, 1)]
    [InlineData(12, 3, 2)]
    [InlineData(12, 4, 3)]
    [InlineData(24, 4, 2)]
    public void DataParallelRanksTogetherDrawTheGlobalBatch(int globalBatch, int dpSize, int gradAccum)
    {
        var sampler = new BatchSampler(Tokens(), 16, seed: 9, Seeds.TrainStream);
        for (long step = 0; step < 5; step++)
        {
            var single = sampler.Draw(step, 0, globalBatch).Inputs;
            var pieces = new List<long>();
            for (int rank = 0; rank < dpSize; rank++)
                for (int micro = 0; micro < gradAccum; micro++)
                {
                    var (first, count) = BatchSampler.Slice(globalBatch, rank, dpSize, micro, gradAccum);
                    pieces.AddRange(sampler.Draw(step, first, count).Inputs);
                }
            Assert.Equal(single, pieces);
        }
    }

    [Fact]
    public void WindowsStayInsideTheCorpus()
    {
        var tokens = Enumerable.Range(0, 40).ToArray();
        var sampler = new BatchSampler(tokens, 16, seed: 1, Seeds.TrainStream);
        for (long step = 0; step < 500; step++)
        {
            long start = sampler.WindowStart(step, 0);
            Assert.InRange(start, 0, tokens.Length - 17);
        }
    }
}
