#!/usr/bin/env bash
# Runs, on the GPU machine and from the repository root, every binary that scripts/dev/build-gpu.sh
# put into gpu-bin/: test binaries one test at a time, then examples; prints a summary and
# exits non-zero when any failed. Extra arguments are passed to every test binary (a filter).
#
#   scripts/dev/run-gpu.sh [--memcheck] [FILTER]
#
# --memcheck: afterwards, also run the test binaries under compute-sanitizer (memcheck-gpu.sh).
# Benches: gpu-bin/bench-moe_ffn writes $out/moe_ffn.json; gpu-bin/mixlora runs `bench table6`
# (with and without gradient checkpointing) into $out/table6*.json and the multi-adapter bench
# (scripts/dev/gpu-multi-adapter.sh) into $out/multi-adapter*.json.
# Examples get their arguments from the environment:
#   MIXLORA_GPU_MODEL  the SmolLM2-135M GGUF for example-cuda_train_speed (without it, the example
#                      runs SmolLM2-135M's shapes with random weights: the same speed)
#   MIXLORA_GPU_DATA   a small LLM-Adapters JSON file for example-cuda_train_parity (with the model)
#   MIXLORA_GPU_OUT    folder for the examples' JSON results (default gpu-results/)
set -uo pipefail
cd "$(dirname "$0")/../.."

memcheck=0
if [ "${1:-}" = "--memcheck" ]; then
    memcheck=1
    shift
fi
out=${MIXLORA_GPU_OUT:-gpu-results}
mkdir -p "$out"

export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export MIXLORA_CUDA_INCLUDE=${MIXLORA_CUDA_INCLUDE:-/usr/local/cuda/include}

. scripts/dev/gpu-unpack.sh
if ! ls gpu-bin/* >/dev/null 2>&1; then
    echo "gpu-bin/ is empty: run scripts/dev/build-gpu.sh on the build machine first" >&2
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# The trainer's runs: eval's inference path on the GPU against the CPU, then the paper's Table 6
# (LLaMA-2-7B shape, random bf16 weights, batch 8x512) without and with gradient checkpointing,
# then 1, 2 and 4 adapters trained together on one base against single runs (about 2 minutes);
# each part is timed. Every part runs; the status is non-zero when any failed.
trainer_runs() {
    local bin=$1 rc=0 t0
    t0=$(date +%s)
    scripts/dev/gpu-eval-parity.sh "$bin" "$out/eval-parity" || rc=1
    echo "-- eval parity: $(($(date +%s) - t0)) s"
    t0=$(date +%s)
    "$bin" bench table6 --json "$out/table6.json" | tee "$out/table6.md" || rc=1
    "$bin" bench table6 --gradient-checkpointing --json "$out/table6-checkpointing.json" |
        tee "$out/table6-checkpointing.md" || rc=1
    echo "-- table6: $(($(date +%s) - t0)) s"
    t0=$(date +%s)
    scripts/dev/gpu-multi-adapter.sh "$bin" "$out" || rc=1
    echo "-- multi-adapter: $(($(date +%s) - t0)) s"
    return $rc
}

pass=()
fail=()
for bin in gpu-bin/test-* gpu-bin/example-* gpu-bin/bench-* gpu-bin/mixlora; do
    [ -x "$bin" ] || continue
    echo "===== $bin"
    start=$(date +%s%N)
    case "$bin" in
        gpu-bin/test-*) "$bin" --test-threads=1 "$@" ;;
        gpu-bin/example-cuda_kernels) "$bin" --json "$out/cuda_kernels.json" | tee "$out/cuda_kernels.md" ;;
        gpu-bin/example-cuda_train_speed)
            if [ -n "${MIXLORA_GPU_MODEL:-}" ]; then model=("$MIXLORA_GPU_MODEL"); else model=(--random-smollm2); fi
            "$bin" "${model[@]}" --json "$out/cuda_train_speed.json" | tee "$out/cuda_train_speed.md"
            ;;
        gpu-bin/example-cuda_train_parity)
            if [ -n "${MIXLORA_GPU_MODEL:-}" ] && [ -n "${MIXLORA_GPU_DATA:-}" ]; then
                "$bin" "$MIXLORA_GPU_MODEL" "$MIXLORA_GPU_DATA" fused | tee "$out/cuda_train_parity.md" &&
                    "$bin" "$MIXLORA_GPU_MODEL" "$MIXLORA_GPU_DATA" naive | tee -a "$out/cuda_train_parity.md"
            else
                echo "skipping: set MIXLORA_GPU_MODEL and MIXLORA_GPU_DATA (an LLM-Adapters JSON file)"
                true
            fi
            ;;
        gpu-bin/bench-moe_ffn)
            MIXLORA_MOE_FFN_JSON="$out/moe_ffn.json" "$bin" --bench | tee "$out/moe_ffn.md"
            ;;
        gpu-bin/bench-*) "$bin" --bench ;;
        gpu-bin/mixlora) trainer_runs "$bin" ;;
        *) "$bin" ;;
    esac
    rc=${PIPESTATUS[0]}
    secs=$(awk -v d="$(($(date +%s%N) - start))" 'BEGIN { printf "%.1f", d / 1e9 }')
    if [ $rc -eq 0 ]; then
        pass+=("$bin (${secs}s)")
    else
        fail+=("$bin (exit $rc)")
    fi
done

if [ $memcheck -eq 1 ]; then
    echo "===== scripts/dev/memcheck-gpu.sh"
    if scripts/dev/memcheck-gpu.sh "$@"; then
        pass+=("memcheck")
    else
        fail+=("memcheck (see $out/memcheck/*.log)")
    fi
fi

echo
echo "===== summary: ${#pass[@]} passed, ${#fail[@]} failed (example results in $out/)"
for p in "${pass[@]}"; do echo "  ok    $p"; done
for f in "${fail[@]}"; do echo "  FAIL  $f"; done
[ ${#fail[@]} -eq 0 ]
