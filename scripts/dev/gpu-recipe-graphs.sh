#!/usr/bin/env bash
# On the GPU machine: the commonsense recipe's own batches (the four tasks' train.json, batch 16
# in micro-batches of 8, cutoff 512, bf16) timed by `mixlora bench recipe` with the micro-steps
# launched kernel by kernel (`--cuda-graphs off`, before) and recorded as CUDA graphs (`on`,
# after), for MixLoRA (r16) and LoRA (r86), `on` also with packing and with each micro-batch's
# own examples packed (`--pack-micro-batches`: the same batches without their padding) and with
# the step's 16 examples in one micro-batch (`--micro-batch 16`: the same gradients, half the
# launches); then
# the same batches at the LLaMA-2-7B shape (random weights; 30 steps after 10 warm-up ones),
# padded, micro-packed and micro-packed in one micro-batch of 16, against Table 6's fused MixLoRA
# tokens/s. Writes each run's JSON and OUTDIR/recipe-graphs.json:
#
#   {"device", "shape", "steps", "before": {"mixlora", "lora"}, "after": {"mixlora", "lora",
#    "mixlora_packed", "lora_packed", "mixlora_micro_packed", "lora_micro_packed",
#    "mixlora_one_micro", "lora_one_micro"},
#    "shape7b": {"tokens_per_s", "micro_packed_tokens_per_s",
#                "micro_packed_one_micro_tokens_per_s", "table6_tokens_per_s"}}
#
# each entry {"tokens_per_s", "gpu_busy", "host_us_per_step", "step_ms", "train_s"}: `train_s`
# is the wall time of the full 2-epoch `mixlora train` run when FULL=1 (else null: the bench's
# timed steps only); FULL=on runs only the `on` ones (unpacked), which fit one call of ten
# minutes on an H100 (about 100 s for MixLoRA, 140 s for LoRA).
#
#   scripts/dev/gpu-recipe-graphs.sh BIN MODEL.gguf DATA_DIR OUTDIR [STEPS]
#
# DATA_DIR holds {arc_e,arc_c,boolq,obqa}/train.json. SHAPE=smollm2 times a random model of that
# shape (the model file then gives only the tokenizer, so the batches keep their real lengths; no
# FULL runs then). DEVICE (default cuda), ON=eager and SHAPE7B=0 (skip the 7B shape) serve a dry
# run on the CPU.
set -uo pipefail
[ $# -ge 4 ] || {
    sed -n '2,29p' "$0" >&2
    exit 2
}
bin=$1
model=$2
data=$3
out=$4
steps=${5:-40}
device=${DEVICE:-cuda}
on=${ON:-on} # `eager` for a CPU dry run
mkdir -p "$out"
files=()
# An empty MODEL: the built-in tiny model (a CPU dry run).
[ -n "$model" ] && files+=(--model "$model")
shape=()
[ -n "${SHAPE:-}" ] && shape=(--shape "$SHAPE")
for t in arc_e arc_c boolq obqa; do files+=(--data "$data/$t/train.json"); done

