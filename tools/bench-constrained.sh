#!/usr/bin/env bash
# What constrained output costs a token (docs/perf/serving.md): one local cluster (T1 x P1), one request at
# a time, `nibble client --max-tokens 64 --ignore-eos` with free text, JSON mode, a JSON schema and a GBNF
# grammar, each at min-p 0.05 (the client's default: truncation, so every step masks the vocabulary) and
# min-p 0 (no truncation: a draw from the whole row is kept when the constraint allows it), seeds 1-4
# twice, alternating; prints the mean and range of decode_ms / 63 per mode.
#
#   tools/bench-constrained.sh MODEL
#
# Environment: NIBBLE_BIN (default build/bin/nibble), PORT (default 5602), THREADS (default 2).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="$(realpath "${1:?usage: tools/bench-constrained.sh MODEL}")"
bin="${NIBBLE_BIN:-$root/build/bin/nibble}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat > "$work/cluster.yaml" <<YAML
model: { path: "$model" }
parallel: { tensor: 1, pipeline: 1 }
threads: ${THREADS:-2}
server: { listen: "tcp://127.0.0.1:${PORT:-5602}" }
YAML
cat > "$work/schema.json" <<'JSON'
{"type": "object", "properties": {"author": {"type": "string"}, "year": {"type": "integer"},
 "mood": {"enum": ["funny", "wise", "sad"]}}, "required": ["author", "year", "mood"]}
JSON
# Sentences of lower-case words and punctuation, any number of them (the output never has to end).
printf 'root ::= sentence+\nsentence ::= [A-Z]? [a-z]+ ([ ,] [a-z]+)* [.!?] " "\n' > "$work/words.gbnf"
endpoint="$(NIBBLE_BIN="$bin" "$root/deploy/launch-local.sh" --config "$work/cluster.yaml" --timeout 300 \
  --run-dir "$work/run")"
modes=("text" "json_object" "json_schema" "grammar")
declare -A flags=([text]="" [json_object]="--response-format json_object" [json_schema]="--json-schema $work/schema.json"
  [grammar]="--grammar-file $work/words.gbnf")
for min_p in 0.05 0; do
  declare -A times=()
  for round in 1 2; do
    for seed in 1 2 3 4; do
      for mode in "${modes[@]}"; do
        # shellcheck disable=SC2086
        ms=$("$bin" client --endpoint "$endpoint" --prompt "The meaning of life is" --max-tokens 64 \
          --temperature 0.8 --min-p "$min_p" --seed "$seed" --ignore-eos --json ${flags[$mode]} |
          python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["timings"]["decode_ms"] / 63)')
        times[$mode]="${times[$mode]:-} $ms"
      done
    done
  done
  for mode in "${modes[@]}"; do
    python3 -c 'import sys; v=[float(x) for x in sys.argv[3:]]; print(f"min_p {sys.argv[1]:>4}  {sys.argv[2]:<12} TPOT {sum(v)/len(v):.2f} ms ({min(v):.2f} - {max(v):.2f})")' \
      "$min_p" "$mode" ${times[$mode]}
  done
done
NIBBLE_BIN="$bin" "$root/deploy/stop-local.sh" --endpoint "$endpoint" --run-dir "$work/run" >/dev/null
