#!/usr/bin/env bash
# Packs what a lent GPU machine needs to run Nibble's CUDA tests and GPU benchmarks into .gpu/ at
# the repository root (git-ignored through .git/info/exclude): that machine has the CUDA toolkit,
# PyTorch and nvidia-smi but none of Nibble's other libraries (ZeroMQ, Cap'n Proto, yaml-cpp, Open
# MPI) and no network, so the binaries travel with every shared library they need that is not
# CUDA's own or the C runtime's.
#
#   bash tools/gpu-bundle.sh [BUILD_DIR]     # default build-cuda/, configured with -DNIBBLE_CUDA=ON
#   then, on the device machine (the session's device tool, carrying .gpu.tar.xz):
#     tar xJf .gpu.tar.xz && bash .gpu/run.sh
# The archive (xz -9e: about a quarter of the size) keeps the bundle, fixtures included, under the device tool's
# 64 MiB limit for everything it carries with the tree.
#
# run.sh runs every CUDA test binary and the MPI + GPU tests (with the bundled Open MPI), `nibble
# bench-gpu` (the kernel table, then end to end on the dummy llama-70b with the dummy llama-1b as
# draft) and tools/bench_tinygemm.py, writing the logs and JSON to $OUT (or .gpu/out) for
# docs/perf/gpu.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-$root/build-cuda}"
out="$root/.gpu"
# (through git, so that it also works in a worktree, whose .git is a file)
exclude="$(git -C "$root" rev-parse --path-format=absolute --git-path info/exclude)"
grep -qs '^/.gpu/' "$exclude" 2>/dev/null || { mkdir -p "$(dirname "$exclude")"; echo '/.gpu/' >>"$exclude"; }
grep -qs '^/.gpu.tar.xz' "$exclude" 2>/dev/null || echo '/.gpu.tar.xz' >>"$exclude"
[ -x "$build/bin/nibble" ] || { echo "gpu-bundle: $build/bin/nibble not found (configure with -DNIBBLE_CUDA=ON and build)" >&2; exit 1; }
# (the old archive too: a bundle that fails below must not leave the last one to be carried)
rm -rf "$out" "$root/.gpu.tar.xz"
mkdir -p "$out/bin" "$out/tests" "$out/lib"
cp "$build/bin/nibble" "$out/bin/"
# Hardware counters of the decode GEMVs (CUPTI; the device machine has no Nsight Compute): the tool, and
# the profiler's host libraries, which libcupti loads at run time (so ldd below does not see them).
if [ -x "$build/bin/nibble-kernel-metrics" ]; then
  cp "$build/bin/nibble-kernel-metrics" "$out/bin/"
  cupti="$(ldd "$build/bin/nibble-kernel-metrics" | awk '/libcupti/{print $3}')"
  for lib in libnvperf_host.so libnvperf_target.so; do
    [ -n "$cupti" ] && [ -f "$(dirname "$cupti")/$lib" ] && cp -L "$(dirname "$cupti")/$lib" "$out/lib/"
  done
fi
cp "$build"/tests/cuda/test_cuda_* "$out/tests/" 2>/dev/null || true
# The MPI + GPU tests, and Open MPI itself (the device machine has none): the launcher, libraries,
# plugins and help files of Debian's packages, mirrored under .gpu/mpi and relocated there by run.sh
# (OPAL_PREFIX, PMIX_PKG*DIR); about 6 MB of the archive.
cp "$build/tests/mpi/test_mpi_cuda_tensor_parallel" "$build/tests/test_serve" "$out/tests/" 2>/dev/null || true
mpi_packages="openmpi-bin libopenmpi3 openmpi-common libpmix2"
if dpkg -L $mpi_packages >/dev/null 2>&1; then
  dpkg -L $mpi_packages | grep -Ev '^/usr/share/(doc|man|lintian)/|/include/|\.a$|/pkgconfig/' |
    while read -r f; do
      if [ -f "$f" ] || [ -L "$f" ]; then mkdir -p "$out/mpi$(dirname "$f")" && cp -a "$f" "$out/mpi$f"; fi
    done
  ln -sf orterun "$out/mpi/usr/bin/mpirun"
