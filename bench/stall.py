"""What a fault cost a run in training time, from its metrics.jsonl: the longest time without a finished step after
the fault (the stall, from the fault's wall time, recovery.jsonl's or adoption.jsonl's fault_wall_time) and the
steps trained more than once (a generation that went back to its last commit redoes them).
Usage: python3 bench/stall.py RUN_DIR  ->  "STALL_SECONDS REDONE_STEPS" (stall 0 when no fault time is recorded)"""
import json, os, sys

run = sys.argv[1]
steps = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
faults = []
for name in ("recovery.jsonl", "adoption.jsonl"):
    path = os.path.join(run, name)
    if os.path.exists(path):
        faults += [r["fault_wall_time"] for r in map(json.loads, open(path)) if r.get("fault_wall_time") is not None]
stall = 0.0
for fault in faults:
    after = sorted(s["wall_time"] for s in steps if s["wall_time"] > fault)
    if after:
        stall = max(stall, max([after[0] - fault] + [b - a for a, b in zip(after, after[1:])]))
seen, redone = set(), 0
for s in steps:
    redone += s["step"] in seen
    seen.add(s["step"])
print(f"{stall:.3f} {redone}")
