#!/usr/bin/env bash
# Builds llama.cpp's own speculative-decoding program (llama-speculative) and llama-bench, the peer of
# `nibble bench-spec --peer`, and llama-imatrix and llama-quantize (tests/data/llama-cpp-imatrix). The source is the llama.cpp tree vendored in llama-cpp-python's PyPI
# source archive (PyPI is reachable where Debian is; GitHub need not be). CPU backend, native ISA.
#   tools/build-llama-cpp.sh [DEST]     (default ~/.cache/nibble/llama.cpp; binaries in DEST/bin)
set -euo pipefail
version=0.3.36 # llama-cpp-python release whose vendored llama.cpp is built
dest=${1:-$HOME/.cache/nibble/llama.cpp}
tools=(llama-speculative llama-bench llama-imatrix llama-quantize)
if [ -x "$dest/bin/llama-speculative" ] && [ -x "$dest/bin/llama-bench" ] && [ -x "$dest/bin/llama-imatrix" ] &&
  [ -x "$dest/bin/llama-quantize" ]; then
  echo "build-llama-cpp: $dest/bin already holds ${tools[*]}"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --retries 1 --timeout 60 --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$work"
tar xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_CUDA=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DBUILD_SHARED_LIBS=OFF >"$work/configure.log"
ninja -C "$work/build" "${tools[@]}" >"$work/build.log"
mkdir -p "$dest/bin"
for tool in "${tools[@]}"; do cp "$work/build/bin/$tool" "$dest/bin/"; done
echo "llama-cpp-python $version (vendored llama.cpp)" >"$dest/VERSION"
echo "build-llama-cpp: built ${tools[*]} in $dest/bin"
