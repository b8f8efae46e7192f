#!/usr/bin/env bash
# The main job on a fresh Debian machine: install what is needed, build, make a small Llama model
# (random weights, no download) and answer a prompt with it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${NIBBLE_BUILD_DIR:-$root/build}"
bash "$root/deploy/install-deps.sh"
bash "$root/deploy/build.sh"
model="$build/models/tiny-q4_0.gguf"
mkdir -p "$(dirname "$model")"
[ -f "$model" ] || "$build/bin/nibble" make-model --shape tiny --type q4_0 --out "$model"
"$build/bin/nibble" generate --model "$model" --prompt "Once upon a time" --max-tokens 32 --temperature 0 --json
