using System.CommandLine;
using Distributed.Core;
using Distributed.Model;
using Distributed.Training.Checkpoints;

namespace Distributed.Cli;

static class SampleCommand
{
    public static Command Create()
    {
        var checkpoint = new Option<string>("--checkpoint") { Description = "a checkpoint directory (runs/NAME/checkpoints/step-NNNNNNNN)", Required = true };
        var prompt = new Option<string>("--prompt") { Description = "text to continue", DefaultValueFactory = _ => "\n" };
        var tokens = new Option<int>("--tokens") { Description = "characters to generate", DefaultValueFactory = _ => 500 };
        var temperature = new Option<double>("--temperature") { Description = "0 = greedy; 1 = the model's distribution", DefaultValueFactory = _ => 0.8 };
        var topK = new Option<int?>("--top-k") { Description = "sample only among the k most likely tokens", DefaultValueFactory = _ => 200 };
        var seed = new Option<long>("--seed") { DefaultValueFactory = _ => 1337 };
        var command = new Command("sample", "generate text from a checkpoint") { checkpoint, prompt, tokens, temperature, topK, seed };
        command.SetAction(parse =>
        {
            int count = parse.GetValue(tokens);
            if (count < 0) throw new UserFacingException($"--tokens must be 0 or more, got {count}");
            double t = parse.GetValue(temperature);
            if (t < 0 || !double.IsFinite(t)) throw new UserFacingException($"--temperature must be 0 or more, got {t}");
            using var model = InferenceModel.Load(parse.GetValue(checkpoint)!);
            string text = parse.GetValue(prompt)!.Replace("\\n", "\n");
            if (text.Length == 0) text = "\n";
            var ids = TextGeneration.Generate(model.Model, model.Tokenizer.Encode(text), count, t, parse.GetValue(seed), parse.GetValue(topK));
            // UTF-8 whatever the locale says: a character outside the BMP must not come out as '?'.
            Console.OutputEncoding = new System.Text.UTF8Encoding(encoderShouldEmitUTF8Identifier: false);
            Console.WriteLine(model.Tokenizer.Decode(ids));
            return 0;
        });
        return command;
    }
}
