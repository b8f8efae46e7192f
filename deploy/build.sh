#!/usr/bin/env bash
# Configures and builds Nibble into ./build (or $NIBBLE_BUILD_DIR). Extra arguments go to CMake.
# NIBBLE_BUILD_TARGET=nibble builds only that target (default: everything, tests included).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${NIBBLE_BUILD_DIR:-$root/build}"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$root" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release "$@"
target=()
[ -n "${NIBBLE_BUILD_TARGET:-}" ] && target=(--target "$NIBBLE_BUILD_TARGET")
cmake --build "$build" -j "$(nproc)" "${target[@]}"
