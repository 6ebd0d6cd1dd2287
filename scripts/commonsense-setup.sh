# Sourced (from the repository root) by scripts/commonsense.sh and scripts/commonsense-ablations.sh
# after they set `data` (the folder of {arc_e,arc_c,boolq,obqa}/{train,valid}.json) and `extra`
# (the train flags). Sets:
#   bin          the mixlora binary: $MIXLORA_BIN, else target/release/mixlora, else gpu-bin/mixlora
#   train_files  --data flags of the four tasks' train.json; valid_files likewise for valid.json
#   device       --device X when the train flags name one (evaluation runs on the same device)
#   limit        --limit $EVAL_LIMIT when set (questions per task; for a dry run only)
# and defines again_flag.
bin=${MIXLORA_BIN:-}
if [ -z "$bin" ]; then
    if [ -x target/release/mixlora ]; then bin=target/release/mixlora; else bin=gpu-bin/mixlora; fi
fi
train_files=()
valid_files=()
for t in arc_e arc_c boolq obqa; do
    train_files+=(--data "$data/$t/train.json")
    valid_files+=(--data "$data/$t/valid.json")
done
device=()
for ((i = 0; i < ${#extra[@]}; i++)); do
    if [ "${extra[$i]}" = "--device" ] && [ $((i + 1)) -lt ${#extra[@]} ]; then
        device=(--device "${extra[$((i + 1))]}")
    fi
done
limit=()
if [ -n "${EVAL_LIMIT:-}" ]; then limit=(--limit "$EVAL_LIMIT"); fi

# The train flag for run folder $1 after an earlier attempt stopped in it: --resume when it has
# a checkpoint, --overwrite when it stopped before the first one (mixlora train refuses a folder
# with another run otherwise); nothing for a new folder.
again_flag() {
    if compgen -G "$1/checkpoint-[0-9]*" >/dev/null; then
        echo --resume
    elif [ -e "$1/train_config.toml" ] || [ -e "$1/metrics.jsonl" ]; then
        echo --overwrite
    fi
}
