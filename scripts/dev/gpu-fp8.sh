#!/usr/bin/env bash
# On the GPU machine: the FP8 base (`--base-dtype fp8`) against the bf16 one, all in one call.
#  1. Table 6 (LLaMA-2-7B shape, 8×512, random weights): LoRA and fused MixLoRA in bf16, then on
#     the FP8 base; OUTDIR/table6.json is the bf16 report with `lora_fp8` and `mixlora_fused_fp8`
#     added (the schema of benches/results/table6-h200.json).
#  2. Unless MODEL is empty: STEPS (300) steps of the commonsense recipe on SmolLM2 (batch 16 in
#     micro-batches of 8, bf16, CUDA graphs, lr LR, default 1e-3) for each kind of KINDS
#     ("mixlora lora"; LoRA at r 86) and seed of SEEDS ("42 43 44"), on the dense and on the FP8
#     base, each adapter scored on the four valid sets with its own base. OUTDIR/fp8-smollm2.json:
#     per kind, per base, the mean ± std of the 4-task average over the seeds, and the largest
#     relative gap between the two bases' loss curves (means over windows of 20 steps, per seed).
#
#   scripts/dev/gpu-fp8.sh BIN MODEL.gguf DATA_DIR OUTDIR
#
# DATA_DIR holds {arc_e,arc_c,boolq,obqa}/{train,valid}.json. TABLE6=0 skips part 1; DEVICE
# (default cuda), SHAPE (table6's, default llama2-7b) and EVAL_LIMIT serve a dry run on the CPU.
set -uo pipefail
[ $# -ge 4 ] || {
    sed -n '2,18p' "$0" >&2
    exit 2
}
bin=$1
model=$2
data=$3
out=$4
device=${DEVICE:-cuda}
steps=${STEPS:-300}
lr=${LR:-1e-3}
kinds=${KINDS:-"mixlora lora"}
seeds=${SEEDS:-"42 43 44"}
mkdir -p "$out"

if [ "${TABLE6:-1}" != 0 ]; then
    for base in same fp8; do
        echo "== table6 base $base"
        "$bin" bench table6 --device "$device" --shape "${SHAPE:-llama2-7b}" \
            --variants lora,mixlora-fused --base-dtype "$base" \
            --json "$out/table6-$base.json" >"$out/table6-$base.log" 2>&1 ||
            { tail -3 "$out/table6-$base.log"; }
        tail -4 "$out/table6-$base.log"
    done
    python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
try:
    t = json.load(open(f"{out}/table6-same.json"))
    f = json.load(open(f"{out}/table6-fp8.json"))
except OSError as e:
    sys.exit(f"table6: {e}")
for k in ("lora_fp8", "mixlora_fused_fp8"):
    if k in f:
        t[k] = f[k]
t.pop("base_dtype", None)
json.dump(t, open(f"{out}/table6.json", "w"), indent=2)
print(json.dumps({k: t[k]["tokens_per_s"] for k in t if isinstance(t[k], dict) and "tokens_per_s" in t[k]}))
PY
fi

[ -n "$model" ] || exit 0
train_files=()
valid_files=()
for t in arc_e arc_c boolq obqa; do
    train_files+=(--data "$data/$t/train.json")
    valid_files+=(--data "$data/$t/valid.json")
done
limit=()
[ -n "${EVAL_LIMIT:-}" ] && limit=(--limit "$EVAL_LIMIT")
graphs=on
[ "$device" = cpu ] && graphs=eager
for kind in $kinds; do
    rank=16
    [ "$kind" = lora ] && rank=86
    for seed in $seeds; do
        for base in same fp8; do
            run="$out/$kind-$base-s$seed"
            [ -e "$run/eval.json" ] && continue
            echo "== $kind base $base seed $seed"
            "$bin" train --model "$model" "${train_files[@]}" --device "$device" --dtype bf16 \
                --base-dtype "$base" --adapter "$kind" --rank "$rank" --alpha $((2 * rank)) \
                --lr "$lr" --seed "$seed" --max-steps "$steps" --cuda-graphs "$graphs" \
                --eval-every 0 --save-every 0 --overwrite --out "$run" >"$run.log" 2>&1 ||
                { tail -3 "$run.log"; continue; }
            "$bin" eval --model "$model" "${valid_files[@]}" --device "$device" --dtype bf16 \
                --base-dtype "$base" --adapter "$run/adapter" "${limit[@]}" \
                --output "$run/eval.json" >"$run.eval.log" 2>&1 ||
                { tail -3 "$run.eval.log"; continue; }
            python3 -c 'import json,sys; print("average", json.load(open(sys.argv[1]))["average"])' "$run/eval.json"
        done
    done
done
python3 - "$out" "$kinds" "$seeds" <<'PY'
import json, statistics, sys
out, kinds, seeds = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
def losses(run):
    rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
    return [r["loss"] for r in rows if r.get("kind") == "train"]
def windows(l, w=20):
    return [sum(l[i:i + w]) / len(l[i:i + w]) for i in range(0, len(l), w)]
res = {}
for kind in kinds:
    res[kind] = {}
    gaps = []
    for base in ("same", "fp8"):
        avgs = []
        for s in seeds:
            try:
                avgs.append(100 * json.load(open(f"{out}/{kind}-{base}-s{s}/eval.json"))["average"])
            except (OSError, KeyError):
                pass
        res[kind][base] = {"avg": statistics.mean(avgs) if avgs else None,
                           "std": statistics.stdev(avgs) if len(avgs) > 1 else None,
                           "seeds": len(avgs)}
    for s in seeds:
        try:
            a, b = windows(losses(f"{out}/{kind}-same-s{s}")), windows(losses(f"{out}/{kind}-fp8-s{s}"))
        except OSError:
            continue
        gaps.append(max(abs(x - y) / x for x, y in zip(a, b)))
    res[kind]["max_loss_gap"] = max(gaps) if gaps else None
json.dump(res, open(f"{out}/fp8-smollm2.json", "w"), indent=2)
print(json.dumps(res))
PY
