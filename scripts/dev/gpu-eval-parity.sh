#!/usr/bin/env bash
# On the GPU machine: the inference path of `mixlora eval` (LoRA merged into the base, MixLoRA on
# the fused path with its experts stacked once) on the GPU against the CPU. Trains a LoRA and a
# MixLoRA adapter for a few steps on the built-in tiny model (CPU), evaluates each on both devices
# and compares the correct counts per task (at most one question per task may flip on a near-tie
# of candidate scores) and, for MixLoRA, prints whether the routing JSON is identical.
#
#   scripts/dev/gpu-eval-parity.sh BIN OUTDIR     (BIN: a mixlora built with --features cuda)
set -uo pipefail
bin=$1
out=$2
mkdir -p "$out"
rc=0
for kind in lora mixlora; do
    rm -rf "${out:?}/$kind"
    "$bin" train --adapter "$kind" --max-steps 20 --eval-limit 8 --out "$out/$kind" >"$out/$kind-train.log" 2>&1 ||
        { echo "$kind: training failed (see $out/$kind-train.log)"; rc=1; continue; }
    routing=()
    for dev in cpu cuda; do
        [ "$kind" = mixlora ] && routing=(--routing "$out/$kind-routing-$dev.json")
        "$bin" eval --adapter "$out/$kind/adapter" --device "$dev" "${routing[@]}" \
            >"$out/$kind-eval-$dev.json" 2>"$out/$kind-eval-$dev.log" ||
            { echo "$kind: eval on $dev failed (see $out/$kind-eval-$dev.log)"; rc=1; }
    done
    python3 - "$out/$kind-eval-cpu.json" "$out/$kind-eval-cuda.json" "$kind" <<'PY' || rc=1
import json, sys
cpu, gpu = (json.load(open(p)) for p in sys.argv[1:3])
worst = 0
for c, g in zip(cpu["tasks"], gpu["tasks"]):
    d = abs(c["correct"] - g["correct"])
    worst = max(worst, d)
    print(f"{sys.argv[3]} {c['task']}: cpu {c['correct']}/{c['total']} cuda {g['correct']}/{g['total']}")
sys.exit(1 if worst > 1 else 0)
PY
    if [ "$kind" = mixlora ] && [ -s "$out/$kind-routing-cpu.json" ]; then
        if cmp -s "$out/$kind-routing-cpu.json" "$out/$kind-routing-cuda.json"; then
            echo "mixlora: routing identical on cpu and cuda"
        else
            echo "mixlora: routing differs between cpu and cuda (near-ties of router scores?)"
        fi
    fi
done
exit $rc
