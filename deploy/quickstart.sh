#!/usr/bin/env bash
# The main job on a fresh Debian machine: install what is needed, build, make a small Llama model
# (random weights, no download), start a local cluster (1 coordinator + 2 tensor-parallel workers,
# config/local-tp2.yaml) under mpirun, send it one request with `nibble client`, print the answer
# and shut the cluster down cleanly.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${NIBBLE_BUILD_DIR:-$root/build}"
started=$SECONDS
say() { echo "quickstart: $*" >&2; }

bash "$root/deploy/install-deps.sh"
NIBBLE_BUILD_TARGET=nibble bash "$root/deploy/build.sh"
export NIBBLE_BIN="$build/bin/nibble"

# The model goes where config/local-tp2.yaml points (../build/models, relative to config/).
config="$root/config/local-tp2.yaml"
model="$root/build/models/tiny-q4_0.gguf"
mkdir -p "$(dirname "$model")"
[ -f "$model" ] || "$NIBBLE_BIN" make-model --shape tiny --type q4_0 --out "$model"

say "starting the cluster ($config)"
endpoint="$(bash "$root/deploy/launch-local.sh" --config "$config")"
# Whatever happens from here on, do not leave the cluster running.
trap 'bash "$root/deploy/stop-local.sh" --endpoint "$endpoint" >/dev/null 2>&1 || true' EXIT

say "one request to $endpoint:"
"$NIBBLE_BIN" client --endpoint "$endpoint" --prompt "Once upon a time" --max-tokens 32 --temperature 0 --json

trap - EXIT
bash "$root/deploy/stop-local.sh" --endpoint "$endpoint"
say "done in $((SECONDS - started)) s"
