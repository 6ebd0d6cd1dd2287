#!/usr/bin/env bash
# A before/after speed comparison on the GPU machine, both builds on one card in one session:
# the paper's Table 6 (LoRA and MixLoRA `fused`, LLaMA-2-7B shape, batch 8×512) and the `moe_ffn`
# bench (the FFN block alone, `naive` and `fused`, T = 16384), each run with the older build, then
# the newer one, then both again, so that a drift of the card shows up in the pairs. Run from the
# repository root; each folder holds a `mixlora` and a `bench-moe_ffn` as scripts/dev/build-gpu.sh
# builds them (for an older revision: `git worktree add /tmp/old REV`, then its build script).
#
#   scripts/dev/compare-gpu.sh BEFORE_DIR AFTER_DIR OUTDIR
#
# ROUNDS=1 runs each build once (when GPU time is short; a drift of the card then goes unseen).
# Writes OUTDIR/table6-{before,after}{1,2}.json and OUTDIR/moe_ffn-{before,after}{1,2}.json
# and prints the tokens/s and milliseconds side by side.
set -uo pipefail
[ $# -eq 3 ] || { echo "usage: $0 BEFORE_DIR AFTER_DIR OUTDIR" >&2; exit 2; }
before=$1
after=$2
out=$3
mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

table6() { # TAG DIR
    "$2/mixlora" bench table6 --variants lora,mixlora-fused --json "$out/table6-$1.json" | tail -3
}
moe_ffn() { # TAG DIR
    MIXLORA_MOE_FFN_IMPLS=naive,fused MIXLORA_MOE_FFN_TOKENS=16384 \
        MIXLORA_MOE_FFN_JSON="$out/moe_ffn-$1.json" "$2/bench-moe_ffn" --bench nomatch 2>&1 | tail -3
}
for round in $(seq 1 "${ROUNDS:-2}"); do
    for side in before after; do
        dir=$before
        [ "$side" = after ] && dir=$after
        echo "== table6 $side$round"
        table6 "$side$round" "$dir"
        echo "== moe_ffn $side$round"
        moe_ffn "$side$round" "$dir"
    done
done
python3 - "$out" <<'EOF'
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])


def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None


print(f"{'run':9} {'LoRA tok/s':>11} {'fused tok/s':>12} {'naive ms':>9} {'fused ms':>9}")
for side in ["before1", "after1", "before2", "after2"]:
    t6 = load(f"table6-{side}.json") or {}
    ffn = load(f"moe_ffn-{side}.json") or [{}]
    nan = float("nan")
    lora = t6.get("lora", {}).get("tokens_per_s", nan)
    fused = t6.get("mixlora_fused", {}).get("tokens_per_s", nan)
    print(f"{side:9} {lora:>11.0f} {fused:>12.0f} "
          f"{ffn[-1].get('naive_ms', nan):>9.2f} {ffn[-1].get('fused_ms', nan):>9.2f}")
EOF
