#!/usr/bin/env python3
"""Summarises the routing files that `mixlora eval --routing` writes (per task, per layer, the share
of (token, slot) pairs each expert received), one Markdown row per file:

- max share: the busiest expert's share in a layer (0.5 under top-2 means it is in every token's
  top-2), averaged over layers, and its largest value;
- min share: the idlest expert's share, averaged over layers;
- entropy: the normalised entropy of a layer's expert shares (1 = perfectly even), averaged;
- task distance: the largest total-variation distance between two tasks' expert shares in a layer
  (0 = the tasks are routed identically), averaged over layers, and its largest value.

    scripts/routing-stats.py NAME=routing.json [NAME=routing.json ...]

Python 3 standard library only.
"""

import json
import math
import sys


def stats(path):
    r = json.load(open(path))
    tasks = r["tasks"]
    names = sorted(tasks)
    layers, experts = r["layers"], r["num_experts"]
    maxs, mins, ents, dists = [], [], [], []
    for layer in range(layers):
        mean = [sum(tasks[t][layer][e] for t in names) / len(names) for e in range(experts)]
        total = sum(mean)
        mean = [m / total for m in mean]
        maxs.append(max(mean))
        mins.append(min(mean))
        if experts > 1:
            ents.append(-sum(m * math.log(m) for m in mean if m > 0) / math.log(experts))
        dist = 0.0
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                pa, pb = tasks[a][layer], tasks[b][layer]
                dist = max(dist, 0.5 * sum(abs(x - y) for x, y in zip(pa, pb)))
        dists.append(dist)
    n = float(layers)
    ent = sum(ents) / n if ents else None  # undefined with a single expert
    return sum(maxs) / n, max(maxs), sum(mins) / n, ent, sum(dists) / n, max(dists)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("| run | max share (mean / largest) | min share | entropy | task distance (mean / largest) |")
    print("|---|---:|---:|---:|---:|")
    for arg in sys.argv[1:]:
        name, _, path = arg.rpartition("=")
        mx, mx_top, mn, ent, dist, dist_top = stats(path)
        ent = "—" if ent is None else f"{ent:.2f}"
        print(f"| {name or path} | {mx:.2f} / {mx_top:.2f} | {mn:.3f} | {ent} | {dist:.3f} / {dist_top:.3f} |")


if __name__ == "__main__":
    main()