else
  echo "gpu-bundle: Open MPI's packages ($mpi_packages) are not installed: the MPI + GPU tests will need an mpirun there" >&2
fi
find "$out/tests" -name '*.cmake' -delete
# Our executables without their symbol tables (a Release build has no debug sections; the symbols are
# ~10 MiB of 170 across the test binaries, which nothing on the device machine reads).
for f in "$out"/bin/* "$out"/tests/*; do
  if [ -f "$f" ] && head -c 4 "$f" | grep -q 'ELF'; then strip --strip-unneeded "$f"; fi
done
# Fixture models for test_cuda_llama_model's greedy comparisons (they skip without them), e.g.
# NIBBLE_BUNDLE_FIXTURES="tiny-llama-q4_0 tiny-llama-q8_0" (tiny-llama-f32 is 35 MB of the 64 MiB).
fixtures="${NIBBLE_FIXTURES:-$root/../shared/fixtures}"
if [ -n "${NIBBLE_BUNDLE_FIXTURES:-}" ]; then
  mkdir -p "$out/fixtures/models"
  cp "$fixtures/models/tiny-llama-q4_0.tokens" "$out/fixtures/models/"
  for m in $NIBBLE_BUNDLE_FIXTURES; do cp "$fixtures/models/$m.gguf" "$out/fixtures/models/"; done
fi
# Shared libraries: everything ldd resolves except the C/C++ runtime and CUDA's own libraries.
# Open MPI's own libraries and plugins resolve inside .gpu/mpi; their dependencies come here too.
{
  for f in "$out"/bin/* "$out"/tests/*; do ldd "$f"; done
  if [ -d "$out/mpi" ]; then
    find "$out/mpi" -type f \( -name '*.so*' -o -path '*/bin/*' \) -exec ldd {} \; 2>/dev/null || true
  fi
} | awk '/=> \//{print $3}' | sort -u |
  grep -Ev '/(libc|libm|libdl|librt|libpthread|libresolv|libutil|libnsl|libanl|libgcc_s|libstdc\+\+|ld-linux[^/]*)\.so|/libcu(da|dart|blas|blasLt)\.so|/libnccl\.so|/openmpi/lib/|/pmix2/lib/' |
  while read -r lib; do cp -L "$lib" "$out/lib/"; done
cat >"$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# On the GPU machine, from the repository root: CUDA tests, then the kernel and end-to-end benchmarks.
#   bash .gpu/run.sh [all|tests|bench]    (all: both, in that order)
#   bash .gpu/run.sh tests "test_cuda_a test_cuda_b"   (those CUDA test binaries, then the MPI + GPU tests)
#   bash .gpu/run.sh mpi                  (the MPI + GPU tests alone)
#   bash .gpu/run.sh kernels | e2e | e2e-more | e2e-cutlass   (bench's parts: the kernel table;
#                                         llama-70b on rows, with the layout measured and with CUTLASS,
#                                         then with LoRA adapters;
#                                         int8 activations, bench-spec, the CUDA-core baseline
#                                         and a Q8_0 KV cache;
#                                         llama-70b on CUTLASS's order alone)
#   bash .gpu/run.sh metrics              (nibble-kernel-metrics: the decode GEMVs' hardware counters)
#   bash .gpu/run.sh sanitize [TEST_BINARY [TOOL]]   (compute-sanitizer, memcheck by default)
#   bash .gpu/run.sh profile              (Nsight Compute on the W4A16 kernels: ncu.txt)
set -uo pipefail
phase="${1:-all}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-$here/out}"
mkdir -p "$out"
case "$phase" in
  all | tests | bench | mpi | kernels | e2e | e2e-more | e2e-cutlass | metrics | sanitize | profile) ;;
  *)
    echo "run.sh: unknown phase '$phase' (all, tests, bench, mpi, kernels, e2e, e2e-more, e2e-cutlass, metrics, sanitize, profile)" >&2
    exit 2
    ;;
esac
# A switch set earlier in this device call (a failed test binary, a kernel table that broke the device)
# is a file in $OUT: every later run.sh of the same call reads it back, so the feature stays off.
[ -f "$out/cutlass-disabled" ] && export NIBBLE_DISABLE_CUTLASS=1
[ -f "$out/half2-default-shape" ] && export NIBBLE_HALF2_DEFAULT_SHAPE=1
# What nibble reads: set to anything but 0.
cutlass_off() { [ -n "${NIBBLE_DISABLE_CUTLASS:-}" ] && [ "$NIBBLE_DISABLE_CUTLASS" != 0 ]; }
# Python (PyTorch) runs with the machine's own library path: the bundled Debian libraries (zlib, ...)
# are older than the image's and are for Nibble's binaries only.
python_ld="${LD_LIBRARY_PATH:-}"
export LD_LIBRARY_PATH="$here/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
# NCCL is not part of the CUDA toolkit and too big to carry (~200 MB): where the loader cannot find a
# library, look in the NVIDIA wheels PyPI's PyTorch brings (nvidia/*/lib: nvidia-nccl-cu13, ...),
# after everything else, so that the toolkit's own libraries keep precedence.
# (the output captured first: grep -q quitting early would fail ldd's write under pipefail)
if ldd "$here/bin/nibble" 2>&1 | grep -c "not found" >/dev/null; then
  for d in $(LD_LIBRARY_PATH="$python_ld" python3 -c 'import glob, os, sys
print(" ".join(sorted({os.path.dirname(p) for sp in sys.path if sp for p in glob.glob(os.path.join(sp, "nvidia", "*", "lib", "lib*.so*"))})))' 2>/dev/null); do
    LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"
  done
  if ldd "$here/bin/nibble" | grep "not found"; then echo "run.sh: the libraries above are missing"; fi
fi
# The tests that run the CLI use this nibble; the fixture tests read the bundled fixtures, if any.
export NIBBLE_BIN="$here/bin/nibble"
[ -d "$here/fixtures" ] && export NIBBLE_FIXTURES="$here/fixtures"
# tests/data of this checkout (the binaries were built elsewhere): the GPTQ / AWQ test checkpoints.
export NIBBLE_TEST_DATA_DIR="$(dirname "$here")/tests/data"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/device.txt"
status=0
if [ "$phase" = all ] || [ "$phase" = tests ]; then
# Each binary under a time limit: a device session has ~15 minutes in all, and a hung kernel must not
# take the benchmarks' share.
# The binaries of features with a switch (below) first, so that a failure there protects all the rest;
# then the kernels' own tests, and last the whole-model ones (the longest), so that a call cut short has
# tested the kernels. Every bundled test_cuda_* binary runs unless a list is given.
binaries=()
for t in "$here"/tests/test_cuda_w4a16_gemm_cutlass "$here"/tests/test_cuda_w4a16_gemv_half2 \
  $(ls "$here"/tests/test_cuda_* | grep -v -e llama_model -e tensor_parallel -e speculative_engine) \
  "$here"/tests/test_cuda_*; do
  case " ${binaries[*]-} " in *" $t "*) ;; *) [ -x "$t" ] && binaries+=("$t") ;; esac
