#!/usr/bin/env bash
# Configures and builds Nibble into ./build (or $NIBBLE_BUILD_DIR). Extra arguments go to CMake.
# NIBBLE_BUILD_TARGET=nibble builds only that target (default: everything, tests included).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${NIBBLE_BUILD_DIR:-$root/build}"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
# CUTLASS's headers for the Hopper INT4 GEMM, when CUDA can be built (optional: without them that one
# kernel is left out and its tests skip).
if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  bash "$root/tools/fetch-cutlass.sh" || echo "build: CUTLASS not fetched; the Hopper INT4 GEMM is left out"
fi
cmake -S "$root" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release "$@"
target=()
[ -n "${NIBBLE_BUILD_TARGET:-}" ] && target=(--target "$NIBBLE_BUILD_TARGET")
cmake --build "$build" -j "$(nproc)" "${target[@]}"
