#!/usr/bin/env bash
# The multi-task experiment: SmolLM2-135M-Instruct fine-tuned on the mixture of the commonsense
# tasks (arc_e, arc_c, boolq, obqa) with (a) MixLoRA (E=8, top-2, r=16, alpha=32; LoRA r=16 on
# q, k, v, o) and (b) a LoRA on all seven projections with the same number of parameters, three
# seeds each, the default settings (2 epochs, lr 2e-4, batch 16 in micro-batches of 8, cutoff
# 512); every adapter and the base model evaluated on each task's valid.json; the routing of
# each MixLoRA adapter per task and layer (JSON and PNG). Results land in $OUT (default
# runs/commonsense): one folder per run with its adapter, metrics and eval JSON, and times.tsv.
#
#   scripts/commonsense.sh MODEL.gguf DATA_DIR [--device cuda] [extra train flags...]
#
# DATA_DIR holds {arc_e,arc_c,boolq,obqa}/{train,valid}.json. The mixlora binary is taken from
# $MIXLORA_BIN (default target/release/mixlora, else gpu-bin/mixlora on the GPU machine). SEEDS
# (default "42 43 44"), KINDS (default "mixlora lora"), LORA_RANK (86), SKIP_BASE (set: no base
# eval) and EVAL_LIMIT (questions per task; default all, set it only for a dry run) change the
# plan; runs whose eval.json exists are skipped and a run stopped earlier goes on from its last
# checkpoint, so the plan can be done in several sittings.
# Alpha is twice the rank for both adapters (32 at r = 16).
#
# The LoRA rank: on SmolLM2-135M (H = 576, I = 1536, q/o 576→576, k/v 576→192, 30 layers)
# MixLoRA trains 30 · (16 · 3,840 (q, k, v, o) + 8 · 16 · 6,336 (experts' gate, up, down) + 8 · 576
# (router)) = 26,311,680 parameters; a LoRA on all seven projections trains 30 · 10,176 = 305,280
# per unit of rank, so r = 86 matches it (26,254,080, 0.2% fewer). Each run logs its count.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 2 ]; then
    sed -n '2,24p' "$0" >&2
    exit 2
fi
model=$1
data=$2
shift 2
extra=("$@")
out=${OUT:-runs/commonsense}
seeds=${SEEDS:-"42 43 44"}
kinds=${KINDS:-"mixlora lora"}
lora_rank=${LORA_RANK:-86}
# bin, train_files, valid_files, device (eval runs where training ran) and limit.
source scripts/commonsense-setup.sh
mkdir -p "$out"
times="$out/times.tsv"
[ -e "$times" ] || printf 'run\tphase\tseconds\n' >"$times"

timed() { # name phase command...
    local name=$1 phase=$2
    shift 2
    local t0 t1
    t0=$(date +%s%N)
    "$@"
    t1=$(date +%s%N)
    # Nanoseconds to seconds in awk (bc is not everywhere).
    awk -v n="$name" -v p="$phase" -v d="$((t1 - t0))" 'BEGIN { printf "%s\t%s\t%.1f\n", n, p, d / 1e9 }' >>"$times"
}

# The base model, zero-shot.
if [ -z "${SKIP_BASE:-}" ] && [ ! -e "$out/base/eval.json" ]; then
    mkdir -p "$out/base"
    timed base eval "$bin" eval --model "$model" "${valid_files[@]}" "${device[@]}" "${limit[@]}" \
        --output "$out/base/eval.json" >/dev/null
fi

for seed in $seeds; do
    for kind in $kinds; do
        run="$kind-seed$seed"
        dir="$out/$run"
        if [ -e "$dir/eval.json" ]; then
            echo "$run: done already" >&2
            continue
        fi
        rank=16
        [ "$kind" = lora ] && rank=$lora_rank
        # An earlier attempt that finished training goes straight to evaluation; one that
        # stopped goes on from its last checkpoint.
        if [ ! -e "$dir/adapter/adapter_model.safetensors" ]; then
            read -r -a again <<<"$(again_flag "$dir")"
            timed "$run" train "$bin" train --model "$model" --adapter "$kind" --rank "$rank" \
                --alpha $((2 * rank)) --seed "$seed" "${train_files[@]}" --out "$dir" \
                "${extra[@]}" "${again[@]}" 2>"$dir.train.log"
            cat "$dir.train.log" >>"$dir/train.log"
            rm "$dir.train.log"
        fi
        routing=()
        [ "$kind" = mixlora ] && routing=(--routing "$dir/routing.json")
        timed "$run" eval "$bin" eval --model "$model" --adapter "$dir/adapter" "${valid_files[@]}" \
            "${device[@]}" "${limit[@]}" "${routing[@]}" --output "$dir/eval.json" >/dev/null
        if [ "$kind" = mixlora ]; then
            "$bin" plot-routing --input "$dir/routing.json" --out "$dir/routing.png" ||
                echo "$run: no routing plot (see the message above)" >&2
        fi
    done
done
echo "results in $out (eval.json per run, times.tsv)" >&2
