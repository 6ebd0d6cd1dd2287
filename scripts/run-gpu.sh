#!/usr/bin/env bash
# Runs, on the GPU machine and from the repository root, every binary that scripts/build-gpu.sh
# put into gpu-bin/: test binaries one test at a time, then examples; prints a summary and
# exits non-zero when any failed. Extra arguments are passed to every test binary (a filter).
set -uo pipefail
cd "$(dirname "$0")/.."

export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export MIXLORA_CUDA_INCLUDE=${MIXLORA_CUDA_INCLUDE:-/usr/local/cuda/include}

if ! ls gpu-bin/* >/dev/null 2>&1; then
    echo "gpu-bin/ is empty: run scripts/build-gpu.sh on the build machine first" >&2
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

pass=()
fail=()
for bin in gpu-bin/test-* gpu-bin/example-*; do
    [ -x "$bin" ] || continue
    echo "===== $bin"
    start=$(date +%s.%N)
    case "$bin" in
        gpu-bin/test-*) "$bin" --test-threads=1 "$@" ;;
        *) "$bin" ;;
    esac
    rc=$?
    secs=$(echo "$(date +%s.%N) - $start" | bc 2>/dev/null || echo "?")
    if [ $rc -eq 0 ]; then
        pass+=("$bin (${secs}s)")
    else
        fail+=("$bin (exit $rc)")
    fi
done

echo
echo "===== summary: ${#pass[@]} passed, ${#fail[@]} failed"
for p in "${pass[@]}"; do echo "  ok    $p"; done
for f in "${fail[@]}"; do echo "  FAIL  $f"; done
[ ${#fail[@]} -eq 0 ]
