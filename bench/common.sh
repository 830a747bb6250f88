# Shared by the bench scripts: build dtrain once in Release and call it.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
dotnet build src/Distributed.Cli -c Release -v q -nologo -clp:ErrorsOnly >&2
DTRAIN=(dotnet "$REPO/src/Distributed.Cli/bin/Release/net10.0/dtrain.dll")
export CI=${CI:-true}   # plain log lines, no live display
