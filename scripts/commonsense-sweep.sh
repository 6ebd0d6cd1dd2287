#!/usr/bin/env bash
# The fair sweep of the multi-task experiment (scripts/commonsense.sh's data and settings): for
# each method, the learning rates in LRS trained together in ONE `mixlora train --sweep lr=...`
# (one base, one adapter per lr), scored together on the four tasks' valid.json in one
# `mixlora eval --adapter ... --adapter ...`; the lr with the best 4-task average is chosen per
# method, then SEEDS are trained together at that lr (`--sweep seed=...`) and scored likewise.
# Methods: mixlora (E=8, top-2, r=16, alpha=32) and lora86 (the parameter-matched LoRA, r=86 on
# all seven projections), plus any variant of scripts/commonsense-ablations.sh named in METHODS
# (their flags are taken from there). Everything lands in $OUT (default runs/sweep):
#   METHOD/lr/lrX/        each lr's adapter, metrics.jsonl, checkpoints (train.log, eval.json)
#   METHOD/seeds/seedN/   each seed's run at the chosen lr
#   summary.tsv           one line per (method, stage, lr, seed): avg and per-task accuracy
#   chosen.tsv            the chosen lr per method and its seeds' mean ± std
#
#   scripts/commonsense-sweep.sh MODEL.gguf DATA_DIR [-- extra train flags]
#
# LRS ("1e-4 2e-4 5e-4 1e-3 2e-3"), SEEDS ("42 43 44"), METHODS ("mixlora lora86"), EPOCHS (2),
# EVAL_LIMIT (dry runs only), MIXLORA_BIN and OUT change the plan. A stage whose eval.json exists
# is skipped; one that stopped goes on from its checkpoints (--resume), so the plan can be done in
# several sittings.
#
#   OUT=runs/sweep scripts/commonsense-sweep.sh smol.gguf data/commonsense -- --device cuda --dtype bf16
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 2 ]; then
    sed -n '2,23p' "$0" >&2
    exit 2
fi
model=$1
data=$2
shift 2
[ "${1:-}" = "--" ] && shift
extra=("$@")
out=${OUT:-runs/sweep}
lrs=${LRS:-"1e-4 2e-4 5e-4 1e-3 2e-3"}
seeds=${SEEDS:-"42 43 44"}
methods=${METHODS:-"mixlora lora86"}
epochs=${EPOCHS:-2}
# bin, train_files, valid_files, device (eval runs where training ran) and limit.
source scripts/commonsense-setup.sh

# The variants' flags: scripts/commonsense-ablations.sh's own `flags_of`, loaded as
# `ablation_flags` (one table of variants for both scripts).
eval "$(sed -n '/^flags_of() {/,/^}/p' scripts/commonsense-ablations.sh | sed 's/^flags_of/ablation_flags/')"
flags_of() { # method -> its train flags without any --lr (the sweep sets it)
    ablation_flags "$1" | sed -E 's/--lr [^ ]+//'
}

# Trains the sweep `spec` (e.g. lr=1e-4,2e-4) of `method` into `dir` and scores every adapter
# folder in one grouped eval into dir/eval.json (keyed by folder).
stage() { # method dir extra-flags spec
    local method=$1 dir=$2 more=$3 spec=$4
    if [ -e "$dir/eval.json" ]; then
        echo "$dir: done already" >&2
        return
    fi
    mkdir -p "$dir"
    local -a flags again folders
    read -r -a flags <<<"$(flags_of "$method") $more"
    if [ ! -e "$dir/.trained" ]; then
        again=()
        if compgen -G "$dir/*/checkpoint-[0-9]*" >/dev/null; then again=(--resume); fi
        "$bin" train --model "$model" "${flags[@]}" --epochs "$epochs" "${train_files[@]}" \
            --sweep "$spec" --out "$dir" "${extra[@]}" "${again[@]}" 2>>"$dir/train.log"
        touch "$dir/.trained"
    fi
    folders=()
    for f in "$dir"/*/adapter; do folders+=(--adapter "$f"); done
    "$bin" eval --model "$model" "${folders[@]}" "${valid_files[@]}" "${device[@]}" "${limit[@]}" \
        --output "$dir/eval.json" >/dev/null
}

# `record`: appends every adapter of dir/eval.json to summary.tsv as (method, stage); `best`:
# prints the name of the adapter with the best 4-task average (lr2e-4, ...).
report() { # record|best method stage dir
    python3 - "$@" "$out/summary.tsv" <<'EOF'
import json, sys
mode, method, stage, d, summary = sys.argv[1:6]
rows = []
for folder, r in json.load(open(f"{d}/eval.json")).items():
    name = folder.rstrip("/").split("/")[-2]  # .../lr2e-4/adapter -> lr2e-4
    acc = {t["task"]: t["accuracy"] for t in r["tasks"]}
    cells = [f"{100 * r['average']:.2f}"] + [f"{100 * acc[t]:.2f}" for t in ["arc_e", "arc_c", "boolq", "obqa"]]
    rows.append((r["average"], name, cells))
if mode == "record":
    with open(summary, "a") as f:
        for _, name, cells in rows:
            f.write("\t".join([method, stage, name] + cells) + "\n")
else:
    print(max(rows)[1])
EOF
}

mkdir -p "$out"
[ -e "$out/summary.tsv" ] ||
    printf 'method\tstage\trun\tavg\tarc_e\tarc_c\tboolq\tobqa\n' >"$out/summary.tsv"
[ -e "$out/chosen.tsv" ] || printf 'method\tlr\tmean\tstd\tseeds\n' >"$out/chosen.tsv"
for m in $methods; do
    flags_of "$m" >/dev/null
    lr_dir="$out/$m/lr"
    fresh=0
    [ -e "$lr_dir/eval.json" ] || fresh=1
    stage "$m" "$lr_dir" "--seed ${seeds%% *}" "lr=${lrs// /,}"
    [ $fresh -eq 1 ] && report record "$m" lr "$lr_dir"
    best=$(report best "$m" lr "$lr_dir")
    lr=${best#lr}
    echo "$m: chosen lr $lr (valid 4-task average)" >&2
    seed_dir="$out/$m/seeds"
    fresh=0
    [ -e "$seed_dir/eval.json" ] || fresh=1
    stage "$m" "$seed_dir" "--lr $lr" "seed=${seeds// /,}"
    [ $fresh -eq 1 ] && report record "$m" seeds "$seed_dir"
    if ! grep -q "^$m	" "$out/chosen.tsv"; then
        python3 - "$m" "$lr" "$seed_dir/eval.json" >>"$out/chosen.tsv" <<'EOF'
import json, statistics, sys
m, lr, path = sys.argv[1:4]
avgs = [100 * r["average"] for r in json.load(open(path)).values()]
std = statistics.stdev(avgs) if len(avgs) > 1 else 0.0
print(f"{m}\t{lr}\t{statistics.mean(avgs):.2f}\t{std:.2f}\t{len(avgs)}")
EOF
    fi
    tail -n 1 "$out/chosen.tsv" >&2
done
