#!/usr/bin/env bash
# Trains short CPU runs of every adapter kind and MoE implementation (LoRA f32/bf16; MixLoRA
# naive, paper, grouped, fused, in f32 and bf16, top-p routing, gradient checkpointing, the fused
# FFN in token chunks of 7 and 64) with the embedded default model and data, and prints one line
# per run: a hash of its losses, of its adapter file and of its adapter_config.json, and its last
# loss. Two builds that print the same lines train bit-identically: run it with the binary
# before and after a change that must not change results, and diff the outputs.
#
#   scripts/dev/train-fingerprint.sh BIN OUTDIR > fingerprint.txt
set -euo pipefail
bin=$1
out=$2
mkdir -p "$out"
hash() { sha256sum | cut -c1-16; }
run() {
    name=$1
    shift
    rm -rf "${out:?}/$name"
    if ! "$bin" train --max-steps 12 --eval-limit 8 --out "$out/$name" "$@" >"$out/$name.log" 2>&1; then
        echo "$name FAILED (see $out/$name.log)"
        return
    fi
    local losses adapter config last
    losses=$(grep -o '"loss":[^,]*' "$out/$name/metrics.jsonl" | hash)
    adapter=$(hash <"$out/$name/adapter/adapter_model.safetensors")
    config=$(hash <"$out/$name/adapter/adapter_config.json")
    last=$(grep -o '"loss":[^,]*' "$out/$name/metrics.jsonl" | tail -1)
    echo "$name loss=$losses adapter=$adapter config=$config $last"
}
run lora --adapter lora
run lora-bf16 --adapter lora --dtype bf16
for impl in naive paper grouped fused; do
    run "mix-$impl" --adapter mixlora --moe-impl "$impl"
done
run mix-fused-bf16 --adapter mixlora --moe-impl fused --dtype bf16
run mix-naive-bf16 --adapter mixlora --moe-impl naive --dtype bf16
run mix-topp --adapter mixlora --routing topp
run mix-fused-ckpt --adapter mixlora --moe-impl fused --gradient-checkpointing
run mix-fused-chunk7 --adapter mixlora --moe-impl fused --moe-chunk-tokens 7
run mix-fused-chunk64 --adapter mixlora --moe-impl fused --moe-chunk-tokens 64
