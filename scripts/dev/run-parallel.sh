#!/usr/bin/env bash
# Runs a plan of long jobs at once on a machine with several GPUs (or several jobs per GPU: a
# SmolLM2-sized training run is bound by the host issuing kernels, so a GPU has room for more than
# one), detached from the calling shell so that they outlive it.
#
#   scripts/dev/run-parallel.sh start PLAN LOGDIR   start every job of PLAN, return at once
#   scripts/dev/run-parallel.sh wait LOGDIR SECONDS  wait until every job has ended or SECONDS passed;
#                                                exit 0 when all ended, 3 when some still run
#   scripts/dev/run-parallel.sh status LOGDIR        one line per job: running, or its exit status
#
# PLAN has one job per line, `GPU COMMAND...` (blank lines and lines starting with # are skipped);
# the command runs under `bash -c` with CUDA_VISIBLE_DEVICES=GPU and the caller's environment.
# Each job writes LOGDIR/job<N>.log (stdout and stderr), LOGDIR/job<N>.cmd, and LOGDIR/job<N>.rc
# with its exit status when it ends.
set -euo pipefail

usage() {
    sed -n '2,15p' "$0" >&2
    exit 2
}

status_line() { # N -> "job<N>: <state>  <command>"
    local n=$1 dir=$2 state
    if [ -e "$dir/job$n.rc" ]; then state="exit $(cat "$dir/job$n.rc")"; else state=running; fi
    printf 'job%s: %-8s %s\n' "$n" "$state" "$(cut -c1-150 "$dir/job$n.cmd")"
}

jobs_in() { # LOGDIR -> job numbers
    find "$1" -maxdepth 1 -name 'job*.cmd' | sed 's/.*job\([0-9]*\)\.cmd/\1/' | sort -n
}

case "${1:-}" in
    start)
        [ $# -eq 3 ] || usage
        plan=$2
        dir=$3
        mkdir -p "$dir"
        n=0
        while IFS= read -r line || [ -n "$line" ]; do
            [[ -z "${line// /}" || "$line" == \#* ]] && continue
            n=$((n + 1))
            gpu=${line%% *}
            cmd=${line#* }
            printf '%s\n' "$cmd" >"$dir/job$n.cmd"
            rm -f "$dir/job$n.rc"
            # setsid: a new session, so the job survives the end of the shell that started it.
            CUDA_VISIBLE_DEVICES=$gpu setsid bash -c \
                "bash -c \"\$1\" >'$dir/job$n.log' 2>&1; echo \$? >'$dir/job$n.rc'" _ "$cmd" \
                </dev/null >/dev/null 2>&1 &
        done <"$plan"
        echo "started $n jobs; logs in $dir" >&2
        ;;
    wait)
        [ $# -eq 3 ] || usage
        dir=$2
        deadline=$(($(date +%s) + $3))
        while :; do
            running=0
            for n in $(jobs_in "$dir"); do
                [ -e "$dir/job$n.rc" ] || running=$((running + 1))
            done
            [ "$running" -eq 0 ] && break
            [ "$(date +%s)" -ge "$deadline" ] && break
            sleep 5
        done
        for n in $(jobs_in "$dir"); do status_line "$n" "$dir"; done
        [ "$running" -eq 0 ] || exit 3
        ;;
    status)
        [ $# -eq 2 ] || usage
        for n in $(jobs_in "$2"); do status_line "$n" "$2"; done
        ;;
    *) usage ;;
esac
