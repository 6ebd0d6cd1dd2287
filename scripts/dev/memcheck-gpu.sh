#!/usr/bin/env bash
# Runs, on the GPU machine and from the repository root, every test binary that
# scripts/dev/build-gpu.sh put into gpu-bin/ (gpu-bin/test-*) under compute-sanitizer's memcheck
# (out-of-bounds and misaligned accesses, invalid frees, leaked device allocations), one test at
# a time; prints a summary and exits non-zero when any binary reported an error or failed.
# Extra arguments are passed to every test binary (a test-name filter). Logs go to
# $MIXLORA_GPU_OUT/memcheck/ (default gpu-results/memcheck/).
#
#   scripts/dev/memcheck-gpu.sh [FILTER]
#
# compute-sanitizer is looked up in $COMPUTE_SANITIZER, then /usr/local/cuda/bin, then PATH.
# The binaries run with MIXLORA_CUDA_NO_CACHE=1: the engine then gives every buffer its own
# driver allocation of the exact size and frees it when dropped, so memcheck sees each buffer's
# real bounds (a bucket's slack would hide an overrun) and lifetime (a cached block would hide a
# use after free), and --leak-check reports only buffers really left behind (the cache would
# otherwise show up as leaks). API errors are not reported (--report-api-errors no): a test
# provokes an out-of-memory error on purpose, and the engine turns every failed driver call into
# an error that fails its test anyway. Memory that cublasCreate allocates (the handle's
# workspace, ~64 MiB) lives as long as the process's handle and is reported as leaked at exit:
# those records are counted apart and do not fail the run; any other error does.
# Runs are ~10-100x slower than without the sanitizer.
set -uo pipefail
cd "$(dirname "$0")/../.."

export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export MIXLORA_CUDA_INCLUDE=${MIXLORA_CUDA_INCLUDE:-/usr/local/cuda/include}
export MIXLORA_CUDA_NO_CACHE=1

sanitizer=${COMPUTE_SANITIZER:-}
if [ -z "$sanitizer" ]; then
    if [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
        sanitizer=/usr/local/cuda/bin/compute-sanitizer
    else
        sanitizer=$(command -v compute-sanitizer || true)
    fi
fi
if [ -z "$sanitizer" ] || [ ! -x "$sanitizer" ]; then
    echo "memcheck-gpu.sh: compute-sanitizer not found (looked in \$COMPUTE_SANITIZER," \
        "/usr/local/cuda/bin and PATH); it ships with the CUDA toolkit (cuda-sanitizer package)" >&2
    exit 3
fi
"$sanitizer" --version | tail -n 1

. scripts/dev/gpu-unpack.sh
if ! ls gpu-bin/test-* >/dev/null 2>&1; then
    echo "gpu-bin/ has no test binaries: run scripts/dev/build-gpu.sh on the build machine first" >&2
    exit 2
fi

logs=${MIXLORA_GPU_OUT:-gpu-results}/memcheck
mkdir -p "$logs"
pass=()
fail=()
for bin in gpu-bin/test-*; do
    [ -x "$bin" ] || continue
    name=$(basename "$bin")
    log="$logs/$name.log"
    echo "===== memcheck $bin (log: $log)"
    start=$(date +%s)
    # A distinct exit code for "the sanitizer found something", apart from the tests' own 101.
    "$sanitizer" --tool memcheck --leak-check full --error-exitcode 86 \
        --report-api-errors no --print-limit 10000 "$bin" --test-threads=1 "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    secs=$(($(date +%s) - start))
    errors=$(grep -oE "ERROR SUMMARY: [0-9,]+" "$log" | tail -n 1 | grep -oE "[0-9,]+$" | tr -d ,)
    # Leak records whose allocation backtrace goes through libcublas (the handle's own memory).
    cublas=$(awk '
        /^========= Leaked/ { open = 1; cub = 0; next }
        open && /libcublas/ { cub = 1 }
        open && /^=========[[:space:]]*$/ { if (cub) n++; open = 0 }
        END { if (open && cub) n++; print n + 0 }' "$log")
    note="${errors:-?} sanitizer errors, ${cublas} of them cuBLAS handle memory"
    if grep -q "test result: FAILED" "$log" || ! grep -q "test result: ok" "$log"; then
        fail+=("$bin (tests failed, exit $rc, ${secs}s; $note)")
    elif [ "$rc" -eq 0 ] || { [ "$rc" -eq 86 ] && [ "${errors:-x}" = "$cublas" ]; }; then
        pass+=("$bin (${secs}s; $note)")
    else
        fail+=("$bin (exit $rc, ${secs}s; $note)")
    fi
done

echo
echo "===== memcheck summary: ${#pass[@]} clean, ${#fail[@]} with errors or failures"
for p in "${pass[@]}"; do echo "  ok    $p"; done
for f in "${fail[@]}"; do echo "  FAIL  $f"; done
[ ${#fail[@]} -eq 0 ]
