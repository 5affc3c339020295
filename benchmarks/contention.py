"""What a transfer costs the compute running beside it, measured on a real step.

The simulator charges compute `transfer_cpu_share` seconds per second of transfer that
runs beside it when no core is free for the mover (NOTE [No core to spare] in
simulate/engine.py). This measures what a replay really loses: the same step replays
under a budget above its peak (nothing moves: each function's duration alone) and under
`--fraction` of its peak, each in a fresh process; every function of the second is
matched with its median duration in the first and with the share of it during which a
transfer ran (the union of both directions, from the StepLog). It prints the ratio of
the durations grouped by how much of the function ran beside a transfer, and the least
squares fit d = slowdown x alone + share x beside, where `slowdown` takes up what
changes every function alike (the allocator, the machine drifting between the runs)
and `share` is the compute lost per second of transfer. `beside` is counted as the
simulator counts it (NOTE [No core to spare]): over the function's unstretched time,
alone x (the part of d that ran beside a transfer), so `share` is the figure
Machine.transfer_cpu_share takes.

The replay that moves nothing runs passive (the executor follows the op sequence
without tracking), so it shows no executor time around the ops; the ops' own durations
compare like for like.

    .venv/bin/python benchmarks/contention.py                   # ResNet-50 64x64 batch 64
    .venv/bin/python benchmarks/contention.py --fraction 0.25 --memory keep
    .venv/bin/python benchmarks/contention.py --model gpt2 --seq-len 256 --batch 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def child(args) -> None:
    import torch

    import outcore
    from outcore.workloads import build

    torch.manual_seed(0)
    w = build(args.model, batch=args.batch, optimizer="sgd", device="cpu",
              image_size=args.image_size, seq_len=args.seq_len, seed=0)
    memory = {"trim": True, "keep": False}[args.memory]
    runs = []
    with outcore.OutOfCore(budget=args.budget, return_freed_memory=memory) as ooc:
        for _ in range(args.replays + 6):
            with ooc.iteration():
                w.step()
            it = ooc.report().iterations[-1]
            if it.mode == "replay" and it.deviation is None:
                log = ooc._replayed("benchmarks/contention.py")[2]       # its StepLog
                runs.append({"functions": beside_transfers(log), "step_s": it.seconds,
                             "wait_s": it.wait_s, "faults": it.page_faults,
                             "trims": it.trims, "trimmed": it.trimmed_bytes, **around_ops(log)})
                if len(runs) == args.replays:
                    break
        peak = ooc.report().in_core_peak
    print(json.dumps({"runs": runs, "in_core_peak": peak}))


def beside_transfers(log) -> list[tuple[int, float, float]]:
    """(function index, duration, seconds of it during which some transfer ran)."""
    busy: list[list[float]] = []                 # the union of the transfers' spans
    for start, end in sorted((s, e) for _, _, _, s, e in log.transfers):
        if busy and start <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], end)
        else:
            busy.append([start, end])
    out, j = [], 0
    for index, _, started, returned, *_ in log.rows():
        while j < len(busy) and busy[j][1] <= started:
            j += 1
        beside, k = 0.0, j
        while k < len(busy) and busy[k][0] < returned:
            beside += min(returned, busy[k][1]) - max(started, busy[k][0])
            k += 1
        out.append((index, returned - started, beside))
    return out


def around_ops(log) -> dict:
    """Seconds per step in the ops themselves, in the executor around them (from
    taking a function up to starting its op, waits included, and after it returns),
    and between functions (the framework's own Python, autograd)."""
    ops = around = between = 0.0
    last = log.origin
    for _, taken, started, returned, done, *_ in log.rows():
        ops += returned - started
        around += (started - taken) + (done - returned)
        between += taken - last
        last = done
    return {"ops_s": ops, "around_s": around, "between_s": between}


def fault_cost(nbytes: int = 256 << 20) -> float:
    """Seconds per page fault here: the first touch of each page of a fresh anonymous
    mapping (the fault and the kernel's zeroing), less the same loop over resident
    pages; the median of 3."""
    import mmap
    page = mmap.PAGESIZE
    costs = []
    for _ in range(3):
        m = mmap.mmap(-1, nbytes)
        view = memoryview(m)
        start = time.perf_counter()
        for off in range(0, nbytes, page):
            view[off] = 1
        first = time.perf_counter() - start
        start = time.perf_counter()
        for off in range(0, nbytes, page):
            view[off] = 2
        again = time.perf_counter() - start
        view.release()
        m.close()
        costs.append((first - again) / (nbytes // page))
    return statistics.median(costs)


def fit(rows) -> tuple[float, float]:
    """Least squares of d = a x alone + s x beside over rows (alone, d, beside)."""
    aa = sum(a * a for a, _, _ in rows)
    ab = sum(a * b for a, _, b in rows)
    bb = sum(b * b for _, _, b in rows)
    ad = sum(a * d for a, d, _ in rows)
    bd = sum(b * d for _, d, b in rows)
    det = aa * bb - ab * ab
    if det <= 0:
        raise SystemExit("no function ran beside a transfer: nothing to fit (a lower --fraction?)")
    return (ad * bb - bd * ab) / det, (bd * aa - ad * ab) / det


def run_child(args, budget: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--budget", str(budget), "--model", args.model,
           "--batch", str(args.batch), "--replays", str(args.replays), "--memory", args.memory]
    for flag, value in (("--image-size", args.image_size), ("--seq-len", args.seq_len)):
        if value is not None:
            cmd += [flag, str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the run at budget {budget} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["runs"]:
        raise SystemExit(f"the run at budget {budget} never replayed without a deviation")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, help="for the CNNs (default 64)")
    p.add_argument("--seq-len", type=int, help="for the GPT-2 models (their default 1024)")
    p.add_argument("--fraction", type=float, default=0.5, help="budget as a fraction of the peak")
    p.add_argument("--replays", type=int, default=4)
    p.add_argument("--memory", choices=("trim", "keep"), default="trim",
                   help="return_freed_memory: trim (the default) or keep (False)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    from outcore.workloads import SPECS
    if args.image_size is None and "image_size" in SPECS[args.model].sizes:
        args.image_size = 64
    if args.child:
        child(args)
        return
    alone = run_child(args, 1 << 40)
    budget = int(args.fraction * alone["in_core_peak"])
    moving = run_child(args, budget)
    by: dict[int, list[float]] = {}
    for run in alone["runs"]:
        for k, d, _ in run["functions"]:
            by.setdefault(k, []).append(d)
    base = {k: statistics.median(v) for k, v in by.items()}
    # beside, counted over the unstretched time: alone x (the part of d beside a transfer)
    rows = [(base[k], d, base[k] * b / d if d > 0 else 0.0)
            for run in moving["runs"] for k, d, b in run["functions"] if k in base]
    shape = (f"{args.image_size}x{args.image_size}" if args.image_size else
             f"sequence {args.seq_len}" if args.seq_len else "")
    print(f"{args.model} {shape} batch {args.batch}, budget "
          f"{budget / 2**20:.0f} MiB ({args.fraction} of the peak), return_freed_memory "
          f"{args.memory}, {len(moving['runs'])} replays against {len(alone['runs'])} that move nothing")
    print("| per step, medians | step | ops | executor around them (waits included) | waits "
          "| between functions | page faults | trims (given back) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in (("moving nothing", alone), ("under the budget", moving)):
        med = {k: statistics.median(x[k] for x in r["runs"])
               for k in ("step_s", "ops_s", "around_s", "wait_s", "between_s", "faults", "trims",
                         "trimmed")}
        print(f"| {name} | {med['step_s']:.3f} | {med['ops_s']:.3f} | {med['around_s']:.3f} | "
              f"{med['wait_s']:.3f} | {med['between_s']:.3f} | {med['faults'] / 1e3:.0f}k | "
              f"{med['trims']:.0f} ({med['trimmed'] / 2**20:.0f} MiB) |")
    print()
    print("| functions | count per step | alone (s per step) | now (s per step) | ratio |")
    print("|---|---|---|---|---|")
    n = len(moving["runs"])
    groups = (("no transfer beside", lambda f: f == 0), ("under half beside", lambda f: 0 < f < 0.5),
              ("half or more beside", lambda f: f >= 0.5))
    for name, test in groups:
        sel = [(a, d) for a, d, b in rows if test(b / a if a > 0 else 0.0)]
        if sel:
            alone_s, now_s = sum(a for a, _ in sel) / n, sum(d for _, d in sel) / n
            print(f"| {name} | {len(sel) / n:.0f} | {alone_s:.3f} | {now_s:.3f} | {now_s / alone_s:.2f} |")
    slowdown, share = fit(rows)
    beside = sum(b for _, _, b in rows) / n
    print(f"fit: duration = {slowdown:.2f} x alone + {share:.2f} x beside a transfer "
          f"({beside:.3f} s per step of the functions' time alone lay beside one)")
    print(f"a page fault costs {fault_cost() * 1e6:.1f} µs here (first touch of a fresh mapping)")


if __name__ == "__main__":
    main()
