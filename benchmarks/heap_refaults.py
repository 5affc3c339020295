"""What the allocator governor's trims cost a replayed step: ResNet-50 64x64 batch 64
under a fraction of its in-core peak, per replayed step its time, page faults, trims,
the seconds the trims themselves took and the bytes they gave back (the step faults
those in again where it reuses the memory), and the resident set at the end.

    .venv/bin/python benchmarks/heap_refaults.py                 # a quarter, trims on
    .venv/bin/python benchmarks/heap_refaults.py --keep          # return_freed_memory=False

Run it with nothing else on the machine; compare the two in fresh processes, one after
the other (CHANGELOG, 2026-12-07 fourth session, has figures).
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time

import outcore
from outcore.memory import malloc
from outcore.memory.malloc import resident_bytes
from outcore.workloads import build

MIB = 2 ** 20


def faults() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def time_trims(spent: list) -> None:
    """Add the seconds of each of the trim governor's trims to spent[0]."""
    original = malloc.TrimGovernor._trim

    def timed(self, rss):
        start = time.perf_counter()
        try:
            return original(self, rss)
        finally:
            spent[0] += time.perf_counter() - start
    malloc.TrimGovernor._trim = timed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--keep", action="store_true", help="return_freed_memory=False: no trims")
    args = ap.parse_args()
    w = build("resnet50", batch=64, image_size=64)
    w.step()
    for i in range(2):
        before, start = faults(), time.perf_counter()
        w.step()
        print(f"plain {i}: {time.perf_counter() - start:.3f} s, {faults() - before} faults")
    with outcore.record() as rec:
        w.step()
    budget = int(args.fraction * rec.trace.peak(actual=True)[0])
    spent = [0.0]
    time_trims(spent)
    with tempfile.TemporaryDirectory() as swap, \
            outcore.OutOfCore(budget, swap_dir=swap, return_freed_memory=not args.keep) as ooc:
        for i in range(args.steps):
            gov = ooc._governor
            trims, given = (gov.trims, gov.given_back) if gov else (0, 0)
            spent[0] = 0.0
            before, start = faults(), time.perf_counter()
            with ooc.iteration():
                w.step()
            took = time.perf_counter() - start
            mode = ooc.report().iterations[-1].mode
            line = f"outcore {i} ({mode}): {took:.3f} s, {faults() - before} faults"
            if gov is not None:
                line += (f", {gov.trims - trims} trims in {spent[0]:.3f} s, gave back "
                         f"{(gov.given_back - given) / MIB:.0f} MiB")
            print(line, flush=True)
        print(f"resident set at the end: {resident_bytes() / MIB:.0f} MiB (budget "
              f"{budget / MIB:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
