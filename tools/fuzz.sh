#!/usr/bin/env bash
# Fuzzes the readers of untrusted input (GGUF models, safetensors, the client and worker protocols,
# cluster configs, tokenizers) with libFuzzer, ASan and UBSan: builds build-fuzz with clang, writes
# each target's seeds (tests/fuzz/fuzz_targets.cpp) into a corpus, and runs every target, or the
# ones named, for SECONDS each. A finding is written to build-fuzz/findings/<target>/; once fixed,
# keep the input under tests/fuzz/found/<target>/ (test_fuzz_targets replays it in every build).
#   tools/fuzz.sh [SECONDS] [TARGET ...]      (default 60 seconds, every target)
set -euo pipefail
if ! command -v clang++ >/dev/null; then
  echo "fuzz: needs clang and its sanitizer runtime: apt-get install -y clang libclang-rt-dev" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
build=${NIBBLE_FUZZ_BUILD:-$root/build-fuzz}
seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(gguf_model gguf_split safetensors client_protocol worker_protocol cluster_config tokenizer_text hf_tokenizer hf_config imatrix openai_request json_output json_schema tool_calls grammar lora_adapter)
fi
CC=clang CXX=clang++ cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DNIBBLE_CUDA=OFF -DNIBBLE_FUZZ=ON >/dev/null
ninja -C "$build" fuzz_write_seeds "${targets[@]/#/fuzz_}"
"$build/tests/fuzz_write_seeds" "$build/seeds" >/dev/null
status=0
for target in "${targets[@]}"; do
  corpus="$build/corpus/$target"
  findings="$build/findings/$target"
  mkdir -p "$corpus" "$findings"
  echo "== $target: ${seconds}s"
  max_len=131072
  [ "$target" = gguf_model ] && max_len=524288  # its Q4_K and Q5_K_M seeds are ~0.4-0.5 MB (rows of 256)
  # -rss_limit_mb: a reader must refuse a size it cannot hold, not try to allocate it.
  if ! "$build/tests/fuzz_$target" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
    -max_len="$max_len" -print_final_stats=1 -artifact_prefix="$findings/" "$corpus" "$build/seeds/$target" \
    2>"$build/fuzz-$target.log"; then
    status=1
    echo "   FOUND: $(ls "$findings" | head -3) (log: $build/fuzz-$target.log)"
  fi
  grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb' "$build/fuzz-$target.log" | sed 's/^/   /' || true
done
exit $status
