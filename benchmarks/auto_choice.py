"""Which policy `auto` picks, and what the others would have given: simulated iteration
time per screened configuration, auto's choice and its planning time.

    .venv/bin/python benchmarks/auto_choice.py [--fractions 0.75,0.5,0.25] [--recompute] [--traces DIR]

The workloads and the recording are window_sweep.py's (CPU, after one warm-up step, so
durations are measured); budgets are fractions of the in-core peak, less what OutOfCore
pins (planned_budget). Cells: the simulated iteration on `cpu-disk` as a multiple of the
in-core step; the configuration auto chose is marked with *. "plan" is auto's wall
time (all its screening included). The table in docs/planning.md ("Which policy auto
picks") was made with this script. With --recompute it times OutOfCore's planning with
its defaults instead (recompute.choose; docs/planning.md, "Recompute").
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import outcore
from outcore.plan.policies.auto import SCREEN
from outcore.trace import io as trace_io
from outcore.run.ooc import planned_budget
from window_sweep import WORKLOADS, record


def _label(name: str, options: dict) -> str:
    """A column's name: the policy and what its configuration sets."""
    if "k" in options:
        return f"{name} k={options['k']}"
    if "window_factor" in options:
        return f"{name} {options['window_factor']}x budget"
    parts = [name]
    if "wait_order" in options:
        parts.append(f"{options['wait_order']} order")
    if options.get("outputs") == "late":
        parts.append("outputs late")
    return " ".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.75,0.5,0.25")
    parser.add_argument("--traces", metavar="DIR",
                        help="load the recorded traces from DIR, recording and saving there "
                             "those it lacks: compare two commits on the same traces")
    parser.add_argument("--recompute", action="store_true",
                        help="instead of the table: how long OutOfCore's planning takes with "
                             "its defaults (recompute.choose: auto, recompute='auto'), twice "
                             "per workload and budget")
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    if args.recompute:
        return planning_times(fractions, args.traces)
    print("| workload | budget / peak | " + " | ".join(_label(n, o) for n, o in SCREEN) +
          " | near ties, end_keep_share 1.0 | auto's gain over adaptive | plan |")
    print("|---|---|" + "---|" * (len(SCREEN) + 1) + "---|---|")
    for row, trace, budget in cases(fractions, args.traces):
        try:
            start = time.perf_counter()
            s = outcore.plan(trace, budget)
            took = time.perf_counter() - start
        except outcore.InfeasibleBudget:
            print(f"| {row} | infeasible |")
            continue
        if s.options.get("in_core"):
            print(f"| {row} | fits in-core |")
            continue
        in_core = outcore.simulate(trace, s).in_core_time_s
        times = [seconds for _, _, seconds in s.options["screened"]]
        if times == [None]:                       # one configuration alone: not simulated
            times = [outcore.simulate(trace, s).iteration_time_s]
        chosen = times.index(min(times))          # auto's rule: fastest, ties earliest
        cells = ["not screened"] * len(SCREEN)     # auto screens fewer on long traces
        for i, seconds in enumerate(times[:len(SCREEN)]):
            cells[i] = f"{seconds / in_core:.3f}{'*' if i == chosen else ''}"
        # auto's NOTE [Shares at the end]: the best of the near ties tried again, if any
        again = times[len(SCREEN):]
        best = min(range(len(again)), key=again.__getitem__, default=None)
        cells.append("not tried" if best is None else f"{again[best] / in_core:.3f}"
                     f"{'*' if len(SCREEN) + best == chosen else ''}")
        gain = times[0] / times[chosen]
        print(f"| {row} | " + " | ".join(cells) + f" | {gain:.3f}x | {took:.2f} s |")


def cases(fractions, traces=None):
    """(the row's first two cells, trace, budget) per workload and fraction: budgets are
    fractions of the in-core peak, less what OutOfCore pins. `traces`: a folder that
    keeps the recorded traces (loaded if there, recorded and saved if not)."""
    for name, shape in WORKLOADS:
        trace = _trace(name, shape, traces)
        peak = trace.peak(actual=True)[0]
        shape_s = " ".join(f"{k}={v}" for k, v in shape.items())
        for frac in fractions:
            yield f"{name} {shape_s} | {frac}", trace, planned_budget(trace, int(peak * frac))


def _trace(name, shape, folder):
    if folder is None:
        return record(name, shape)
    path = Path(folder) / f"{name}-{'-'.join(f'{k}{v}' for k, v in shape.items())}.json"
    if path.exists():
        return trace_io.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    trace = record(name, shape)
    trace_io.save(trace, path)
    return trace


def planning_times(fractions, traces=None) -> None:
    """OutOfCore's planning with its defaults, timed: auto on cpu-disk with recompute
    "auto" (the trace as recorded, then each rewritten one)."""
    from outcore.plan import recompute
    print("| workload | budget / peak | recomputed | plan (s), two runs |")
    print("|---|---|---|---|")
    for row, trace, budget in cases(fractions, traces):
        took = []
        try:
            for _ in range(2):
                start = time.perf_counter()
                chosen, _, _ = recompute.choose(trace, budget, mode="auto", machine="cpu-disk")
                took.append(time.perf_counter() - start)
        except outcore.InfeasibleBudget:
            print(f"| {row} | infeasible |")
            continue
        print(f"| {row} | {len(chosen)} | " + ", ".join(f"{t:.2f}" for t in took) + " |")


if __name__ == "__main__":
    main()
