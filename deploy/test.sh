#!/usr/bin/env bash
# Every test on a fresh Debian machine: install what is needed, build with warnings as errors, run
# ctest. Fixture-based tests read ../shared/fixtures (override: NIBBLE_FIXTURES_DIR) and skip with a
# message when it is absent. llama.cpp's programs for the bench-spec peer test are built into
# ~/.cache/nibble/llama.cpp (NIBBLE_LLAMA_CPP_BIN overrides where tests look).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${NIBBLE_BUILD_DIR:-$root/build}"
bash "$root/deploy/install-deps.sh" --tests
fixtures=()
[ -n "${NIBBLE_FIXTURES_DIR:-}" ] && fixtures=(-DNIBBLE_FIXTURES_DIR="$NIBBLE_FIXTURES_DIR")
bash "$root/deploy/build.sh" -DNIBBLE_WERROR=ON "${fixtures[@]}"
# llama.cpp's speculative decoding, the peer that bench-spec's peer test runs (built once, from PyPI's
# llama-cpp-python source); without it that one test skips and says so.
bash "$root/tools/build-llama-cpp.sh" || echo "test: llama.cpp peer not built; CliTest.BenchSpecRunsLlamaCppSpeculativeDecodingAsItsPeer will skip"
# The Python peers the OpenAI-compatible API is tested with (the openai package, lm-evaluation-harness's
# API models), in a venv of their own; without them those two tests skip and say so.
venv="${NIBBLE_PYTHON_VENV:-$HOME/.cache/nibble/venv}"
if { [ -x "$venv/bin/python" ] || python3 -m venv "$venv"; } &&
  "$venv/bin/pip" install -q openai 'lm-eval[api]' >/dev/null 2>&1; then
  export NIBBLE_PYTHON="$venv/bin/python"
else
  echo "test: no venv with openai and lm-eval; OpenAiServer.TheOpenAiPythonPackageTalksToIt and" \
    "OpenAiServer.LmEvaluationHarnessScoresThroughIt will skip"
fi
ctest --test-dir "$build" --output-on-failure -j "$(nproc)" --timeout 900