done
if [ -n "${2:-}" ]; then binaries=(); for name in $2; do binaries+=("$here/tests/$name"); done; fi
for t in "${binaries[@]}"; do
  limit=120
  case "$t" in
    *test_cuda_llama_model) limit=240 ;;  # CPU references of every scenario and fixture
    *test_cuda_w4a16_gemm_cutlass) limit=60 ;;  # new on a GPU: a hang must cost little (NIBBLE_DISABLE_CUTLASS=1 then)
  esac
  if [ ! -x "$t" ]; then  # a name in the list that was not bundled: not a failure of its feature
    echo "run.sh: $(basename "$t") is not in the bundle" | tee -a "$out/cuda-tests.log"
    status=1
    continue
  fi
  # Not --gtest_brief: a binary killed by the limit must show which test it was in ([ RUN ] lines).
  timeout -k 10 "$limit" "$t" 2>&1 | tee -a "$out/cuda-tests.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || status=1
  # A failed, hung (124) or crashed (>= 128) binary of a feature with a switch may have left the device
  # unusable for every later test and benchmark of this call: switch the feature off for them, and say
  # so in a file the next call's command can be chosen by (prefix it with the same variable). The CUTLASS
  # GEMM (w4a16_gemm_cutlass.cuh), and the half2 GEMV's block shapes, which every measured load of a
  # group-128 model times (w4a16_gemv_half2.cuh: the default shape alone then).
  if [ "$rc" -ne 0 ]; then
    switch=""
    case "$t" in
      *test_cuda_w4a16_gemm_cutlass) switch="NIBBLE_DISABLE_CUTLASS cutlass-disabled" ;;
      *test_cuda_w4a16_gemv_half2) switch="NIBBLE_HALF2_DEFAULT_SHAPE half2-default-shape" ;;
    esac
    if [ -n "$switch" ]; then
      read -r variable file <<<"$switch"
      export "$variable=1"
      echo "exit $rc" > "$out/$file"
      echo "run.sh: $(basename "$t") failed (exit $rc); $variable=1 from here on" | tee -a "$out/cuda-tests.log"
    fi
  fi
