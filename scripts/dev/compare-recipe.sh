#!/usr/bin/env bash
# A before/after speed comparison on the commonsense recipe's batches, both builds on one card in
# one session: `mixlora bench recipe` with random weights at SmolLM2-135M's shape (MixLoRA r=16,
# LoRA r=86) and at LLaMA-2-7B's (MixLoRA, micro-packed, one micro-batch of 16), CUDA graphs on,
# each with the older build then the newer one. MODEL gives only the tokenizer, so the file of
# scripts/dev/gguf-metadata-only.py will do (1.7 MB where the model is 98 MB). Run from the
# repository root on the GPU machine.
#
#   scripts/dev/compare-recipe.sh BEFORE/mixlora AFTER/mixlora MODEL.gguf DATA_DIR OUTDIR
#
# DATA_DIR holds {arc_e,arc_c,boolq,obqa}/train.json. STEPS (default 40) timed steps at the
# SmolLM2 shape, 30 at the 7B one; SEVEN_B=0 skips the 7B shape; DEVICE=cpu GRAPHS=eager
# STEPS=1 SEVEN_B=0 is a dry run on a machine without a GPU. Writes OUTDIR/<shape>-<kind>-{before,after}.json and prints
# each run's line.
set -uo pipefail
[ $# -eq 5 ] || { echo "usage: $0 BEFORE_BIN AFTER_BIN MODEL DATA_DIR OUTDIR" >&2; exit 2; }
before=$1
after=$2
model=$3
data=$4
out=$5
mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
files=(--model "$model")
for t in arc_e arc_c boolq obqa; do files+=(--data "$data/$t/train.json"); done

run() { # NAME BIN ARGS...
    local name=$1 bin=$2
    shift 2
    if "$bin" bench recipe --device "${DEVICE:-cuda}" "${files[@]}" \
        --cuda-graphs "${GRAPHS:-on}" "$@" \
        --json "$out/$name.json" >"$out/$name.log" 2>&1; then
        echo "$name: $(tail -1 "$out/$name.log")"
    else
        echo "$name FAILED: $(tail -1 "$out/$name.log")"
    fi
}
for kind in mixlora lora; do
    rank=16
    [ "$kind" = lora ] && rank=86
    for tag in before after; do
        bin=$after
        [ "$tag" = before ] && bin=$before
        run "smollm2-$kind-$tag" "$bin" --shape smollm2 --adapter "$kind" --rank "$rank" \
            --steps "${STEPS:-40}"
    done
done
[ "${SEVEN_B:-1}" = 0 ] && exit 0
for tag in before after; do
    bin=$after
    [ "$tag" = before ] && bin=$before
    run "llama2-7b-mixlora-$tag" "$bin" --shape llama2-7b --steps 30 --warmup 10 \
        --pack-micro-batches --micro-batch 16
done
