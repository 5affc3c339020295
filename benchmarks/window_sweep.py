"""How far ahead the window planner should look: simulated iteration time per window size.

    .venv/bin/python benchmarks/window_sweep.py [--fractions 0.5,0.25] [--disk-GBps 2.4]

Each workload's step is recorded on the CPU (after one warm-up step, so durations are
measured and lazily created state exists), planned at budgets that are fractions of its
in-core peak (less the arrays OutOfCore pins, as the executor plans), and simulated on
`cpu-disk` (one shared link). Rows: the paper's adaptive window at several multiples of
the budget, `fixed` at several k, and an unlimited window. Cells: simulated iteration
time as a multiple of the in-core step, and GB read back. The table in docs/planning.md
("How far ahead to look") was made with this script.
"""
from __future__ import annotations

import argparse

import torch

import outcore
from outcore.run.ooc import planned_budget
from outcore.simulate import PRESETS, Machine
from outcore.workloads import build

WORKLOADS = [
    ("resnet50", dict(batch=64, image_size=64)),
    ("resnet50", dict(batch=64, image_size=128)),
    ("resnet18", dict(batch=128, image_size=64)),
    ("gpt2", dict(batch=2, seq_len=256)),
]

VARIANTS = ([("adaptive", {"window_factor": f}) for f in (1.5, 3, 6, 12)]
            + [("fixed", {"k": k}) for k in (4, 8, 16)]
            + [("adaptive", {"window_factor": None})])


def label(policy, opts):
    if policy == "fixed":
        return f"fixed k={opts['k']}"
    f = opts["window_factor"]
    return "unlimited window" if f is None else f"adaptive {f}x budget"


def record(name, shape):
    torch.manual_seed(0)
    w = build(name, **shape)
    w.step()
    with outcore.record() as rec:
        w.step()
    return rec.trace


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.5,0.25")
    parser.add_argument("--disk-GBps", type=float, default=None,
                        help="disk speed both ways (default: the cpu-disk preset's)")
    args = parser.parse_args()
    base = PRESETS["cpu-disk"]
    machine = base if args.disk_GBps is None else Machine(
        **{**base.__dict__, "link_in": args.disk_GBps * 1e9, "link_out": args.disk_GBps * 1e9})
    fractions = [float(f) for f in args.fractions.split(",")]
    print(f"machine {machine.name}: link {machine.link_in / 1e9:.2f}/{machine.link_out / 1e9:.2f} GB/s, "
          f"shared={machine.shared_link}")
    for name, shape in WORKLOADS:
        trace = record(name, shape)
        peak = trace.peak(actual=True)[0]
        shape_s = ", ".join(f"{k} {v}" for k, v in shape.items())
        print(f"\n{name} ({shape_s}): peak {peak / 2**20:.0f} MiB, {len(trace.functions)} functions; "
              "cells: iteration / in-core step, GB read")
        print("| plan | " + " | ".join(f"budget {f} x peak" for f in fractions) + " |")
        print("|---|" + "---|" * len(fractions))
        for policy, opts in VARIANTS:
            cells = []
            for frac in fractions:
                budget = planned_budget(trace, int(peak * frac))
                kw = dict(opts)
                if policy == "adaptive":
                    factor = kw.pop("window_factor")
                    kw["window"] = int(factor * budget) if factor else 2**62
                try:
                    s = outcore.plan(trace, budget, policy, **kw)
                except outcore.InfeasibleBudget:
                    cells.append("infeasible")
                    continue
                sim = outcore.simulate(trace, s, machine)
                cells.append(f"{sim.iteration_time_s / sim.in_core_time_s:.2f}, {s.bytes_in / 1e9:.2f}")
            print(f"| {label(policy, opts)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