done
fi
if [ "$phase" = all ] || [ "$phase" = tests ] || [ "$phase" = mpi ]; then
# Tensor parallelism across processes and `nibble serve` on the GPU need mpirun: the machine's own,
# else the bundled Open MPI, relocated (its configuration file lives outside its prefix, so it is
# named: it keeps the UCX and libfabric transports out, as Debian's does).
# An mpirun that starts: the H200 machine's /usr/bin/mpirun fails to load its PMIx plugin
# ("undefined symbol: PMIx_Info_create"), so being on the path is not enough.
have_mpirun() { command -v mpirun >/dev/null && timeout 30 mpirun --allow-run-as-root -np 1 true >/dev/null 2>&1; }
if ! have_mpirun && [ -x "$here/mpi/usr/bin/orterun" ]; then
  pmix="$here/mpi/usr/lib/x86_64-linux-gnu/pmix2"
  export OPAL_PREFIX="$here/mpi/usr" PMIX_PKGLIBDIR="$pmix/lib/pmix" PMIX_PKGDATADIR="$pmix/share/pmix" \
    OMPI_MCA_mca_base_param_files="$here/mpi/etc/openmpi/openmpi-mca-params.conf" PATH="$here/mpi/usr/bin:$PATH"
fi
if have_mpirun; then
  export NIBBLE_MPIEXEC="$(command -v mpirun)"  # test_serve's jobs (its built-in path is the build machine's)
  timeout 120 mpirun --allow-run-as-root --oversubscribe -np 2 "$here/tests/test_mpi_cuda_tensor_parallel" --gtest_brief=1 2>&1 |
    tee -a "$out/cuda-tests.log" || status=1
  timeout 180 "$here/tests/test_serve" --gtest_brief=1 --gtest_filter='Serve.Cuda*' 2>&1 | tee -a "$out/cuda-tests.log" || status=1
else
  echo "skipped test_mpi_cuda_tensor_parallel and test_serve --gtest_filter='Serve.Cuda*': no mpirun on this machine" |
    tee -a "$out/cuda-tests.log"
fi
fi
# When a kernel test fails: its binary again under compute-sanitizer (memcheck, or the tool the third
# argument names: racecheck, synccheck, initcheck), e.g. `run.sh sanitize test_cuda_w4a16_gemv racecheck`.
if [ "$phase" = sanitize ]; then
  sanitizer="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
  for t in "$here"/tests/${2:-test_cuda_*}; do
    timeout 500 "$sanitizer" --tool "${3:-memcheck}" --error-exitcode 1 "$t" --gtest_brief=1 2>&1 |
      tee -a "$out/sanitizer.log" || status=1
  done
