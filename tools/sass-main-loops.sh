#!/usr/bin/env bash
# The main-loop instruction mix of the CUDA kernels in an object file or binary (tools/sass_main_loops.py),
# on a machine without a GPU. cuobjdump (and the nvdisasm it runs) come from the CUDA toolkit when it has
# them, else from NVIDIA's `nvidia-cuda-cuobjdump` and `nvidia-cuda-nvdisasm` wheels on PyPI, unpacked
# once into ~/.cache/nibble/cuda-tools.
#   bash tools/sass-main-loops.sh build-cuda/kernels/cuda/CMakeFiles/nibble_kernels_cuda.dir/w4a16_gemv_mma.cu.o [NAME]
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 OBJECT [FUNCTION_SUBSTRING]" >&2; exit 2; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cuobjdump="$(command -v cuobjdump || true)"
[ -n "$cuobjdump" ] || [ ! -x /usr/local/cuda/bin/cuobjdump ] || cuobjdump=/usr/local/cuda/bin/cuobjdump
if [ -z "$cuobjdump" ]; then
  cache="${HOME}/.cache/nibble/cuda-tools"  # cuobjdump -sass runs nvdisasm: both wheels
  cuobjdump="$(find "$cache" -name cuobjdump -type f 2>/dev/null | head -1 || true)"
  if [ -z "$cuobjdump" ]; then
    mkdir -p "$cache"
    python3 -m pip download --quiet --no-deps --dest "$cache" nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm >&2
    for wheel in "$cache"/*.whl; do (cd "$cache" && python3 -m zipfile -e "$wheel" .); done
    cuobjdump="$(find "$cache" -name cuobjdump -type f | head -1)"
    chmod +x "$cuobjdump" "$(dirname "$cuobjdump")/nvdisasm"
  fi
  export PATH="$(dirname "$cuobjdump"):$PATH"
fi
"$cuobjdump" -sass "$1" | python3 "$here/sass_main_loops.py" "${2:-}"
