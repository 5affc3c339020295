"""Recompute on this machine: in-core against outcore with recompute off, auto and all, at a
fraction of the in-core peak, side by side (fresh processes, rounds alternating, medians).

    .venv/bin/python benchmarks/recompute_cpu.py [--cases resnet50:64:64,resnet50:64:128]
        [--fraction 0.25] [--rounds 3] [--steps 3] [--modes off,auto,all]

A case is model:batch:image size. Each run is one `outcore.bench.child` (the bench's own
child: the same workload, warm-up and timing as `outcore bench curve`). Reported per
variant: the median step time, its ratio to in-core's median, and the bytes read and
written and recomputed per step (outcore's medians).
"""
from __future__ import annotations

import argparse
import statistics
import sys

from outcore.bench.experiments import memory_on_meta
from outcore.bench.runner import run_config
from outcore.units import format_bytes

MODES = {"off": False, "auto": "auto", "all": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="resnet50:64:64")
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", default="off,auto,all")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    for case in args.cases.split(","):
        model, batch, size = case.split(":")
        batch, size = int(batch), int(size)
        peak = memory_on_meta(model, batch, "in-core", image_size=size)["peak"]
        budget = int(peak * args.fraction)
        base = {"model": model, "batch": batch, "image_size": size, "optimizer": "sgd",
                "steps": args.steps, "warmup": 1, "device": "cpu"}
        variants = [("in-core", dict(base, variant="in-core"))]
        variants += [(f"outcore recompute={m}", dict(base, variant="outcore", policy="auto",
                                                     budget=budget, recompute=MODES[m]))
                     for m in modes]
        results: dict = {name: [] for name, _ in variants}
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for name, cfg in order:
                out = run_config(cfg)
                if "error" in out:
                    sys.exit(f"{case} {name}: {out['error']}")
                results[name].append(out)
                print(f"round {r + 1} {name}: {out['step_s']:.3f} s", file=sys.stderr, flush=True)
        incore = statistics.median(o["step_s"] for o in results["in-core"])
        print(f"\n{case}, budget {format_bytes(budget)} ({args.fraction:g} of the in-core peak "
              f"{format_bytes(peak)}), {args.rounds} rounds of {args.steps} steps\n")
        print("| variant | step s (median) | vs in-core | read/step | written/step | recomputed/step "
              "| step s per round |")
        print("|---|---|---|---|---|---|---|")
        for name, _ in variants:
            outs = results[name]
            step = statistics.median(o["step_s"] for o in outs)
            cells = [f"{incore / step:.2f}x"]
            if name == "in-core":
                cells += ["", "", ""]
            else:
                cells += [format_bytes(int(statistics.median(o["read"] for o in outs))),
                          format_bytes(int(statistics.median(o["written"] for o in outs))),
                          format_bytes(int(statistics.median(o.get("recomputed", 0) for o in outs)))]
            rounds = ", ".join(f"{o['step_s']:.3f}" for o in outs)
            print(f"| {name} | {step:.3f} | " + " | ".join(cells) + f" | {rounds} |")


if __name__ == "__main__":
    main()
