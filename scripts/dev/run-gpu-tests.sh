#!/usr/bin/env bash
# Runs, on the GPU machine and from the repository root, only the test binaries that
# scripts/dev/build-gpu.sh put into gpu-bin/ (no benches, no training runs), all of them at once
# (each binary's tests one at a time), each under a time limit, for when GPU time is short. Writes
# one log per binary and a summary into OUTDIR, packs them into OUTDIR/test-logs.tar.gz (one file
# to bring back), prints the summary and exits non-zero when any binary failed or timed out.
#
#   scripts/dev/run-gpu-tests.sh OUTDIR [SECONDS_PER_BINARY] [FILTER]
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: run-gpu-tests.sh OUTDIR [SECONDS_PER_BINARY] [FILTER]}
limit=${2:-300}
shift $(($# >= 2 ? 2 : 1))
mkdir -p "$out/logs"

export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export MIXLORA_CUDA_INCLUDE=${MIXLORA_CUDA_INCLUDE:-/usr/local/cuda/include}
export NCCL_NVLS_ENABLE=0
# NCCL for the data-parallel tests: cudarc opens `libnccl.so`, which a pip install of NCCL (the
# machine's nvidia-nccl package) ships only as libnccl.so.2: link it into a folder of our own.
if [ -z "${NCCL_LIB:-}" ]; then
    NCCL_LIB=$(python3 -c 'import nvidia.nccl as n; print(list(n.__path__)[0] + "/lib")' 2>/dev/null || true)
fi
if [ -n "${NCCL_LIB:-}" ] && [ -e "$NCCL_LIB/libnccl.so.2" ]; then
    mkdir -p "$out/nccl-lib"
    ln -sf "$NCCL_LIB/libnccl.so.2" "$out/nccl-lib/libnccl.so"
    export LD_LIBRARY_PATH=$out/nccl-lib:$NCCL_LIB:$LD_LIBRARY_PATH
else
    echo "no libnccl.so.2 found (set NCCL_LIB): the data-parallel GPU test will skip" >&2
fi
. scripts/dev/gpu-unpack.sh
if ! ls gpu-bin/test-* >/dev/null 2>&1; then
    echo "gpu-bin/ has no test binaries: run scripts/dev/build-gpu.sh on the build machine first" >&2
    exit 2
fi
command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/logs/gpu.txt"

pids=()
names=()
for bin in gpu-bin/test-*; do
    name=$(basename "$bin")
    (
        start=$(date +%s)
        timeout "$limit" "$bin" --test-threads=1 "$@" >"$out/logs/$name.log" 2>&1
        echo "$? $(($(date +%s) - start))" >"$out/logs/$name.rc"
    ) &
    pids+=($!)
    names+=("$name")
done
wait "${pids[@]}"

{
    for name in "${names[@]}"; do
        read -r rc secs <"$out/logs/$name.rc"
        result=$(grep -h "^test result:" "$out/logs/$name.log" | tail -1)
        case $rc in
            0) echo "ok      $name (${secs}s) $result" ;;
            124) echo "TIMEOUT $name (after ${secs}s)" ;;
            *) echo "FAIL    $name (exit $rc, ${secs}s) $result" ;;
        esac
        grep -h -- "--- FAILED\|^---- .* stdout ----\|panicked at" "$out/logs/$name.log" | head -20 | sed 's/^/        /'
    done
    echo "skips printed by the tests:"
    grep -h -i "skipping\|skipped" "$out"/logs/*.log | sort | uniq -c | head -20
} | tee "$out/logs/summary.txt"
tar -czf "$out/test-logs.tar.gz" -C "$out" logs
! grep -q "^TIMEOUT\|^FAIL" "$out/logs/summary.txt"
