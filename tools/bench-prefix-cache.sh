#!/usr/bin/env bash
# Prefix caching on and off on the same bench-serve workload (docs/perf/serving.md): a one-worker
# local cluster with `kv_cache.prefix_caching: true`, then one with `false`, each sent the same
# requests: every prompt the same PREFIX random token ids (a system prompt) and 16-64 of its own.
#
#   tools/bench-prefix-cache.sh MODEL [REQUESTS=16] [PREFIX=384] [VOCAB=32000]
#
# Environment: NIBBLE_BIN (default build/bin/nibble), PORT (default 5601), THREADS (default 2).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="$(realpath "${1:?usage: tools/bench-prefix-cache.sh MODEL [REQUESTS] [PREFIX] [VOCAB]}")"
requests="${2:-16}" prefix="${3:-384}" vocab="${4:-32000}"
bin="${NIBBLE_BIN:-$root/build/bin/nibble}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for caching in true false; do
  cat > "$work/cluster.yaml" <<YAML
model: { path: "$model" }
parallel: { tensor: 1, pipeline: 1 }
threads: ${THREADS:-2}
server: { listen: "tcp://127.0.0.1:${PORT:-5601}" }
kv_cache: { prefix_caching: $caching }
YAML
  endpoint="$(NIBBLE_BIN="$bin" "$root/deploy/launch-local.sh" --config "$work/cluster.yaml" --timeout 300 \
    --run-dir "$work/run-$caching")"
  echo "== prefix_caching: $caching"
  "$bin" bench-serve --endpoint "$endpoint" --concurrency 4 --requests "$requests" --shared-prefix "$prefix" \
    --prompt-tokens 16:64 --max-tokens 16:32 --vocab "$vocab" --seed 1 --timeout-ms 600000 || true
  "$bin" client --endpoint "$endpoint" --stats | grep -E 'prompt_tokens|cached'
  NIBBLE_BIN="$bin" "$root/deploy/stop-local.sh" --endpoint "$endpoint" --run-dir "$work/run-$caching" >/dev/null
done