bench() { # NAME ARGS...: one bench recipe run into OUT/recipe-NAME.json
    local name=$1
    shift
    echo "== recipe $name"
    if ! "$bin" bench recipe --device "$device" "${files[@]}" \
        --json "$out/recipe-$name.json" "$@" >"$out/recipe-$name.log" 2>&1; then
        tail -3 "$out/recipe-$name.log"
        return 1
    fi
    tail -1 "$out/recipe-$name.log"
}
full() { # NAME ARGS...: the full 2-epoch train run, its wall time into OUT/train-NAME.s
    local name=$1
    shift
    local t0 t1
    t0=$(date +%s%N)
    "$bin" train --device "$device" --dtype bf16 "${files[@]}" --epochs 2 \
        --eval-every 0 --save-every 0 --out "$out/train-$name" "$@" >"$out/train-$name.log" 2>&1 ||
        { tail -3 "$out/train-$name.log"; return 1; }
    t1=$(date +%s%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f\n", (b - a) / 1e9 }' >"$out/train-$name.s"
    echo "train $name: $(cat "$out/train-$name.s") s"
}

for kind in mixlora lora; do
    rank=16
    [ "$kind" = lora ] && rank=86
    a=(--adapter "$kind" --rank "$rank" --steps "$steps" "${shape[@]}")
    bench "$kind-off" "${a[@]}" --cuda-graphs off
    bench "$kind-on" "${a[@]}" --cuda-graphs "$on"
    bench "$kind-on-packed" "${a[@]}" --cuda-graphs "$on" --packing
    bench "$kind-on-micro-packed" "${a[@]}" --cuda-graphs "$on" --pack-micro-batches
    bench "$kind-on-one-micro" "${a[@]}" --cuda-graphs "$on" --micro-batch 16
    if [ "${FULL:-0}" != 0 ] && [ ${#shape[@]} = 0 ]; then
        [ "$FULL" = on ] || full "$kind-off" --adapter "$kind" --rank "$rank" --cuda-graphs off
        full "$kind-on" --adapter "$kind" --rank "$rank" --cuda-graphs "$on"
        [ "$FULL" = on ] ||
            full "$kind-on-packed" --adapter "$kind" --rank "$rank" --cuda-graphs "$on" --packing
    fi
done
if [ "${SHAPE7B:-1}" = 1 ]; then
    s7=(--shape llama2-7b --steps 30 --warmup 10 --cuda-graphs "$on")
    bench 7b-on "${s7[@]}"
    bench 7b-on-micro-packed "${s7[@]}" --pack-micro-batches
    bench 7b-on-micro-packed-one-micro "${s7[@]}" --pack-micro-batches --micro-batch 16
    echo "== table6 fused MixLoRA"
    "$bin" bench table6 --variants mixlora-fused --json "$out/table6.json" 2>&1 | tail -2
fi

python3 - "$out" "$steps" <<'EOF'
import json, pathlib, sys
out, steps = pathlib.Path(sys.argv[1]), int(sys.argv[2])
def read(name):
    p = out / f"recipe-{name}.json"
    if not p.exists():
        return None
    r = json.loads(p.read_text())
    s = out / f"train-{name}.s"
    return {"tokens_per_s": r["tokens_per_s"], "gpu_busy": r["gpu_busy"],
            "host_us_per_step": r["host_us_per_step"], "step_ms": r["step_ms"],
            "train_s": float(s.read_text()) if s.exists() else None}
# The device and shape of the SmolLM2 runs (the 7B run has a shape of its own).
first = next((json.loads(p.read_text()) for p in sorted(out.glob("recipe-*.json"))
              if not p.name.startswith("recipe-7b")), {})
t6 = out / "table6.json"
table6 = None
if t6.exists():
    table6 = json.loads(t6.read_text()).get("mixlora_fused", {}).get("tokens_per_s")
seven, seven_mp = read("7b-on"), read("7b-on-micro-packed")
seven_mp1 = read("7b-on-micro-packed-one-micro")
result = {
    "device": first.get("device"),
    "shape": first.get("shape"),
    "steps": steps,
    "before": {k: read(f"{k}-off") for k in ("mixlora", "lora")},
    "after": {"mixlora": read("mixlora-on"), "lora": read("lora-on"),
              "mixlora_packed": read("mixlora-on-packed"), "lora_packed": read("lora-on-packed"),
              "mixlora_micro_packed": read("mixlora-on-micro-packed"),
              "lora_micro_packed": read("lora-on-micro-packed"),
              "mixlora_one_micro": read("mixlora-on-one-micro"),
              "lora_one_micro": read("lora-on-one-micro")},
    "shape7b": {"tokens_per_s": seven and seven["tokens_per_s"],
                "micro_packed_tokens_per_s": seven_mp and seven_mp["tokens_per_s"],
                "micro_packed_one_micro_tokens_per_s": seven_mp1 and seven_mp1["tokens_per_s"],
                "table6_tokens_per_s": table6},
}
(out / "recipe-graphs.json").write_text(json.dumps(result, indent=2) + "\n")
for k in ("mixlora", "lora"):
    b, a = result["before"][k], result["after"][k]
    if b and a:
        print(f"{k}: {b['tokens_per_s']:.0f} -> {a['tokens_per_s']:.0f} tokens/s "
              f"({a['tokens_per_s'] / b['tokens_per_s']:.2f}x), host {b['host_us_per_step']:.0f} -> "
              f"{a['host_us_per_step']:.0f} us/step, GPU busy {b['gpu_busy']} -> {a['gpu_busy']}")
EOF
