"""PyTorch's huge pages under a RAM budget: outcore as it runs by default (`import outcore`
sets THP_MEM_ALLOC_ENABLE=1, NOTE [Huge pages by default]) against outcore with
THP_MEM_ALLOC_ENABLE=0, beside plain PyTorch (PyTorch's default, 0), side by side.

    .venv/bin/python benchmarks/huge_pages.py
    .venv/bin/python benchmarks/huge_pages.py --model resnet50 --image-size 64 --fraction 0.25 --rounds 3
    .venv/bin/python benchmarks/huge_pages.py --model gpt2 --batch 2 --seq-len 256 --fraction 0.5

Every run is a fresh process (`outcore.bench.child`); each round runs the three configs
one after the other, in a rotated order, so drift of the machine falls on all of them
alike. Prints per config the median step over rounds (each run's own median of
`--steps` steps), its ratio to plain PyTorch's, page faults per step, peak RSS, and
what the report said about huge pages.
"""
from __future__ import annotations

import argparse
import statistics
import sys

from outcore.bench.experiments import memory_on_meta, shape_of
from outcore.bench.runner import run_config

MIB = 2 ** 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=128, help="CNNs (default 128)")
    ap.add_argument("--seq-len", type=int, default=256, help="GPT-2 models (default 256)")
    ap.add_argument("--fraction", type=float, default=0.25, help="budget / in-core peak")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--policy", default="auto")
    args = ap.parse_args()
    gpt = args.model.startswith("gpt2")
    shape = shape_of(args.model, None if gpt else args.image_size, args.seq_len if gpt else None)
    peak = memory_on_meta(args.model, args.batch, "in-core", **shape)["peak"]
    budget = int(peak * args.fraction)
    base = {"model": args.model, "batch": args.batch, "steps": args.steps, "warmup": 1, **shape}
    configs = {
        "plain PyTorch": dict(base, variant="in-core"),
        "outcore (default)": dict(base, variant="outcore", policy=args.policy, budget=budget),
        "outcore, THP_MEM_ALLOC_ENABLE=0": dict(base, variant="outcore", policy=args.policy,
                                                budget=budget, env={"THP_MEM_ALLOC_ENABLE": "0"}),
    }
    print(f"{args.model} {shape} batch {args.batch}: in-core peak {peak / MIB:.0f} MiB, "
          f"budget {budget / MIB:.0f} MiB ({args.fraction:g} of it), {args.rounds} rounds",
          flush=True)
    names = list(configs)
    results: dict = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            result = run_config(configs[name])
            if "error" in result:
                print(f"{name}: FAILED\n{result['error']}", file=sys.stderr)
                return 1
            results[name].append(result)
            print(f"  round {r + 1} {name}: {result['step_s']:.2f} s/step, "
                  f"{result['page_faults'] / 1000:.0f}k faults/step", flush=True)
    plain = statistics.median(x["step_s"] for x in results["plain PyTorch"])
    print("\n| run | step (s), median (runs) | speed vs plain | faults / step | peak RSS (MiB) | huge pages |")
    print("|---|---|---|---|---|---|")
    for name in names:
        rs = results[name]
        step = statistics.median(x["step_s"] for x in rs)
        runs = ", ".join(f"{x['step_s']:.2f}" for x in rs)
        faults = statistics.median(x["page_faults"] for x in rs)
        rss = ", ".join(f"{x['peak_rss'] / MIB:.0f}" for x in rs)
        print(f"| {name} | {step:.2f} ({runs}) | {plain / step:.2f}x | {faults / 1000:.0f}k | {rss} "
              f"| {rs[0].get('huge_pages', '-').split(' (')[0].split(':')[0]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
