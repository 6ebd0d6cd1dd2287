#!/usr/bin/env bash
# Runs, on the GPU machine and from the repository root, every test binary that
# scripts/build-gpu.sh put into gpu-bin/ (gpu-bin/test-*) under compute-sanitizer's memcheck
# (out-of-bounds and misaligned accesses, invalid frees, leaked device allocations), one test at
# a time; prints a summary and exits non-zero when any binary reported an error or failed.
# Extra arguments are passed to every test binary (a test-name filter).
#
#   scripts/memcheck-gpu.sh [FILTER]
#
# compute-sanitizer is looked up in $COMPUTE_SANITIZER, then /usr/local/cuda/bin, then PATH.
# The binaries run with MIXLORA_CUDA_NO_CACHE=1: the engine then gives every buffer its own
# driver allocation of the exact size and frees it when dropped, so memcheck sees each buffer's
# real bounds (a bucket's slack would hide an overrun) and lifetime (a cached block would hide a
# use after free), and --leak-check reports only buffers really left behind (the cache would
# otherwise show up as leaks). API errors are not reported (--report-api-errors no): a test
# provokes an out-of-memory error on purpose, and the engine turns every failed driver call into
# an error that fails its test anyway. Runs are ~10-100x slower than without the sanitizer.
set -uo pipefail
cd "$(dirname "$0")/.."

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

if ! ls gpu-bin/test-* >/dev/null 2>&1; then
    echo "gpu-bin/ has no test binaries: run scripts/build-gpu.sh on the build machine first" >&2
    exit 2
fi

logs=gpu-bin-memcheck
mkdir -p "$logs"
pass=()
fail=()
for bin in gpu-bin/test-*; do
    [ -x "$bin" ] || continue
    name=$(basename "$bin")
    log="$logs/$name.log"
    echo "===== memcheck $bin (log: $log)"
    start=$(date +%s)
    "$sanitizer" --tool memcheck --leak-check full --error-exitcode 1 \
        --report-api-errors no --print-limit 100 "$bin" --test-threads=1 "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    secs=$(($(date +%s) - start))
    summary=$(grep -E "ERROR SUMMARY|LEAK SUMMARY" "$log" | tail -n 2 | tr '\n' ' ')
    if [ "$rc" -eq 0 ]; then
        pass+=("$bin (${secs}s) ${summary}")
    else
        fail+=("$bin (exit $rc, ${secs}s) ${summary}")
    fi
done

echo
echo "===== memcheck summary: ${#pass[@]} clean, ${#fail[@]} with errors or failures"
for p in "${pass[@]}"; do echo "  ok    $p"; done
for f in "${fail[@]}"; do echo "  FAIL  $f"; done
[ ${#fail[@]} -eq 0 ]
