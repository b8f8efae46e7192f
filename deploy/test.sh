#!/usr/bin/env bash
# Every test on a fresh Debian machine: install what is needed, build with warnings as errors, run
# ctest. Fixture-based tests read ../shared/fixtures (override: NIBBLE_FIXTURES_DIR) and skip with a
# message when it is absent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${NIBBLE_BUILD_DIR:-$root/build}"
bash "$root/deploy/install-deps.sh" --tests
fixtures=()
[ -n "${NIBBLE_FIXTURES_DIR:-}" ] && fixtures=(-DNIBBLE_FIXTURES_DIR="$NIBBLE_FIXTURES_DIR")
bash "$root/deploy/build.sh" -DNIBBLE_WERROR=ON "${fixtures[@]}"
ctest --test-dir "$build" --output-on-failure -j "$(nproc)" --timeout 900
