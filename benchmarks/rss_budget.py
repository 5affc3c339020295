"""The whole process's resident set against the budget: peak RSS above the RSS before
the first iteration, recording iterations included, in fresh processes, for a CNN and a
transformer at a fraction of their in-core peak, beside plain PyTorch.

    .venv/bin/python benchmarks/rss_budget.py
    .venv/bin/python benchmarks/rss_budget.py --cases resnet50:64:64 --modes trim,eager

A case is model:batch[:image size or sequence length]. Each child builds the workload,
resets its peak resident set (/proc/self/clear_refs), notes VmRSS (`start`), makes the
OutOfCore (or not, for `plain`), runs `--iterations` steps and reports VmHWM, the median
step time after the first two (outcore's recording iterations) and the allocator's trims. The
in-core peak comes from a recording in a separate child.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

MIB = 2 ** 20


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _workload(case: str, optimizer: str):
    from outcore import workloads
    name, batch, *size = case.split(":")
    kwargs = {}
    if size:
        kwargs["seq_len" if name.startswith("gpt2") else "image_size"] = int(size[0])
    return workloads.build(name, batch=int(batch), optimizer=optimizer, **kwargs)


def child(args) -> dict:
    import torch
    import outcore
    torch.set_num_threads(2)
    w = _workload(args.case, args.optimizer)
    if args.mode == "peak":
        w.step()                                    # lazily created optimizer state
        with outcore.record() as rec:
            w.step()
        return {"peak": rec.trace.peak(actual=True)[0]}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _status("VmRSS")
    ooc = None
    if args.mode != "plain":
        freed = {"trim": True}.get(args.mode, args.mode)
        ooc = outcore.OutOfCore(args.budget, policy=args.policy, return_freed_memory=freed)
    seconds = []
    for _ in range(args.iterations):
        began = time.perf_counter()
        if ooc is None:
            w.step()
        else:
            with ooc.iteration():
                w.step()
        seconds.append(time.perf_counter() - began)
    out = {"start": start, "peak": _status("VmHWM"), "seconds": seconds, "trims": None}
    if ooc is not None:
        report = ooc.report()
        out["report"] = str(report)
        out["unmanaged"] = max(it.unmanaged for it in report.iterations)
        out["trims"] = sum(it.trims for it in report.iterations)
        ooc.close()
    return out


def _run(case, mode, optimizer, iterations, budget=0, policy="auto"):
    cmd = [sys.executable, __file__, "--child", mode, "--case", case, "--optimizer", optimizer,
           "--iterations", str(iterations), "--budget", str(budget), "--policy", policy]
    from outcore.memory.pages import plain_environment      # plain PyTorch: its own setting
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env=plain_environment() if mode in ("plain", "peak") else None).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="resnet50:64:64,gpt2:4:256")
    ap.add_argument("--modes", default="trim,eager")
    ap.add_argument("--fraction", type=float, default=0.25, help="budget / in-core peak")
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--policy", default="auto", help="OutOfCore's policy (default auto)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return 0
    print(f"{args.iterations} iterations ({args.optimizer}); budget = {args.fraction} x in-core peak; "
          "peak and bound above the RSS before the first iteration")
    print("| case | in-core peak | budget | run | peak RSS - start | target 1.2 x budget + 64 MiB | "
          "within | unmanaged (report) | steps after the second (median) | trims |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        peak = _run(case, "peak", args.optimizer, 2)["peak"]
        budget = int(peak * args.fraction)
        bound = 1.2 * budget + 64 * MIB
        for mode in ["plain"] + args.modes.split(","):
            r = _run(case, mode, args.optimizer, args.iterations, budget, args.policy)
            grown = r["peak"] - r["start"]
            unmanaged = f"{r['unmanaged'] / MIB:.0f} MiB" if "unmanaged" in r else "-"
            within = "-" if mode == "plain" else ("yes" if grown <= bound else "no")
            later = r["seconds"][2:] or r["seconds"]
            trims = "-" if r["trims"] is None else str(r["trims"])
            print(f"| {case} | {peak / MIB:.0f} MiB | {budget / MIB:.0f} MiB | {mode} | "
                  f"{grown / MIB:.0f} MiB | {bound / MIB:.0f} MiB | {within} | {unmanaged} "
                  f"| {statistics.median(later):.2f} s | {trims} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
