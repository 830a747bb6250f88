using System.Globalization;
using System.Text.Json;
using Distributed.Core;
using Distributed.Model;
using Distributed.Training.Data;

namespace Distributed.Training.Checkpoints;

/// <summary>A model rebuilt from a checkpoint alone (its job spec and vocabulary travel inside it).</summary>
public sealed class InferenceModel : IDisposable
{
    InferenceModel(Gpt model, CharTokenizer tokenizer, JobSpec spec, long step)
    {
        Model = model;
        Tokenizer = tokenizer;
        Spec = spec;
        Step = step;
    }

    public Gpt Model { get; }
    public CharTokenizer Tokenizer { get; }
    public JobSpec Spec { get; }
    public long Step { get; }

    public static InferenceModel Load(string path)
    {
        using var checkpoint = CheckpointFiles.Load(path);
        var spec = ReadSpec(checkpoint);
        var tokenizer = CheckpointVocabulary.Read(checkpoint);
        var model = new Gpt(spec.Model, tokenizer.Size, spec.Seed);
        // Whole targets: CopyInto assembles each weight from the pieces of whatever layout wrote the checkpoint.
        checkpoint.CopyInto(model.named_parameters().Select(p => new StateEntry(CheckpointFiles.ModelPrefix + p.name, p.parameter)));
        model.eval();
        return new InferenceModel(model, tokenizer, spec, long.Parse(checkpoint.Require("step"), CultureInfo.InvariantCulture));
    }

    public static JobSpec ReadSpec(LoadedCheckpoint checkpoint)
    {
        try
        {
            return JsonSerializer.Deserialize<JobSpec>(checkpoint.Require("job"))
                ?? throw new CheckpointException($"checkpoint '{checkpoint.Path}' has an empty job spec");
        }
        catch (JsonException e)
        {
            throw new CheckpointException($"checkpoint '{checkpoint.Path}' has an unreadable job spec: {e.Message}");
        }
    }

    public void Dispose() => Model.Dispose();
}
