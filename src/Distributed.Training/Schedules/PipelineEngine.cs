using Distributed.Comm;
using Distributed.Model.Parallel;
using System.Diagnostics;
using static TorchSharp.torch;

namespace Distributed.Training.Schedules;

/// <summary>When one pass of a step ran (Stopwatch ticks): started, had its input, finished computing, handed its output on.</summary>
public readonly record struct PassTiming(PipelinePass Pass, long Start, long Ready, long Done, long End);

/// <summary>
/// Runs one stage of a pipeline: the passes of <see cref="PipelineSchedule"/> in order, receiving activations from the
/// previous stage and their gradients from the next one, point to point over the pipeline group (each direction of
/// each pair carries one kind of tensor in micro-batch order, so the streams match without tags; every transfer waits
/// at most the step's deadline, and a dead neighbour fails it with its rank). Sends complete without the receiver
/// (its mailbox takes them), so no order of passes can deadlock. Runs on the training thread.
/// </summary>
sealed class PipelineEngine(ParallelGpt model, IProcessGroup pipeline, TensorParallelGroup tensorParallel, string schedule, int microBatches)
{
    public string Schedule => schedule;
    public int MicroBatches => microBatches;

    /// <summary>Time spent waiting for neighbours in the last step (receives and sends): the bubble plus transfers.</summary>
    public TimeSpan Waiting => _timeline.Aggregate(TimeSpan.Zero,
        (sum, t) => sum + Stopwatch.GetElapsedTime(t.Start, t.Ready) + Stopwatch.GetElapsedTime(t.Done, t.End));

    /// <summary>The most micro-batches whose activations were alive at once in the last step.</summary>
    public int PeakInFlight { get; private set; }

    /// <summary>
    /// The last step's passes in the order run, each with four instants (Stopwatch ticks, a clock every process on the
    /// host shares): start, input in hand, compute done, output handed on. Waiting is (ready - start) + (end - done).
    /// </summary>
    public IReadOnlyList<PassTiming> Timeline => _timeline;
    readonly List<PassTiming> _timeline = [];
    long _ready, _done;

    /// <summary>
    /// Forward and backward of every micro-batch of one step; gradients accumulate in the parameters' .grad. Returns the
    /// sum of the micro-batch losses, each scaled by 1/M (on the last stage; 0 elsewhere).
    /// </summary>
    public double TrainStep(Func<int, (Tensor X, Tensor Y)> microBatch, CancellationToken deadline)
    {
        var stage = model.Stage;
        var inputs = new Tensor?[microBatches];
        var outputs = new Tensor?[microBatches];
        double loss = 0;
        int inFlight = 0;
        PeakInFlight = 0;
        _timeline.Clear();
        foreach (var pass in PipelineSchedule.Passes(schedule, stage.Index, stage.Count, microBatches))
        {
            int m = pass.MicroBatch;
            // The batch is read before the clock starts: it is neither this stage's compute nor a wait for a neighbour.
            var (x, y) = pass.Forward ? microBatch(m) : (null!, null!);
            long start = _ready = Stopwatch.GetTimestamp();
            _done = 0;   // set by a send; a pass that sends nothing is done when it ends
            if (pass.Forward)
            {
                var input = stage.IsFirst ? x : Receive(stage.Index - 1, [x.shape[0], x.shape[1], model.Spec.Embedding], deadline).requires_grad_(true);
                var output = model.StageForward(input);
                if (stage.IsLast)
                {
                    output = model.StageLoss(output, y) / microBatches;
                    loss += output.item<float>();
                }
                else Send(stage.Index + 1, output, deadline);
                (inputs[m], outputs[m]) = (input, output);
                PeakInFlight = Math.Max(PeakInFlight, ++inFlight);
            }
            else
            {
                var output = outputs[m]!;
                if (stage.IsLast) output.backward();
                else output.backward([Receive(stage.Index + 1, output.shape, deadline)]);
                tensorParallel.ThrowIfFailed();
                if (!stage.IsFirst) Send(stage.Index - 1, inputs[m]!.grad!, deadline);
                (inputs[m], outputs[m]) = (null, null);   // this micro-batch's activations may go
                inFlight--;
            }
            long end = Stopwatch.GetTimestamp();
            _timeline.Add(new(pass, start, _ready, _done != 0 ? _done : end, end));
        }
        return loss;
    }

    /// <summary>Forward only (evaluation): the batch's mean loss on the last stage, 0 elsewhere.</summary>
    public double Loss(Tensor x, Tensor y, CancellationToken deadline)
    {
        var stage = model.Stage;
        var input = stage.IsFirst ? x : Receive(stage.Index - 1, [x.shape[0], x.shape[1], model.Spec.Embedding], deadline);
        var output = model.StageForward(input);
        if (!stage.IsLast) { Send(stage.Index + 1, output, deadline); return 0; }
        return model.StageLoss(output, y).item<float>();
    }

    void Send(int stage, Tensor t, CancellationToken deadline)
    {
        _done = Stopwatch.GetTimestamp();
        var data = t.detach().contiguous();
        var bytes = TensorBytes.Of(data, "activation");
        pipeline.SendAsync(stage, bytes.Memory(0, checked((int)bytes.Length)), deadline).GetAwaiter().GetResult();
    }

    Tensor Receive(int stage, long[] shape, CancellationToken deadline)
    {
        var t = empty(shape, dtype: ScalarType.Float32);
        var bytes = TensorBytes.Of(t, "activation");
        pipeline.ReceiveAsync(stage, bytes.Memory(0, checked((int)bytes.Length)), deadline).GetAwaiter().GetResult();
        _ready = Stopwatch.GetTimestamp();
        return t;
    }
}