fi
# Nsight Compute's view of the decode kernels on llama-70b's 8192 x 8192 matrix (speed of light,
# occupancy, warp stalls, memory): why the tensor-core GEMV stays at ~28% of copy bandwidth from 1 to
# 16 rows, the CUDA-core GEMV at one row, and the mma GEMM at 64. Each kernel once, as bench-gpu
# launches it (the first launch matching the name: Q4_0 for the CUDA-core GEMV).
if [ "$phase" = profile ]; then
  ncu="$(command -v ncu || echo /usr/local/cuda/bin/ncu)"
  sections=(--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis)
  for spec in "gemv_int4_groups_mma_kernel 1" "gemv_int4_groups_mma_kernel 16" "gemv_w4a16_kernel 1" \
    "gemm_int4_groups_mma_kernel 64"; do
    set -- $spec
    echo "=== $1, $2 rows" | tee -a "$out/ncu.txt"
    timeout 120 "$ncu" --kernel-name "$1" --launch-count 1 "${sections[@]}" "$here/bin/nibble" bench-gpu \
      --shapes 8192x8192 --rows "$2" --iterations 1 --repetitions 1 2>&1 | tee -a "$out/ncu.txt" || status=1
  done
fi
if [ "$phase" = all ] || [ "$phase" = metrics ]; then
# Hardware counters (CUPTI's range profiler) of each decode GEMV at 1 and 16 rows on llama-70b's two
# largest shapes: DRAM throughput, issue activity, warps a scheduler, stall reasons. Needs permission
# to read the counters (root does).
if [ -x "$here/bin/nibble-kernel-metrics" ]; then
  timeout -k 10 150 "$here/bin/nibble-kernel-metrics" 2>&1 | tee "$out/kernel-metrics.txt" || status=1
else
  echo "run.sh: nibble-kernel-metrics not bundled (no CUPTI where it was built)" | tee "$out/kernel-metrics.txt"
fi
fi
if [ "$phase" = all ] || [ "$phase" = bench ] || [ "$phase" = kernels ]; then
# tinygemm at group 128 (4.25 bits a weight, its usual GPTQ / AWQ setting): the grouping of bench-gpu's
# g128 column, and fewer bytes than Q4_0's 4.5 bits, so the harder comparison for the Q4_0 column.
rm -f "$out/tinygemm.json" "$out/torch-attention.json"  # a peer's figures from this run only
LD_LIBRARY_PATH="$python_ld" timeout 120 python3 "$(dirname "$here")/tools/bench_tinygemm.py" --group-size 128 --out "$out/tinygemm.json" 2>"$out/tinygemm.log" ||
  echo "tinygemm failed: $(tail -3 "$out/tinygemm.log")"
# PyTorch's attention (scaled_dot_product_attention) on the attention tables' cases: their peer.
LD_LIBRARY_PATH="$python_ld" timeout 60 python3 "$(dirname "$here")/tools/bench_torch_attention.py" \
  --out "$out/torch-attention.json" 2>"$out/torch-attention.log" ||
  echo "torch attention failed: $(tail -3 "$out/torch-attention.log")"
tg=(); [ -s "$out/tinygemm.json" ] && tg=(--tinygemm "$out/tinygemm.json")
[ -s "$out/torch-attention.json" ] && tg+=(--torch-attention "$out/torch-attention.json")
# ${tg[@]+...}: an empty array under set -u (bash before 4.4 calls it unbound).
# NIBBLE_TABLE_FLAGS: more bench-gpu flags for the kernel table (e.g. "--attention-prompts none", should
# call 1 have shown the tensor-core prefill attention failing or hanging).
table_flags=(${NIBBLE_TABLE_FLAGS:-})
timeout -k 10 240 "$here/bin/nibble" bench-gpu ${tg[@]+"${tg[@]}"} ${table_flags[@]+"${table_flags[@]}"} 2>&1 |
  tee "$out/bench-gpu.txt"
