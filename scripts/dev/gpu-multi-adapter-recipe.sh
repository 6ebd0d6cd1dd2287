#!/usr/bin/env bash
# On the GPU machine: four adapters trained together on SmolLM2 with the commonsense recipe's real
# data (the four tasks' train.json, batch 16 in micro-batches of 8, cutoff 512, its data order)
# against the same four trained one after another, each run STEPS optimizer steps (default 60)
# without evaluation. The four differ in seed (their data order and initialisation), as a seed
# sweep does. Both ways kernel by kernel (`--cuda-graphs off`), then both ways with the micro-steps
# recorded as CUDA graphs (`--cuda-graphs on`, what `auto` gives on a GPU: together, each
# adapter its own graphs, the four replayed side by side). Prints the wall time of each way (model
# loading and tokenising included: what a user waits for), their ratios and each run's peak device
# memory, and writes them to OUTDIR/multi-adapter-recipe.json; also the largest relative
# difference of an adapter's losses together and alone: within bf16/f32 rounding kernel by kernel,
# 0 with graphs (the same kernels on the same inputs).
#
#   scripts/dev/gpu-multi-adapter-recipe.sh BIN MODEL.gguf DATA_DIR OUTDIR [STEPS] [KIND]
#
# DATA_DIR holds {arc_e,arc_c,boolq,obqa}/train.json; KIND is mixlora (default) or lora. DEVICE
# (default cuda; the graph runs only there), EXTRA (more train flags) and an empty MODEL (the
# built-in model) serve a dry run on the CPU.
set -uo pipefail
[ $# -ge 4 ] || {
    sed -n '2,18p' "$0" >&2
    exit 2
}
bin=$1
model=$2
data=$3
out=$4
steps=${5:-60}
kind=${6:-mixlora}
mkdir -p "$out"
seeds=(42 43 44 45)
read -r -a extra <<<"${EXTRA:-}"
common=(--device "${DEVICE:-cuda}" --dtype bf16 --adapter "$kind"
    --max-steps "$steps" --save-every 0 --log-every 1 "${extra[@]}")
# An empty MODEL: the built-in tiny model (a CPU dry run).
[ -n "$model" ] && common+=(--model "$model")
graphs=(--cuda-graphs off)
for t in arc_e arc_c boolq obqa; do common+=(--data "$data/$t/train.json"); done
work=$(mktemp -d)
t0=$(date +%s.%N)
"$bin" train "${common[@]}" "${graphs[@]}" --sweep "seed=$(IFS=,; echo "${seeds[*]}")" --out "$work/together" \
    >/dev/null 2>"$out/recipe-together.log" || { tail -5 "$out/recipe-together.log"; exit 1; }
t1=$(date +%s.%N)
for s in "${seeds[@]}"; do
    "$bin" train "${common[@]}" "${graphs[@]}" --seed "$s" --out "$work/alone/seed$s" \
        >/dev/null 2>"$out/recipe-alone-$s.log" || { tail -5 "$out/recipe-alone-$s.log"; exit 1; }
done
t2=$(date +%s.%N)
if [ "${DEVICE:-cuda}" = cuda ]; then
    "$bin" train "${common[@]}" --cuda-graphs on --sweep "seed=$(IFS=,; echo "${seeds[*]}")" \
        --out "$work/graphs-together" >/dev/null 2>"$out/recipe-graphs-together.log" ||
        { tail -5 "$out/recipe-graphs-together.log"; exit 1; }
fi
t3=$(date +%s.%N)
if [ "${DEVICE:-cuda}" = cuda ]; then
    for s in "${seeds[@]}"; do
        "$bin" train "${common[@]}" --cuda-graphs on --seed "$s" --out "$work/graphs/seed$s" \
            >/dev/null 2>"$out/recipe-graphs-$s.log" || { tail -5 "$out/recipe-graphs-$s.log"; exit 1; }
    done
fi
t4=$(date +%s.%N)
python3 - "$out/multi-adapter-recipe.json" "$work" "$t0" "$t1" "$t2" "$t3" "$t4" "$steps" "$kind" "$out" <<'PY'
import json, os, re, sys
path, work, t0, t1, t2, t3, t4, steps, kind, out = sys.argv[1:]
t0, t1, t2, t3, t4 = float(t0), float(t1), float(t2), float(t3), float(t4)
seeds = [42, 43, 44, 45]
def losses(d):
    return [json.loads(l)["loss"] for l in open(f"{d}/metrics.jsonl") if '"train"' in l]
def peak(log):
    m = re.findall(r"peak device memory: ([0-9.]+) GiB", open(log).read()) if os.path.exists(log) else []
    return float(m[-1]) if m else None
def worst(a_dir, b_dir):
    w = 0.0
    for s in seeds:
        a, b = losses(f"{a_dir}/seed{s}"), losses(f"{b_dir}/seed{s}")
        assert len(a) == len(b) == int(steps), (s, len(a), len(b))
        w = max([w] + [abs(x - y) / max(abs(y), 1e-9) for x, y in zip(a, b)])
    return w
graphs = os.path.isdir(f"{work}/graphs")
r = {
    "shape": "smollm2-135m-recipe", "kind": kind, "n_adapters": len(seeds), "steps": int(steps),
    "together_s": round(t1 - t0, 1), "one_after_another_s": round(t2 - t1, 1),
    "speedup": round((t2 - t1) / (t1 - t0), 2),
    "together_graphs_s": round(t3 - t2, 1) if graphs else None,
    "one_after_another_graphs_s": round(t4 - t3, 1) if graphs else None,
    "speedup_graphs": round((t4 - t3) / (t3 - t2), 2) if graphs else None,
    "speedup_graphs_over_one_after_another_off": round((t2 - t1) / (t3 - t2), 2) if graphs else None,
    "together_peak_gib": peak(f"{out}/recipe-together.log"),
    "single_peak_gib": [peak(f"{out}/recipe-alone-{s}.log") for s in seeds],
    "together_graphs_peak_gib": peak(f"{out}/recipe-graphs-together.log"),
    "single_graphs_peak_gib": [peak(f"{out}/recipe-graphs-{s}.log") for s in seeds],
    "max_rel_loss_difference": worst(f"{work}/together", f"{work}/alone"),
    "max_rel_loss_difference_graphs": worst(f"{work}/graphs-together", f"{work}/graphs") if graphs else None,
}
json.dump(r, open(path, "w"), indent=2)
print(json.dumps(r))
PY
rc=$?
rm -rf "$work"
exit $rc
