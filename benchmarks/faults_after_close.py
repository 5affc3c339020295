"""Page faults of a plain PyTorch step after an OutOfCore was closed, against a process
that never used outcore: what close() leaves of glibc's allocator settings.

    .venv/bin/python benchmarks/faults_after_close.py [--model resnet50] [--batch 32]
        [--image-size 64] [--reps 5] [--restore both|old|new] [--modes trim eager off]

Each row is `--reps` fresh processes, run round-robin with the other rows. A process
builds the workload, then either runs 3 plain steps ("never used outcore") or trains 3
iterations in an OutOfCore with `return_freed_memory=<mode>` under a quarter of the
step's managed peak and close()s it; then it runs 1 plain warm-up step and measures 3
plain steps: page faults (getrusage minflt + majflt) per step, seconds per step, and the
resident set after them. The table shows the medians over the processes.

--restore old reproduces what close() did before stop() restored glibc's thresholds
(NOTE [What stop() restores] in src/outcore/memory/malloc.py): "trim" put back only
M_MMAP_MAX=65536 and M_TRIM_THRESHOLD=128 KiB, leaving mmap_threshold frozen at
whatever glibc's dynamic threshold had reached at start; "eager" never undid its
64 KiB thresholds. It does so by replacing malloc._restore_plan, so both behaviours run
on the same tree.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time

MiB = 2**20
WARMUP, MEASURED, BEFORE = 1, 3, 3


def _child(cfg: dict) -> dict:
    import torch  # noqa: F401

    from outcore.memory import malloc
    from outcore.workloads import build

    w = build(cfg["model"], batch=cfg["batch"], image_size=cfg["image_size"])
    out = {"wired_by_hand": False}
    if cfg["kind"] == "calibrate":
        import outcore
        w.step()
        with outcore.record() as rec:
            w.step()
        return {"managed_peak": rec.trace.peak(actual=True)[0]}
    if cfg["kind"] == "plain":
        for _ in range(BEFORE):
            w.step()
    else:
        import outcore
        mode = {"trim": "trim", "eager": "eager", "off": False}[cfg["kind"]]
        if cfg["restore"] == "old":
            legacy = {"trim": ((malloc._M_MMAP_MAX, 65536), (malloc._M_TRIM_THRESHOLD, 128 * 1024)),
                      "eager": ()}
            malloc._restore_plan = lambda changed: legacy[
                "eager" if malloc._M_MMAP_THRESHOLD in changed else "trim"]
        ooc = outcore.OutOfCore(cfg["budget"], return_freed_memory=mode)
        for _ in range(BEFORE):
            with ooc.iteration():
                w.step()
        out["iterations"] = [it.mode for it in ooc.report().iterations]
        ooc.close()
        out["steering_after_close"] = repr(malloc.steering_governor())
    for _ in range(WARMUP):
        w.step()
    faults, seconds = [], []
    for _ in range(MEASURED):
        f0, t0 = malloc.page_faults(), time.perf_counter()
        w.step()
        seconds.append(time.perf_counter() - t0)
        faults.append(malloc.page_faults() - f0)
    out.update(faults=faults, seconds=seconds, rss=malloc.resident_bytes())
    return out


def _run(cfg: dict) -> dict:
    from outcore.memory.pages import plain_environment      # plain PyTorch: its own setting
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)],
                          capture_output=True, text=True, timeout=1800,
                          env=plain_environment() if cfg["kind"] == "plain" else None)
    if proc.returncode != 0:
        raise SystemExit(f"child {cfg} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, help="for the CNNs (default 64)")
    parser.add_argument("--budget", type=int, default=None, help="bytes (default: a quarter of the managed peak)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--restore", choices=("both", "old", "new"), default="both")
    parser.add_argument("--modes", nargs="+", default=["trim", "eager", "off"], choices=("trim", "eager", "off"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))), flush=True)
        return
    from outcore.workloads import SPECS
    if args.image_size is None and "image_size" in SPECS[args.model].sizes:
        args.image_size = 64
    base = {"model": args.model, "batch": args.batch, "image_size": args.image_size}
    budget = args.budget
    if budget is None:
        peak = _run({**base, "kind": "calibrate"})["managed_peak"]
        budget = peak // 4
        print(f"managed peak {peak / MiB:.0f} MiB; budget {budget / MiB:.0f} MiB", file=sys.stderr)
    restores = ("old", "new") if args.restore == "both" else (args.restore,)
    rows = [("plain", "-")]
    for mode in args.modes:
        for restore in (restores if mode != "off" else ("-",)):
            rows.append((mode, restore))
    results: dict = {row: [] for row in rows}
    for rep in range(args.reps):
        for row in rows:
            kind, restore = row
            result = _run({**base, "kind": kind, "restore": restore, "budget": budget})
            results[row].append(result)
            print(f"rep {rep + 1} {kind:5} {restore:3}: faults/step {statistics.mean(result['faults']):9.0f} "
                  f"step {statistics.mean(result['seconds']):.2f} s rss {result['rss'] / MiB:.0f} MiB",
                  file=sys.stderr, flush=True)
    print(f"\n`{shlex.join(['.venv/bin/python', 'benchmarks/faults_after_close.py', *sys.argv[1:]])}`\n")
    print(f"{args.model}, batch {args.batch}, "
          f"{f'{args.image_size}x{args.image_size}, ' if args.image_size else ''}budget "
          f"{budget / MiB:.0f} MiB; {args.reps} fresh processes per row, round-robin; per process "
          f"the mean of {MEASURED} plain steps after {WARMUP} warm-up; medians over processes\n")
    print("| before the plain steps | close() restores | faults/step | (per process) | step (s) | RSS after (MiB) |")
    print("|---|---|---:|---|---:|---:|")
    names = {"plain": "never used outcore", "trim": "OutOfCore 'trim', closed",
             "eager": "OutOfCore 'eager', closed", "off": "OutOfCore False, closed"}
    for row in rows:
        runs = results[row]
        per = [statistics.mean(r["faults"]) for r in runs]
        secs = [statistics.mean(r["seconds"]) for r in runs]
        rss = [r["rss"] / MiB for r in runs]
        print(f"| {names[row[0]]} | {row[1]} | {statistics.median(per):.0f} | "
              f"{', '.join(f'{p:.0f}' for p in per)} | {statistics.median(secs):.2f} | {statistics.median(rss):.0f} |")


if __name__ == "__main__":
    main()
