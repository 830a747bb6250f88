using System.Text.Json;

namespace Distributed.Cluster;

/// <summary>
/// Times one recovery, from the fault (when one was injected) to the first completed step of the next generation,
/// split into detection, waiting for workers (a replacement process starting), and checkpoint load; appended to
/// recovery.jsonl in the run directory. Plain data kept by the coordinator actor: no locking needed; the actor
/// writes the records, off its thread.
/// </summary>
sealed class RecoveryTimeline(string path)
{
    public string Path { get; } = path;

    DateTime? _faultAt, _detectedAt, _generationAt, _startedAt;
    string? _fault, _reason;
    double _loadMs;
    long _abortedGeneration;

    public void FaultFired(string fault, DateTime at) => (_fault, _faultAt) = (fault, at);

    public void Detected(long generation, string reason) => (_abortedGeneration, _reason, _detectedAt) = (generation, reason, DateTime.UtcNow);

    public void GenerationStarted(long generation)
    {
        if (_detectedAt is not null) _generationAt = DateTime.UtcNow;
    }

    public void RankStarted(double loadMs)
    {
        if (_generationAt is null) return;
        _loadMs = loadMs;
        _startedAt = DateTime.UtcNow;
    }

    /// <summary>
    /// A restarted coordinator adopted the running generation: the record (a JSON line, for adoption.jsonl) of how long the job was without
    /// a coordinator, from the fault (if one was injected) and from the journal's replay to the adoption. Training went
    /// on meanwhile: no step was redone.
    /// </summary>
    public string Adopted(long generation, DateTime recoveredAt, DateTime adoptedAt)
    {
        var record = new
        {
            adopted_generation = generation, fault = _fault,
            fault_to_recovered_ms = _faultAt is null ? (double?)null : Math.Round((recoveredAt - _faultAt.Value).TotalMilliseconds, 1),
            adoption_ms = Math.Round((adoptedAt - recoveredAt).TotalMilliseconds, 1),
            fault_to_adopted_ms = _faultAt is null ? (double?)null : Math.Round((adoptedAt - _faultAt.Value).TotalMilliseconds, 1),
            fault_wall_time = _faultAt is null ? (double?)null : Math.Round((_faultAt.Value - DateTime.UnixEpoch).TotalSeconds, 6),
        };
        (_fault, _faultAt) = (null, null);
        return JsonSerializer.Serialize(record) + "\n";
    }

    /// <summary>The first step after a recovery: returns its record (a JSON line) for the caller to append to <see cref="Path"/>.</summary>
    public string? FirstStep(long generation, long step)
    {
        if (_generationAt is null || _startedAt is null || _detectedAt is null) return null;
        var now = DateTime.UtcNow;
        static double? Ms(DateTime? from, DateTime? to) => from is null || to is null ? null : Math.Round((to.Value - from.Value).TotalMilliseconds, 1);
        var record = new
        {
            aborted_generation = _abortedGeneration, generation, fault = _fault, reason = _reason, resumed_step = step,
            detection_ms = Ms(_faultAt, _detectedAt),
            waiting_for_workers_ms = Ms(_detectedAt, _generationAt),
            start_and_checkpoint_load_ms = Ms(_generationAt, _startedAt), checkpoint_load_ms = Math.Round(_loadMs, 1),
            first_step_ms = Ms(_startedAt, now),
            fault_to_first_step_ms = Ms(_faultAt ?? _detectedAt, now),
            // When the fault fired (or, without an injected fault, was detected), seconds since 1970 (UTC): the clock of metrics.jsonl's wall_time.
            fault_wall_time = Math.Round(((_faultAt ?? _detectedAt).Value - DateTime.UnixEpoch).TotalSeconds, 6),
        };
        (_fault, _faultAt, _detectedAt, _generationAt, _startedAt) = (null, null, null, null, null);
        return JsonSerializer.Serialize(record) + "\n";
    }
}
