using TorchSharp;
using static TorchSharp.torch;

namespace Distributed.Model;

public static class TextGeneration
{
    /// <summary>
    /// nanoGPT's generate: feed the last block-size tokens, scale the last logits by 1/temperature, keep the top k,
    /// and sample (temperature 0 takes the most likely token). The seed makes the sample reproducible.
    /// </summary>
    public static List<int> Generate(Gpt model, IReadOnlyList<int> prompt, int tokens, double temperature, long seed, int? topK = null)
    {
        if (prompt.Count == 0) throw new ArgumentException("the prompt must hold at least one token");
        using var generator = new Generator((ulong)seed);
        using var noGrad = no_grad();
        model.eval();
        var ids = prompt.ToList();
        for (int i = 0; i < tokens; i++)
        {
            using var scope = NewDisposeScope();
            int start = Math.Max(0, ids.Count - model.Spec.BlockSize);
            var context = tensor(ids.Skip(start).Select(x => (long)x).ToArray(), [1, ids.Count - start]);
            var logits = model.forward(context)[0, -1];
            int next;
            if (temperature <= 0)
            {
                next = (int)logits.argmax().item<long>();
            }
            else
            {
                logits = logits / temperature;
                if (topK is int k && k < logits.shape[0])
                {
                    var threshold = logits.topk(k).values[-1];
                    logits = logits.masked_fill(logits < threshold, double.NegativeInfinity);
                }
                next = (int)multinomial(logits.softmax(-1), 1, generator: generator).item<long>();
            }
            ids.Add(next);
        }
        return ids;
    }
}
