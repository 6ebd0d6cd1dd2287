#!/usr/bin/env python3
"""Our trainer against the reference trainer (MoE-PEFT) on the same recipe and seed: the parity
table of RESULTS.md and benches/results/reference-parity-smollm2.json.

    scripts/reference-parity-report.py --seed 42 \\
        --ours-mixlora runs/ours/mixlora --ours-lora runs/ours/lora86 \\
        --ref-mixlora runs-ref/mixlora --ref-lora runs-ref/lora86 \\
        [--json benches/results/reference-parity-smollm2.json]

Each folder is one run's output: its `eval.json` (`mixlora eval` on the four valid.json files;
the reference harness writes one with the same scorer) and its `metrics.jsonl` (ours: lines of
"kind": "train"; the harness's: one object per step). The reference's `summary.json` gives its
training-loop time (`train_loop_s`); ours is the last step's `elapsed_s` (the loop, model loading
not counted, as there).

The four folders, on the GPU machine (the reference harness is the MoE-PEFT set-up kept outside
this repository; its README says how to install it):

    SEEDS=42 SKIP_BASE=1 OUT=runs/parity scripts/commonsense.sh MODEL.gguf DATA --device cuda \
        --dtype bf16                          # runs/parity/{mixlora,lora}-seed42
    MIXLORA=target/release/mixlora GGUF=MODEL.gguf DATA_DIR=DATA reference/run_ref.sh both-bg
                                              # runs-ref/{mixlora,lora86} (then `status`)

Per run: accuracy per task and their average in percent, `train_s`, and `final_loss`: the mean
training loss of the last 5% of the steps (a single step's loss at batch 16 is noise). Prints the
table, each difference ours - reference, and whether each method is within 1 point on the average.
Draw the loss curves with `mixlora plot-loss --run ours=... --run reference=... --out PNG`.
"""
import argparse
import json
import math
import pathlib
import sys

TASKS = ["arc_e", "arc_c", "boolq", "obqa"]
TAIL = 0.05


def fail(msg):
    sys.exit(f"reference-parity-report: {msg}")


def accuracies(run):
    path = run / "eval.json"
    try:
        report = json.loads(path.read_text())
        acc = {t["task"]: t["accuracy"] for t in report["tasks"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"{path}: not an eval report ({e})")
    missing = [t for t in TASKS if t not in acc]
    if missing:
        fail(f"{path}: no result for {', '.join(missing)}")
    row = {t: round(100 * acc[t], 2) for t in TASKS}
    row["avg"] = round(sum(100 * acc[t] for t in TASKS) / len(TASKS), 2)
    return row


def steps(run):
    """(step, loss, elapsed_s or None) of each training step of run/metrics.jsonl."""
    path = run / "metrics.jsonl"
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        fail(f"{path}: {e}")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            j = json.loads(line)
        except ValueError as e:
            fail(f"{path} line {i}: not JSON ({e})")
        if j.get("kind", "train") != "train":
            continue
        if not isinstance(j.get("step"), int) or not isinstance(j.get("loss"), (int, float)):
            fail(f"{path} line {i}: no integer step and number loss")
        out.append((j["step"], float(j["loss"]), j.get("elapsed_s")))
    if not out:
        fail(f"{path}: no training steps")
    return out


def final_loss(run):
    s = steps(run)
    n = max(1, math.ceil(len(s) * TAIL))
    return round(sum(x[1] for x in s[-n:]) / n, 4)


def train_s(run, reference):
    if reference:
        path = run / "summary.json"
        try:
            return float(json.loads(path.read_text())["train_loop_s"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            fail(f"{path}: no train_loop_s ({e})")
    elapsed = steps(run)[-1][2]
    if not isinstance(elapsed, (int, float)):
        fail(f"{run / 'metrics.jsonl'}: the last step has no elapsed_s")
    return round(float(elapsed), 1)


def entry(run, reference):
    row = accuracies(run)
    row["train_s"] = train_s(run, reference)
    row["final_loss"] = final_loss(run)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, required=True)
    for side in ["ours", "ref"]:
        for kind in ["mixlora", "lora"]:
            p.add_argument(f"--{side}-{kind}", type=pathlib.Path, required=True)
    p.add_argument("--json", type=pathlib.Path)
    a = p.parse_args()
    doc = {
        "seed": a.seed,
        "ours": {"mixlora": entry(a.ours_mixlora, False), "lora": entry(a.ours_lora, False)},
        "reference": {"mixlora": entry(a.ref_mixlora, True), "lora": entry(a.ref_lora, True)},
    }
    cols = TASKS + ["avg", "train_s", "final_loss"]
    print("| run | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for kind in ["mixlora", "lora"]:
        for side in ["ours", "reference"]:
            r = doc[side][kind]
            print(f"| {kind}, {side} | " + " | ".join(f"{r[c]}" for c in cols) + " |")
        d = {c: doc["ours"][kind][c] - doc["reference"][kind][c] for c in cols}
        print(f"| {kind}, ours - reference | " + " | ".join(f"{d[c]:+.4g}" for c in cols) + " |")
    for kind in ["mixlora", "lora"]:
        gap = doc["ours"][kind]["avg"] - doc["reference"][kind]["avg"]
        verdict = "within 1 point" if abs(gap) <= 1.0 else "NOT within 1 point"
        print(f"{kind}: average {gap:+.2f} points against the reference: {verdict}")
    if a.json:
        a.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
