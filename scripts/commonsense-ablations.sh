#!/usr/bin/env bash
# Short ablations of the multi-task experiment (scripts/commonsense.sh): one seed, EPOCHS epochs
# (default 1), each variant trained on the mixture of the four commonsense tasks and evaluated on
# their valid.json (never on anything else). Results land in $OUT (default runs/ablations), one
# folder per variant (eval.json, train.log, metrics.jsonl; routing.json for MixLoRA), and a line per
# variant in $OUT/summary.tsv (average and per-task accuracy, seconds).
#
#   scripts/commonsense-ablations.sh MODEL.gguf DATA_DIR [VARIANT...] [-- extra train flags]
#
# Without variants, all of them run, in this order:
#   mixlora          the default MixLoRA (E=8, top-2, r=16, lr 2e-4, aux 0.001, router init 0.02)
#   lora86           the parameter-matched LoRA (r=86, all seven projections)
#   lora16           LoRA r=16 on all seven projections (attention capacity of MixLoRA)
#   mixlora-lr5e-4   MixLoRA at lr 5e-4
#   mixlora-lr1e-3   MixLoRA at lr 1e-3
#   mixlora-aux0.01  MixLoRA with aux-loss coefficient 0.01
#   mixlora-aux0     MixLoRA without the aux loss
#   mixlora-init0.2  MixLoRA with the router initialised N(0, 0.2)
#   mixlora-naive    MixLoRA through the naive per-expert loop (checks the fused path)
#   mixlora-e1       MixLoRA with one expert, top-1 (a LoRA r=16 on all seven projections in
#                    MixLoRA's plumbing: should match lora16)
#   mixlora-r64      MixLoRA at r=64, alpha=128 (experts and attention; 4x the parameters)
# Variants beyond the paper (docs/DESIGN.md, "Variants"; not in the default list, name them):
#   mixlora-z1e-3    MixLoRA with the router z-loss, coefficient 1e-3 (ST-MoE's)
#   mixlora-z1e-2    MixLoRA with the router z-loss, coefficient 1e-2
#   mixlora-rlr10    MixLoRA with the routers' lr 10x the lr
#   mixlora-rlr100   MixLoRA with the routers' lr 100x the lr
#   mixlora-binit1e-3  MixLoRA with the experts' LoRA B drawn N(0, 1e-3) at init
#   mixlora-binit1e-2  MixLoRA with the experts' LoRA B drawn N(0, 1e-2) at init
#   mixlora-rslora   MixLoRA with rsLoRA scaling (alpha/sqrt(r))
#   mixlora-combo    z-loss 1e-3, routers' lr 10x and B init N(0, 1e-3) together
# SEED (42), EPOCHS (1), EVAL_LIMIT (questions per task; for a dry run only), MIXLORA_BIN and
# OUT change the plan; a variant whose eval.json exists is skipped, one stopped earlier goes on
# from its last checkpoint. LR sets the learning rate of every variant that does not set its own
# (the chosen lr of the sweep); SEEDS (e.g. "42 43 44") runs each variant once per seed, in
# folders VARIANT-seedN (instead of SEED and one folder VARIANT). Extra flags after `--` go to
# every `mixlora train` (e.g. --device cuda --dtype bf16); the device flag is passed to eval too.
#
#   LR=1e-3 SEEDS="42 43 44" OUT=runs/variants EPOCHS=2 scripts/commonsense-ablations.sh M DATA \
#       mixlora mixlora-z1e-3 mixlora-rlr10 mixlora-binit1e-3 mixlora-rslora -- --device cuda --dtype bf16
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 2 ]; then
    sed -n '2,42p' "$0" >&2
    exit 2
fi
model=$1
data=$2
shift 2
variants=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    variants+=("$1")
    shift
