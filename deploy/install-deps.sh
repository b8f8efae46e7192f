#!/usr/bin/env bash
# Installs every Debian package Nibble's build needs; with --tests also what only the tests use (a
# real single-node Slurm with munge, for the batch-script test). Safe to run twice.
set -euo pipefail
with_tests=0
for arg in "$@"; do
  case "$arg" in
    --tests) with_tests=1 ;;
    *)
      echo "usage: $0 [--tests]" >&2
      exit 2
      ;;
  esac
done
packages=(
  build-essential cmake ninja-build pkg-config git python3 python3-yaml
  python3-pip  # `pip download` only: CUTLASS's headers and llama.cpp's source come from PyPI
  libgtest-dev libgmock-dev libbenchmark-dev
  libopenmpi-dev openmpi-bin
  libzmq3-dev cppzmq-dev
  capnproto libcapnp-dev
  libyaml-cpp-dev
  nlohmann-json3-dev libpcre2-dev libcli11-dev
  libcpp-httplib-dev  # `nibble openai`, the OpenAI-compatible HTTP gateway
  libeigen3-dev
  iproute2
  clang-format
)
[ "$with_tests" -eq 0 ] || packages+=(slurmctld slurmd slurm-client munge python3-venv)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install-deps: installed ${missing[*]}"
