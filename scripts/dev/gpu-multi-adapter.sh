#!/usr/bin/env bash
# On the GPU machine: several adapters trained together on one frozen base against single runs
# (`mixlora bench table6 --adapters 1,2,4`): LoRA and fused MixLoRA at LLaMA-2-7B's shape (random
# bf16 weights, 8x512 tokens per adapter), without and then with gradient checkpointing. Writes
# into OUTDIR multi-adapter-plain.json / .md and multi-adapter-checkpointing.json / .md, and both
# lists joined in multi-adapter.json (the file benches/results/multi-adapter-h200.json keeps).
# About 2 minutes on an H200 (16 steps of up to 4 adapters per variant and setting, each step
# 0.25-0.4 s per adapter, plus a model build per setting); a group that does not fit in the GPU's
# memory (4 adapters without checkpointing on an 80 GB card) is reported as such, not an error.
# Then with checkpointing and --group-mode sequential (each adapter's forward and backward before
# the next adapter's: one adapter's activations at a time; multi-adapter-sequential-
# checkpointing.json). SHARED=1 also runs both settings with --group-mode shared
# (multi-adapter-shared*.json).
#
#   scripts/dev/gpu-multi-adapter.sh BIN OUTDIR     (BIN: a mixlora built with --features cuda)
set -uo pipefail
[ $# -eq 2 ] || {
    sed -n '2,15p' "$0" >&2
    exit 2
}
bin=$1
out=$2
mkdir -p "$out"
rc=0
for setting in plain checkpointing sequential-checkpointing ${SHARED:+shared shared-checkpointing}; do
    flag=()
    case $setting in *checkpointing) flag+=(--gradient-checkpointing) ;; esac
    case $setting in shared*) flag+=(--group-mode shared) ;; esac
    case $setting in sequential*) flag+=(--group-mode sequential) ;; esac
    "$bin" bench table6 --variants lora,mixlora-fused --adapters 1,2,4 "${flag[@]}" \
        --json "$out/multi-adapter-$setting.json" | tee "$out/multi-adapter-$setting.md" || rc=1
done
python3 - "$out/multi-adapter.json" "$out"/multi-adapter-{plain,checkpointing,sequential-checkpointing}.json \
    ${SHARED:+"$out"/multi-adapter-shared{,-checkpointing}.json} <<'PY' || rc=1
import json, os, sys
rows = [r for p in sys.argv[2:] if os.path.exists(p) for r in json.load(open(p))]
with open(sys.argv[1], "w") as f:
    json.dump(rows, f, indent=2)
    f.write("\n")
print(f"{sys.argv[1]}: {len(rows)} rows")
PY
exit $rc
