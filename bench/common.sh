# Shared by the bench scripts: build dtrain once in Release and call it.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
dotnet build src/Distributed.Cli -c Release -v q -nologo -clp:ErrorsOnly >&2
DTRAIN=(dotnet "$REPO/src/Distributed.Cli/bin/Release/net10.0/dtrain.dll")
export CI=${CI:-true}   # plain log lines, no live display

# Steady-state tokens/s of a run (metrics.jsonl): steps after the 10th, step time only, as torch-peer computes it.
steady_tokens_per_s() {
  python3 -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steady = rows[min(10, len(rows) // 2):]
tokens = 12 * 64  # the recipe global batch x block
print(round(tokens * len(steady) / sum(r["step_ms"] / 1000 for r in steady), 1))' "$1"
}
