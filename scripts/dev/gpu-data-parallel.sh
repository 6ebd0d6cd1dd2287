#!/usr/bin/env bash
# On a machine with several GPUs: data-parallel training (`mixlora train --gpus N`) against one
# GPU. Writes into OUTDIR:
#   1. losses-1gpu/, losses-2gpu/: 50 steps of fused MixLoRA on MODEL (bf16, batch 16 in
#      micro-batches of 4, so 2 ranks run 2 each) on 1 and 2 GPUs, and losses.json: both loss
#      lists and the largest relative difference (the CPU tests show bit identity; on GPUs the
#      atomics of index_add/scatter_add make even one GPU run-to-run different, so expect bf16
#      rounding-level differences, not identity);
#   2. scaling at the LLaMA-2-7B shape: `mixlora bench recipe --shape llama2-7b --gpus N` (random
#      bf16 weights of the shape, DATA's real lengths, cutoff 512, 8 sequences per GPU in one
#      micro-batch of 8 per GPU, so the per-GPU work is fixed) on 1, 2, 4, ... GPUs, and the same
#      with SmolLM2's weights through `mixlora train --gpus N` (8 rows = 2 micro-batches of 4 per
#      GPU; tokens/s from rank 0's metrics, median over steps 6..); rows {"model", "gpus",
#      "tokens_per_s", "scaling", "peak_gib"} into data-parallel-h200.json (what
#      benches/results/data-parallel-h200.json keeps);
#   3. table6-gpuK.json: `mixlora bench table6` run on every GPU at once (one process per GPU,
#      no communication): the per-GPU ceiling the data-parallel step is measured against.
# NCCL: cudarc opens `libnccl.so` (not `libnccl.so.2`); the script links it from NCCL_LIB (the
# folder holding libnccl.so.2, e.g. a pip `nvidia-nccl-cu13` install's nvidia/nccl/lib) when the
# folders on LD_LIBRARY_PATH lack it. NCCL_NVLS_ENABLE=0 is set by --gpus for its children.
#
#   scripts/dev/gpu-data-parallel.sh BIN MODEL DATA OUTDIR [MAX_GPUS]
#   (BIN: a mixlora built with --features cuda; MODEL: SmolLM2 GGUF; DATA: an LLM-Adapters JSON)
set -uo pipefail
[ $# -ge 4 ] || {
    sed -n '2,24p' "$0" >&2
    exit 2
}
bin=$1
model=$2
data=$3
out=$4
max=${5:-$(nvidia-smi -L | wc -l)}
mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export MIXLORA_CUDA_INCLUDE=${MIXLORA_CUDA_INCLUDE:-/usr/local/cuda/include}
if [ -n "${NCCL_LIB:-}" ] && [ ! -e "$NCCL_LIB/libnccl.so" ]; then
    mkdir -p "$out/nccl-lib"
    ln -sf "$NCCL_LIB/libnccl.so.2" "$out/nccl-lib/libnccl.so"
    export LD_LIBRARY_PATH=$out/nccl-lib:$NCCL_LIB:$LD_LIBRARY_PATH
fi
rc=0
train() { # NAME GPUS BATCH STEPS
    rm -rf "${out:?}/$1"
    "$bin" train --gpus "$2" --device cuda --dtype bf16 --model "$model" --data "$data" \
        --adapter mixlora --moe-impl fused --batch "$3" --micro-batch 4 --max-steps "$4" \
        --save-every 0 --eval-limit 8 --out "$out/$1" 2>&1 | tee "$out/$1.log" | tail -3
    return "${PIPESTATUS[0]}"
}

# 1. 2 GPUs against 1, the same global batch.
train losses-1gpu 1 16 50 || rc=1
train losses-2gpu 2 16 50 || rc=1
python3 - "$out" <<'PY' || rc=1
import json, sys
out = sys.argv[1]
def losses(d):
    return [json.loads(l)["loss"] for l in open(f"{out}/{d}/metrics.jsonl") if '"train"' in l]
a, b = losses("losses-1gpu"), losses("losses-2gpu")
worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
json.dump({"one_gpu": a, "two_gpus": b, "max_rel_diff": worst}, open(f"{out}/losses.json", "w"), indent=1)
print(f"2 GPUs vs 1: {len(a)} and {len(b)} steps, largest relative loss difference {worst:.2e}")
PY

# 2. Scaling with a fixed per-GPU batch: the 7B shape (bench recipe), then SmolLM2 (train).
n=1
while [ "$n" -le "$max" ]; do
    "$bin" bench recipe --gpus "$n" --device cuda --shape llama2-7b --model "$model" \
        --data "$data" --adapter mixlora --batch $((8 * n)) --micro-batch 8 --cutoff-len 512 \
        --warmup 3 --steps 10 --json "$out/recipe7b-${n}gpu.json" 2>&1 |
        tee "$out/recipe7b-${n}gpu.log" | tail -2
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    train "scale-${n}gpu" "$n" $((8 * n)) 20 || rc=1
    n=$((n * 2))
done
python3 - "$out" "$max" <<'PY' || rc=1
import json, re, statistics, sys
out, top = sys.argv[1], int(sys.argv[2])
rows, base, n = [], None, 1
while n <= top:
    r = json.load(open(f"{out}/recipe7b-{n}gpu.json"))
    base = base or r["tokens_per_s"]
    rows.append({"model": "llama2-7b-shape", "gpus": n, "tokens_per_s": r["tokens_per_s"],
                 "scaling": round(r["tokens_per_s"] / base, 3), "peak_gib": r["peak_gib"]})
    n *= 2
base, n = None, 1
while n <= top:
    d = f"{out}/scale-{n}gpu"
    steps = [json.loads(l) for l in open(f"{d}/metrics.jsonl") if '"train"' in l]
    tps = statistics.median(s["tokens_per_s"] for s in steps[5:])
    peak = re.findall(r"peak device memory: ([0-9.]+) GiB", open(f"{d}.log").read())
    base = base or tps
    rows.append({"model": "smollm2", "gpus": n, "tokens_per_s": round(tps, 1),
                 "scaling": round(tps / base, 3),
                 "peak_gib": float(peak[-1]) if peak else None})
    n *= 2
json.dump(rows, open(f"{out}/data-parallel-h200.json", "w"), indent=2)
for r in rows:
    print(r)
PY

# 3. Table 6 on every GPU at once (independent processes: the ceiling of perfect scaling).
pids=()
for ((g = 0; g < max; g++)); do
    CUDA_VISIBLE_DEVICES=$g "$bin" bench table6 --variants lora,mixlora-fused \
        --json "$out/table6-gpu$g.json" >"$out/table6-gpu$g.md" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
