#!/usr/bin/env bash
# Unpacks CUTLASS's C++ headers (include/ and tools/util/include/) from NVIDIA's nvidia-cutlass wheel
# on PyPI, for the Hopper INT4 GEMM (kernels/cuda/w4a16_gemm_cutlass.cu). Debian has no CUTLASS
# package; the wheel carries the same headers as CUTLASS's GitHub release. Header-only: nothing is
# built here. CMake finds DEST by default (NIBBLE_CUTLASS_DIR overrides).
#   tools/fetch-cutlass.sh [DEST]     (default ~/.cache/nibble/cutlass-4.2.0.0)
set -euo pipefail
version=4.2.0.0
dest=${1:-$HOME/.cache/nibble/cutlass-$version}
if [ -f "$dest/include/cutlass/version.h" ] && [ -f "$dest/tools/util/include/cutlass/util/mixed_dtype_utils.hpp" ]; then
  echo "fetch-cutlass: $dest already holds CUTLASS $version"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --retries 1 --timeout 60 --no-deps "nvidia-cutlass==$version" -d "$work"
python3 - "$work"/nvidia_cutlass-"$version"-*.whl "$work/unpacked" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    members = [n for n in wheel.namelist()
               if n.startswith(("cutlass_library/source/include/", "cutlass_library/source/tools/util/include/"))]
    wheel.extractall(sys.argv[2], members)
PY
mkdir -p "$dest"
cp -r "$work/unpacked/cutlass_library/source/include" "$dest/"
mkdir -p "$dest/tools/util"
cp -r "$work/unpacked/cutlass_library/source/tools/util/include" "$dest/tools/util/"
echo "nvidia-cutlass $version (PyPI wheel)" >"$dest/VERSION"
echo "fetch-cutlass: unpacked CUTLASS $version headers into $dest"
