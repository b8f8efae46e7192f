#!/usr/bin/env bash
# The HTTP gateway's cost (docs/perf/serving.md): one local cluster, the same bench-serve workload
# sent straight to the coordinator over ZeroMQ, then through `nibble openai` (/v1/completions,
# streamed), then ZeroMQ again (to see the machine's drift); prints each run and the HTTP/ZeroMQ ratios.
#
#   tools/bench-openai.sh MODEL [REQUESTS=64] [CONCURRENCY=8] [VOCAB=32000]
#
# Environment: NIBBLE_BIN (default build/bin/nibble), PORT (default 5602; HTTP on PORT+1000),
# THREADS (default 2).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="$(realpath "${1:?usage: tools/bench-openai.sh MODEL [REQUESTS] [CONCURRENCY] [VOCAB]}")"
requests="${2:-64}" concurrency="${3:-8}" vocab="${4:-32000}"
bin="${NIBBLE_BIN:-$root/build/bin/nibble}"
port="${PORT:-5602}" http_port=$((${PORT:-5602} + 1000))
work="$(mktemp -d)"
gateway=""
cleanup() {
  [ -z "$gateway" ] || kill "$gateway" 2>/dev/null || true
  NIBBLE_BIN="$bin" "$root/deploy/stop-local.sh" --endpoint "tcp://127.0.0.1:$port" --run-dir "$work/run" \
    >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
cat > "$work/cluster.yaml" <<YAML
model: { path: "$model" }
parallel: { tensor: 1, pipeline: 1 }
threads: ${THREADS:-2}
server: { listen: "tcp://127.0.0.1:$port" }
kv_cache: { prefix_caching: false }
YAML
endpoint="$(NIBBLE_BIN="$bin" "$root/deploy/launch-local.sh" --config "$work/cluster.yaml" --timeout 300 \
  --run-dir "$work/run")"
"$bin" openai --endpoint "$endpoint" --port "$http_port" --threads "$concurrency" 2> "$work/openai.log" &
gateway=$!
for _ in $(seq 100); do grep -q listening "$work/openai.log" && break; sleep 0.1; done
workload=(--concurrency "$concurrency" --requests "$requests" --prompt-tokens 16:128 --max-tokens 16:64
  --vocab "$vocab" --seed 1 --timeout-ms 600000 --json)
run() { "$bin" bench-serve "$@" "${workload[@]}"; }
zmq1="$(run --endpoint "$endpoint")"
http="$(run --http "http://127.0.0.1:$http_port")"
zmq2="$(run --endpoint "$endpoint")"
python3 - "$zmq1" "$http" "$zmq2" <<'PY'
import json, sys
runs = [("zeromq", json.loads(sys.argv[1])), ("http", json.loads(sys.argv[2])), ("zeromq again", json.loads(sys.argv[3]))]
print("| path | ok | output tok/s | TTFT p50 / p90 ms | TPOT p50 ms | latency p50 ms |")
print("|---|---|---|---|---|---|")
for name, r in runs:
    print(f"| {name} | {r['ok']}/{r['requests']} | {r['output_tokens_per_second']:.1f} | "
          f"{r['ttft_ms']['p50']:.1f} / {r['ttft_ms']['p90']:.1f} | {r['tpot_ms']['p50']:.2f} | {r['latency_ms']['p50']:.1f} |")
zmq = [r for n, r in runs if n != "http"]
h = runs[1][1]
base = sum(r["output_tokens_per_second"] for r in zmq) / 2
ttft = sum(r["ttft_ms"]["p50"] for r in zmq) / 2
print(f"HTTP / ZeroMQ (mean of the two ZeroMQ runs): throughput {h['output_tokens_per_second'] / base:.3f}x, "
      f"TTFT p50 {h['ttft_ms']['p50'] / ttft:.3f}x")
sys.exit(0 if all(r["failed"] == 0 for _, r in runs) else 1)
PY
