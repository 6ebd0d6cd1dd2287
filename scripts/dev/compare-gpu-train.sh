#!/usr/bin/env bash
# On the GPU machine: short training runs of an older and a newer `mixlora` build on the embedded
# default model and data (`--device cuda`; LoRA and MixLoRA with the naive and fused MoE, bf16 and
# f32), each build's runs one after another, then the newer build's again (the run-to-run floor of
# the GPU kernels: atomics in the reductions make a bf16 step differ in its last bits). Prints,
# per run, the largest relative difference of a step's loss between the builds and between the
# newer build's two runs, and each build's last loss. Two builds agree when the first column stays
# at the level of the second (bf16 rounding, amplified by a dozen optimizer steps).
#
#   scripts/dev/compare-gpu-train.sh BEFORE_BIN AFTER_BIN OUTDIR [STEPS]
set -uo pipefail
[ $# -ge 3 ] || {
    sed -n '2,10p' "$0" >&2
    exit 2
}
before=$1
after=$2
out=$3
steps=${4:-20}
mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export MIXLORA_CUDA_INCLUDE=${MIXLORA_CUDA_INCLUDE:-/usr/local/cuda/include}
runs=(
    "lora-bf16 --adapter lora --dtype bf16"
    "lora-f32 --adapter lora --dtype f32"
    "mix-fused-bf16 --adapter mixlora --moe-impl fused --dtype bf16"
    "mix-naive-bf16 --adapter mixlora --moe-impl naive --dtype bf16"
    "mix-fused-f32 --adapter mixlora --moe-impl fused --dtype f32"
)
for side in before after again; do
    bin=$before
    [ "$side" = before ] || bin=$after
    for r in "${runs[@]}"; do
        read -r -a a <<<"$r"
        name=${a[0]}
        dir=$out/$side-$name
        rm -rf "$dir"
        "$bin" train --device cuda --max-steps "$steps" --eval-limit 8 --out "$dir" "${a[@]:1}" \
            >"$dir.log" 2>&1 || { echo "$side $name FAILED:"; tail -3 "$dir.log"; }
    done
done
python3 - "$out" "${runs[@]}" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def losses(side, name):
    p = out / f"{side}-{name}" / "metrics.jsonl"
    if not p.exists():
        return None
    rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    return [r["loss"] for r in rows if r.get("kind", "train") == "train" and "loss" in r]
def worst(a, b):
    if a is None or b is None or len(a) != len(b) or not a:
        return float("nan")
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
print(f"{'run':16} {'steps':>5} {'before/after':>13} {'after/again':>12} {'last before':>12} {'last after':>11}")
for r in sys.argv[2:]:
    name = r.split()[0]
    b, a, g = (losses(s, name) for s in ("before", "after", "again"))
    last = lambda l: l[-1] if l else float("nan")
    print(f"{name:16} {len(a or []):>5} {worst(b, a):>13.2e} {worst(g, a):>12.2e} "
          f"{last(b):>12.6f} {last(a):>11.6f}")
EOF
