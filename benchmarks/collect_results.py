"""Gather the tables benchmarks/results.sh wrote into one markdown appendix (its last line).

    .venv/bin/python benchmarks/collect_results.py docs/results/current benchmarks/results.sh \
        > docs/results/current/tables.md

Every table is copied from the run's own markdown (figures as measured); the prediction
table lists, for every outcore run, the simulator's step time against the measured one.
"""
from __future__ import annotations

import glob
import json
import os
import statistics
import sys

MiB = 2 ** 20


def main(folder: str = "docs/results/current", script: str = "benchmarks/results.sh") -> None:
    results = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        if "rows" in data:
            results.append((os.path.basename(path)[:-5], data))
    print(f"# Tables from `{script}`\n")
    print("Each section is one `outcore bench` command (shown under its heading), copied "
          "from its own markdown output; PNGs beside this file.\n")
    for name, data in results:
        print(f"## {name}\n")
        with open(os.path.join(folder, name + ".md")) as f:
            print(f.read())
        if os.path.exists(os.path.join(folder, name + ".png")):
            print(f"![{name}]({name}.png)\n")
    print("## Prediction: simulated against measured step time\n")
    print("The simulator (`cpu-disk`, one shared link at the disk speeds measured at the start of "
          "each command, the trace's op durations and host time scaled to the measured in-core "
          "step at the same batch, with huge pages as outcore runs its ops where `bench curve` "
          "measured that (NOTE [The predictions' compute]), the executor's cost per op, plus "
          "the transfers at the iteration's edges) against the measured median step.\n")
    print("| experiment | batch | policy | budget (MiB) | measured (s) | predicted (s) | error |")
    print("|---|---|---|---|---|---|---|")
    errors = []
    for name, data in results:
        for row in data["rows"]:
            if "predicted_s" not in row:
                continue
            errors.append(row["prediction_error"])
            print(f"| {name} | {row['batch']} | {row['policy']} | {row['budget'] / MiB:.0f} | "
                  f"{row['step_s']:.2f} | {row['predicted_s']:.2f} | {100 * row['prediction_error']:+.0f}% |")
    if errors:
        within = sum(1 for e in errors if abs(e) <= 0.15)
        print(f"\n{len(errors)} outcore runs: median error {100 * statistics.median(errors):+.0f}%, "
              f"median |error| {100 * statistics.median(abs(e) for e in errors):.0f}%, "
              f"{within} of {len(errors)} within 15%.")


if __name__ == "__main__":
    main(*sys.argv[1:3])