table_rc=${PIPESTATUS[0]}
[ "$table_rc" -eq 0 ] || status=1
# A column's kernel that fails leaves '-' (the table goes on); one that breaks the device ends the
# table early (exit 1, the rows so far printed; or no footer, killed): then once more without the
# CUTLASS columns, the kernels new on this GPU, and CUTLASS stays off for the rest of this call. The
# attention tables come after the footer (written out before they start): whatever ends the run
# there (its failure, exit 3, a crash or a kill) leaves the W4A16 tables whole and is no reason to run
# them again. A W4A16 failure prints the footer too, then "GPU benchmark failed after".
table_broke=0
grep -q "W4A16 = GGUF" "$out/bench-gpu.txt" || table_broke=1
grep -q "GPU benchmark failed after" "$out/bench-gpu.txt" && table_broke=1
if grep -q "tinygemm figures: \|torch attention figures: " "$out/bench-gpu.txt"; then
  # A peer's file was refused before anything was measured: once more without the peers' figures.
  echo "run.sh: the kernel table refused a peer's figures; again without --tinygemm / --torch-attention" |
    tee -a "$out/bench-gpu.txt"
  timeout -k 10 240 "$here/bin/nibble" bench-gpu ${table_flags[@]+"${table_flags[@]}"} 2>&1 |
    tee -a "$out/bench-gpu.txt" || status=1
elif [ "$table_broke" -eq 1 ] && ! cutlass_off; then
  echo "run.sh: the kernel table ended early (exit $table_rc); again with NIBBLE_DISABLE_CUTLASS=1" |
    tee "$out/bench-gpu-no-cutlass.txt"
  export NIBBLE_DISABLE_CUTLASS=1
  echo "kernel table exit $table_rc" >"$out/cutlass-disabled"
  timeout -k 10 200 "$here/bin/nibble" bench-gpu ${tg[@]+"${tg[@]}"} ${table_flags[@]+"${table_flags[@]}"} 2>&1 |
    tee -a "$out/bench-gpu-no-cutlass.txt" || status=1
fi
fi
if [ "$phase" = all ] || [ "$phase" = bench ] || [ "$phase" = e2e ]; then
# End to end on dummy models (random weights made on the GPU, INT4 at group 128: no files to carry), for
# docs/perf/gpu.md. Short runs (16 timed steps, median of 3) so that the first two fit beside the kernel
# table in one device call; every figure also reaches stderr (and the file) as it is measured. In
# order of what they tell: the INT4 kernels timed and chosen at load on the row-major layout, then with
# the layout measured per shape at load (rows, tiles: kernels/int4_tiles.hpp, the batch-1 decode bet,
# and CUTLASS's order; the load prints each layout's decode time), then with CUTLASS's Hopper GEMMs as
# candidates (prefill and decode; a second copy of the weights, ~35 GB more: on a GPU with less than
# 120 GB, an H100, the one-copy layout that runs every product on CUTLASS instead), last four LoRA
# adapters against the base (skipped when the first run failed: its fallback runs then). Phase e2e-more:
# speculative decoding with the fixtures' pair, batch-1 decode with 8-bit activations (the W4A8 GEMV),
# the baseline on the CUDA-core GEMV and WMMA GEMM alone with the 1B draft's step times, and a Q8_0 KV
# cache. Phase
# e2e-cutlass: llama-70b on CUTLASS's order alone.
# NIBBLE_E2E_FLAGS: more bench-gpu flags for every end-to-end run (e.g. --unfused-epilogues, should
# call 1 show the fused epilogues failing).
e2e=(--gen-tokens 16 --repetitions 3 --prompt-tokens 256 --prefill-batch 4 ${NIBBLE_E2E_FLAGS:-})
# (with the 1B draft: its step times, and the target's verification passes for speculative decoding's
# projected speedup at batch 1; and a 2048-token prompt's prefill with its attention on the CUDA cores
# and on the tensor cores)
timeout 170 "$here/bin/nibble" bench-gpu --model dummy:llama-70b --draft dummy:llama-1b --batch 1,8,32,64 \
  --long-prompt-tokens 2048 "${e2e[@]}" 2>&1 | tee "$out/bench-gpu-e2e.txt"
e2e_rc=${PIPESTATUS[0]}
[ "$e2e_rc" -eq 0 ] || status=1
# A Q4_K_M GGUF (the bundled fixture): the load-time table times its Q4_K and Q6_K matrices' one-row
# GEMVs (Q6_K: the CUDA-core GEMV against the half2 one on planes), then batch-1 decode.
q4km="$here/fixtures/models/small-llama-q4_k_m.gguf"
if [ -f "$q4km" ]; then
  timeout 60 "$here/bin/nibble" bench-gpu --model "$q4km" --batch 1 --gen-tokens 16 --repetitions 3 \
    --prompt-tokens 64 2>&1 | tee "$out/bench-gpu-q4_k_m.txt" || status=1
