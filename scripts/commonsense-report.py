#!/usr/bin/env python3
"""Summarises the runs of scripts/commonsense.sh: reads RUNS/{base,mixlora-seedN,lora-seedN}/eval.json
(and each run's train.log for its parameter count and its train_config.toml for the LoRA rank),
writes the JSON of issue 7 and prints the Markdown table (accuracy per task and average, mean ±
sample std over seeds, the runs counted).

    scripts/commonsense-report.py RUNS [--json benches/results/commonsense-smollm2.json]
    scripts/commonsense-report.py --ablations DIR [DIR ...] [--json FILE]

With --ablations, each DIR is an output folder of scripts/commonsense-ablations.sh: one row per
variant (its accuracies, epochs, learning rate, rank, experts, aux coefficient, router init and
parameter count, read from the variant's eval.json, train_config.toml and train.log), and the
JSON is a list of those rows.

Python 3 standard library only.
"""

import argparse
import json
import math
import pathlib
import re
import sys

TASKS = ["arc_e", "arc_c", "boolq", "obqa"]


def accuracies(path):
    report = json.loads(path.read_text())
    acc = {t["task"]: t["accuracy"] for t in report["tasks"]}
    missing = [t for t in TASKS if t not in acc]
    if missing:
        sys.exit(f"{path}: no result for {', '.join(missing)}")
    row = {t: round(acc[t], 4) for t in TASKS}
    row["avg"] = round(sum(acc[t] for t in TASKS) / len(TASKS), 4)
    return row


def params(run_dir):
    log = run_dir / "train.log"
    if not log.exists():
        return None
    m = re.search(r"(\d+) trainable parameters", log.read_text())
    return int(m.group(1)) if m else None


def rank(run_dir):
    cfg = run_dir / "train_config.toml"
    if not cfg.exists():
        return None
    m = re.search(r"^rank = (\d+)", cfg.read_text(), re.M)
    return int(m.group(1)) if m else None


def runs(root, kind):
    out = []
    for d in sorted(root.glob(f"{kind}-seed*")):
        ev = d / "eval.json"
        if not ev.exists():
            continue
        row = {"seed": int(d.name.split("seed")[1])}
        row.update(accuracies(ev))
        out.append((d, row))
    return out


def setting(run_dir, key):
    cfg = run_dir / "train_config.toml"
    m = re.search(rf"^{key} = (.+)$", cfg.read_text(), re.M) if cfg.exists() else None
    if not m:
        return None
    v = m.group(1).strip().strip('"')
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


SETTINGS = ["epochs", "lr", "adapter", "rank", "num_experts", "top_k", "aux_loss_coef", "router_init_range", "moe_impl",
            "seed", "rslora", "router_z_loss", "router_lr_scale", "expert_b_init_std"]


def ablations(dirs, json_out):
    rows = []
    for root in dirs:
        for d in sorted(p for p in root.iterdir() if (p / "eval.json").exists()):
            row = {"variant": d.name}
            row.update({k: setting(d, k) for k in SETTINGS})
            row["params"] = params(d)
            row.update(accuracies(d / "eval.json"))
            rows.append(row)
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2) + "\n")
    print("| variant | epochs | lr | params | " + " | ".join(TASKS) + " | avg |")
    print("|---|---:|---:|---:|" + "---:|" * (len(TASKS) + 1))
    for r in rows:
        cells = " | ".join(f"{100 * r[t]:.1f}" for t in TASKS + ["avg"])
        print(f"| {r['variant']} | {r['epochs']} | {r['lr']:g} | {r['params']:,} | {cells} |")


def mean_std(values):
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def fmt(values):
    mean, std = mean_std(values)
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", type=pathlib.Path, nargs="?")
    ap.add_argument("--json", type=pathlib.Path)
    ap.add_argument("--ablations", type=pathlib.Path, nargs="+")
    a = ap.parse_args()
    if a.ablations:
        return ablations(a.ablations, a.json)
    if a.runs is None:
        ap.error("RUNS is required without --ablations")
    base_eval = a.runs / "base" / "eval.json"
    if not base_eval.exists():
        sys.exit(f"{base_eval}: missing (run the base evaluation first)")
    doc = {"base": accuracies(base_eval)}
    table = ["| | runs | " + " | ".join(TASKS) + " | avg |", "|---|---:|" + "---:|" * (len(TASKS) + 1)]
    table.append(
        "| base (zero-shot) | | " + " | ".join(f"{100 * doc['base'][t]:.1f}" for t in TASKS + ["avg"]) + " |"
    )
    for kind in ["mixlora", "lora"]:
        rs = runs(a.runs, kind)
        entry = {"params": None, "runs": [r for _, r in rs]}
        if rs:
            entry["params"] = params(rs[0][0])
        if kind == "lora":
            entry = {"rank": rank(rs[0][0]) if rs else None, **entry}
        doc[kind] = entry
        if rs:
            cells = [fmt([r[t] for _, r in rs]) for t in TASKS + ["avg"]]
            seeds = ", ".join(str(r["seed"]) for _, r in rs)
            label = "MixLoRA" if kind == "mixlora" else f"LoRA r={entry['rank']}"
            table.append(f"| {label} | {len(rs)} (seeds {seeds}) | " + " | ".join(cells) + " |")
    if a.json:
        a.json.write_text(json.dumps(doc, indent=2) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
