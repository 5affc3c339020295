"""Recording overhead: median step time with and without `outcore.record()`, side by side.

    .venv/bin/python benchmarks/record_overhead.py [--steps 7]

Plain and recorded steps alternate on the same workload, so machine noise hits both;
the figure is the ratio of medians after one warm-up step each.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import outcore
from outcore import workloads

CASES = [
    ("mlp", dict(batch=256)),
    ("resnet18", dict(batch=16, image_size=128)),
    ("resnet50", dict(batch=8, image_size=128)),
    ("gpt2-tiny", dict(batch=8, seq_len=128)),
    ("gpt2", dict(batch=2, seq_len=128)),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | batch | functions | plain step (ms) | recorded step (ms) | overhead | per function (us) |")
    print("|---|---|---|---|---|---|---|")
    for name, kw in CASES:
        w = workloads.build(name, optimizer="adam", **kw)
        w.step()
        plain, recorded = [], []
        n_functions = 0
        for _ in range(args.steps + 1):
            t = time.perf_counter(); w.step(); plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            with outcore.record() as rec:
                w.step()
            recorded.append(time.perf_counter() - t)
            n_functions = len(rec.trace.functions)
        p, r = statistics.median(plain[1:]), statistics.median(recorded[1:])
        print(f"| {name} | {kw['batch']} | {n_functions} | {p * 1e3:.1f} | {r * 1e3:.1f} | "
              f"{(r / p - 1) * 100:+.1f}% | {(r - p) / n_functions * 1e6:.1f} |")


if __name__ == "__main__":
    main()