fi
# Batch 1 with every one-row product pinned to the half2 GEMV on its default block shape (so every
# fused epilogue runs, whatever the load-time timing would pick): against the run above, whose
# load-time table says which fusions and shapes it kept.
timeout 90 "$here/bin/nibble" bench-gpu --model dummy:llama-70b --int4-kernels half2 --batch 1 "${e2e[@]}" 2>&1 |
  tee "$out/bench-gpu-e2e-half2.txt" || status=1
timeout 150 "$here/bin/nibble" bench-gpu --model dummy:llama-70b --int4-layout measured --batch 1,8,32,64 "${e2e[@]}" 2>&1 |
  tee "$out/bench-gpu-e2e-measured.txt" || status=1
gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
case "$gpu_mib" in '' | *[!0-9]*) gpu_mib=0 ;; esac  # nothing, or [N/A]: the one-copy layout
if [ "$gpu_mib" -ge 120000 ]; then cutlass=(--cutlass-gemm); else cutlass=(--int4-layout cutlass); fi
if cutlass_off; then
  echo "run.sh: llama-70b on CUTLASS skipped: CUTLASS is switched off in this call" | tee "$out/bench-gpu-e2e-cutlass.txt"
else
  timeout 150 "$here/bin/nibble" bench-gpu --model dummy:llama-70b "${cutlass[@]}" --batch 1,8,32,64 "${e2e[@]}" 2>&1 |
    tee "$out/bench-gpu-e2e-cutlass.txt" || status=1
fi
# The first llama-70b run failed (a kernel new on this GPU faulting while the load times every
# candidate takes the process with it): last, once more on the kernels that ran in the second session
# (the CUDA-core GEMV, the WMMA GEMM; nothing timed), so that the call still brings a figure back.
if [ "$e2e_rc" -ne 0 ]; then
  echo "run.sh: llama-70b failed (exit $e2e_rc); again on --int4-kernels cuda-cores" | tee "$out/bench-gpu-e2e-fallback.txt"
  timeout 120 "$here/bin/nibble" bench-gpu --model dummy:llama-70b --int4-kernels cuda-cores --batch 1,8,32,64 \
    "${e2e[@]}" 2>&1 | tee -a "$out/bench-gpu-e2e-fallback.txt" || status=1
else
  # Last of the phase (a call cut short loses it first): four rank-16 LoRA adapters on every layer's
  # seven matrices, sequence s naming adapter s % 4 + 1 (vLLM's multi-LoRA serving; batch 1 has one):
  # decode steps, a prompt's prefill and a batch-1 step profile against the base's in the same run.
  timeout 120 "$here/bin/nibble" bench-gpu --model dummy:llama-70b --lora-rank 16 --lora-adapters 4 --batch 1,8,32 \
    "${e2e[@]}" 2>&1 | tee "$out/bench-gpu-e2e-lora.txt" || status=1
fi
fi
if [ "$phase" = e2e-cutlass ]; then
e2e=(--gen-tokens 16 --repetitions 3 --prompt-tokens 256 --prefill-batch 4 ${NIBBLE_E2E_FLAGS:-})
timeout 150 "$here/bin/nibble" bench-gpu --model dummy:llama-70b --int4-layout cutlass --batch 1,8,32,64 "${e2e[@]}" 2>&1 |
  tee "$out/bench-gpu-e2e-cutlass-layout.txt" || status=1
