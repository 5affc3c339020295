"""The OutOfCore made before the model (built under `ooc.building()`, as the README
advises) against made after it (as `outcore bench` does), each run in a fresh process,
the two taking turns round after round. Prints per run the median replayed step (from
the fourth iteration on), the allocator's trims and the page faults per step, the
report's rss+ against its base (NOTE [The process's base] in run/ooc.py, rules 4 and 5),
the base, and the process's peak resident set (VmHWM, building and the first iteration
included).

    .venv/bin/python benchmarks/build_order.py                        # ResNet-50 64x64, a quarter
    .venv/bin/python benchmarks/build_order.py --model gpt2 --size 256 --batch 2 --budget 1000MiB
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def child(order: str, model: str, size: int, batch: int, budget: str, steps: int) -> dict:
    import outcore
    from outcore.workloads import build
    sizes = {"image_size": size} if model.startswith("resnet") else {"seq_len": size}
    if order == "before":
        ooc = outcore.OutOfCore(budget=budget)
        with ooc.building():
            w = build(model, batch=batch, optimizer="sgd", seed=0, **sizes)
    else:
        w = build(model, batch=batch, optimizer="sgd", seed=0, **sizes)
        ooc = outcore.OutOfCore(budget=budget)
    times = []
    with ooc:
        for _ in range(steps):
            start = time.perf_counter()
            with ooc.iteration():
                w.step()
            times.append(time.perf_counter() - start)
        report = ooc.report()
    later = report.iterations[3:]
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return {"step_s": statistics.median(times[3:]),
            "trims": statistics.median(it.trims for it in later),
            "faults": statistics.median(it.page_faults for it in later),
            "rss_plus": statistics.median(it.rss_above_start for it in later),
            "bound": report.rss_bound, "base": report.rss_start, "adopted": report.rss_adopted,
            "hwm": hwm, "modes": [it.mode for it in report.iterations]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=64, help="image size or sequence length")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--budget", default="169MiB")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.size, args.batch, args.budget,
                               args.steps)))
        return
    mib = 2 ** 20
    print(f"{args.model} size {args.size} batch {args.batch}, budget {args.budget}, "
          f"{args.steps} iterations per run")
    print("round  OutOfCore      step (s)  trims  faults  rss+ (MiB)  bound  base   adopted  "
          "VmHWM (MiB)")
    for r in range(1, args.rounds + 1):
        for order in ("before", "after"):
            out = subprocess.run([sys.executable, __file__, "--child", order, "--model",
                                  args.model, "--size", str(args.size), "--batch",
                                  str(args.batch), "--budget", args.budget, "--steps",
                                  str(args.steps)], capture_output=True, text=True, check=True)
            d = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r:5d}  {order + ' the model':14s} {d['step_s']:8.2f}  {d['trims']:5.0f}  "
                  f"{d['faults'] / 1000:5.0f}k  {d['rss_plus'] / mib:10.0f}  "
                  f"{d['bound'] / mib:5.0f}  {d['base'] / mib:5.0f}  {d['adopted'] / mib:7.0f}  "
                  f"{d['hwm'] / mib:11.0f}", flush=True)


if __name__ == "__main__":
    main()
