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