fi
if [ "$phase" = all ] || [ "$phase" = bench ] || [ "$phase" = e2e-more ]; then
e2e=(--gen-tokens 16 --repetitions 3 --prompt-tokens 256 --prefill-batch 4 ${NIBBLE_E2E_FLAGS:-})
# Speculative decoding end to end on the GPU with the fixtures' trained pair (when bundled: add
# fortune-target-f16 to NIBBLE_BUNDLE_FIXTURES); its Q4_0 draft is made here by the quantizer.
target="$here/fixtures/models/fortune-target-f16.gguf"
if [ -f "$target" ]; then
  timeout 60 "$here/bin/nibble" quantize -m "$target" -o "$here/fortune-target-q4_0.gguf" --type q4_0 --pure \
    >"$out/quantize.log" 2>&1 &&
    timeout 60 "$here/bin/nibble" bench-spec --device cuda --model "$target" --draft "$here/fortune-target-q4_0.gguf" \
      --batch 1,8,32 --gen-tokens 128 --repetitions 3 2>&1 | tee "$out/bench-spec-gpu.txt" || status=1
else
  echo "run.sh: bench-spec skipped: fortune-target-f16 is not bundled (NIBBLE_BUNDLE_FIXTURES)" | tee "$out/bench-spec-gpu.txt"
fi
# Batch-1 decode with 8-bit activations on dp4a (int8_activations: the one-row products on the W4A8 GEMV).
timeout 120 "$here/bin/nibble" bench-gpu --model dummy:llama-70b --int8-activations --batch 1,8 "${e2e[@]}" 2>&1 |
  tee "$out/bench-gpu-e2e-int8.txt" || status=1
timeout 90 "$here/bin/nibble" bench-gpu --model dummy:llama-70b --draft dummy:llama-1b --batch 1,8 --int4-kernels cuda-cores "${e2e[@]}" 2>&1 |
  tee "$out/bench-gpu-e2e-cuda-cores.txt" || status=1
# A Q8_0 KV cache (kernels/cuda/kv_cache_quant: blocks dequantized into an fp16 working copy each layer,
# llama.cpp's rotation): what it costs a step against the e2e run's fp16 cache, and its device bytes.
timeout 120 "$here/bin/nibble" bench-gpu --model dummy:llama-70b --kv-cache-dtype q8_0 --batch 1,8,64 "${e2e[@]}" 2>&1 |
  tee "$out/bench-gpu-e2e-kv-q8_0.txt" || status=1
fi
exit $status
RUN
chmod +x "$out/run.sh"
# xz -9e with a 256 MiB dictionary: it spans all the test binaries, which share most of their code (58
# MiB at the default level and 45 at -9e's 64 MiB dictionary in the ninth session; 46.5 -> 40.5 MB with
# 256 MiB in the twenty-eighth, before stripping; ~3 minutes here on one thread, ~2.5 GB of memory;
# decompressing takes 256 MiB and is as fast as before).
XZ_OPT="-T1 --lzma2=preset=9e,dict=256MiB" tar -C "$root" -cJf "$root/.gpu.tar.xz" .gpu
du -sh "$out" "$root/.gpu.tar.xz" | awk '{printf "gpu-bundle: %s in %s\n", $1, $2}'
# The device tool carries at most 64 MiB with the tree (tracked and untracked, not ignored, files: ~13 MiB
# by the twenty-sixth session, most of it tests/data): archive and tree together must leave 1 MiB.
archive_bytes=$(stat -c %s "$root/.gpu.tar.xz")
tree_bytes=$(cd "$root" && git ls-files -z --cached --others --exclude-standard |
  xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
total_mib=$(( (archive_bytes + tree_bytes) >> 20 ))
echo "gpu-bundle: archive $(( archive_bytes >> 20 )) MiB + tree $(( tree_bytes >> 20 )) MiB = ${total_mib} MiB of the device tool's 64"
if [ "$total_mib" -gt 63 ]; then
  rm -f "$root/.gpu.tar.xz"
  echo "gpu-bundle: ${total_mib} MiB with the tree would pass the device tool's 64 MiB (bundle fewer fixtures: NIBBLE_BUNDLE_FIXTURES)" >&2
  exit 1
fi
echo "gpu-bundle: device tool: carry [\".gpu.tar.xz\"], command \"tar xJf .gpu.tar.xz && bash .gpu/run.sh tests ...\" (docs/perf/gpu.md: the two device calls; a whole run.sh passes one call's 600 s)"