done
[ "${1:-}" = "--" ] && shift
extra=("$@")
if [ ${#variants[@]} -eq 0 ]; then
    variants=(mixlora lora86 lora16 mixlora-lr5e-4 mixlora-lr1e-3 mixlora-aux0.01 mixlora-aux0
        mixlora-init0.2 mixlora-naive mixlora-e1 mixlora-r64)
fi
out=${OUT:-runs/ablations}
seed=${SEED:-42}
epochs=${EPOCHS:-1}
lr=${LR:-}
# bin, train_files, valid_files, device (eval runs where training ran) and limit.
source scripts/commonsense-setup.sh

flags_of() { # variant -> train flags
    case "$1" in
        mixlora) echo "--adapter mixlora --rank 16 --alpha 32" ;;
        lora86) echo "--adapter lora --rank 86 --alpha 172" ;;
        lora16) echo "--adapter lora --rank 16 --alpha 32" ;;
        mixlora-lr5e-4) echo "--adapter mixlora --rank 16 --alpha 32 --lr 5e-4" ;;
        mixlora-lr1e-3) echo "--adapter mixlora --rank 16 --alpha 32 --lr 1e-3" ;;
        mixlora-aux0.01) echo "--adapter mixlora --rank 16 --alpha 32 --aux-loss-coef 0.01" ;;
        mixlora-aux0) echo "--adapter mixlora --rank 16 --alpha 32 --aux-loss-coef 0" ;;
        mixlora-init0.2) echo "--adapter mixlora --rank 16 --alpha 32 --router-init-range 0.2" ;;
        mixlora-naive) echo "--adapter mixlora --rank 16 --alpha 32 --moe-impl naive" ;;
        mixlora-e1) echo "--adapter mixlora --rank 16 --alpha 32 --num-experts 1 --top-k 1" ;;
        mixlora-r64) echo "--adapter mixlora --rank 64 --alpha 128" ;;
        mixlora-z1e-3) echo "--adapter mixlora --rank 16 --alpha 32 --router-z-loss 1e-3" ;;
        mixlora-z1e-2) echo "--adapter mixlora --rank 16 --alpha 32 --router-z-loss 1e-2" ;;
        mixlora-rlr10) echo "--adapter mixlora --rank 16 --alpha 32 --router-lr-scale 10" ;;
        mixlora-rlr100) echo "--adapter mixlora --rank 16 --alpha 32 --router-lr-scale 100" ;;
        mixlora-binit1e-3) echo "--adapter mixlora --rank 16 --alpha 32 --expert-b-init-std 1e-3" ;;
        mixlora-binit1e-2) echo "--adapter mixlora --rank 16 --alpha 32 --expert-b-init-std 1e-2" ;;
        mixlora-rslora) echo "--adapter mixlora --rank 16 --alpha 32 --rslora true" ;;
        mixlora-combo)
            echo "--adapter mixlora --rank 16 --alpha 32 --router-z-loss 1e-3 --router-lr-scale 10" \
                "--expert-b-init-std 1e-3"
            ;;
        *)
            echo "unknown variant: $1" >&2
            return 1
            ;;
    esac
}

mkdir -p "$out"
summary="$out/summary.tsv"
[ -e "$summary" ] || printf 'variant\tavg\tarc_e\tarc_c\tboolq\tobqa\ttrain_s\teval_s\n' >"$summary"
# (variant, seed, folder) of every run: one per variant with SEED, one per seed with SEEDS.
runs=()
for v in "${variants[@]}"; do
    flags_of "$v" >/dev/null
    if [ -n "${SEEDS:-}" ]; then
        for s in $SEEDS; do runs+=("$v $s $v-seed$s"); done
    else
        runs+=("$v $seed $v")
    fi
done
for r in "${runs[@]}"; do
    read -r v seed name <<<"$r"
    read -r -a flags <<<"$(flags_of "$v")"
    # The chosen lr, unless the variant sets its own.
    if [ -n "$lr" ] && [[ " ${flags[*]} " != *" --lr "* ]]; then
        flags+=(--lr "$lr")
    fi
    dir="$out/$name"
    if [ -e "$dir/eval.json" ]; then
        echo "$name: done already" >&2
        continue
    fi
    mkdir -p "$dir"
    t0=$(date +%s%N)
    # An earlier attempt that finished training goes straight to evaluation; one that stopped
    # goes on from its last checkpoint.
    if [ ! -e "$dir/adapter/adapter_model.safetensors" ]; then
        read -r -a again <<<"$(again_flag "$dir")"
        "$bin" train --model "$model" "${flags[@]}" --epochs "$epochs" --seed "$seed" \
            "${train_files[@]}" --out "$dir" "${extra[@]}" "${again[@]}" 2>>"$dir/train.log"
    fi
    t1=$(date +%s%N)
    routing=()
    [[ "$v" == mixlora* ]] && routing=(--routing "$dir/routing.json")
    "$bin" eval --model "$model" --adapter "$dir/adapter" "${valid_files[@]}" "${device[@]}" \
        "${limit[@]}" "${routing[@]}" --output "$dir/eval.json" >/dev/null
    t2=$(date +%s%N)
    python3 - "$dir/eval.json" "$name" "$((t1 - t0))" "$((t2 - t1))" >>"$summary" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
acc = {t["task"]: t["accuracy"] for t in r["tasks"]}
cells = [f"{100 * r['average']:.1f}"] + [f"{100 * acc[t]:.1f}" for t in ["arc_e", "arc_c", "boolq", "obqa"]]
print("\t".join([sys.argv[2]] + cells + [f"{int(sys.argv[3]) / 1e9:.0f}", f"{int(sys.argv[4]) / 1e9:.0f}"]))
EOF
    tail -n 1 "$summary" >&2
done
