"""What recomputing batch-norm outputs could buy: ResNet-50 on the paper's machine model.

A what-if, not a feature: OutOfCore cannot recompute yet (issue "Plans at the physical
limit", part 2). The question it answers is how far recompute moves the step's physical
limit and the schedules the planner already builds, before anyone builds the executor
side.

The recompute is written into the trace itself, so the planner, the simulator and the
cut bound need no change. A candidate is the output y of a forward
`native_batch_norm` (conv -> batch norm -> in-place ReLU, the pattern of every
torchvision ResNet block), changed afterwards only by an in-place `relu_` right after
it. Backward reads y (the next convolution's weight gradient, ReLU's backward) before it
reads the batch norm's input x (its own backward), so x is resident when y is first
needed again. With `--recompute bn,conv`, also the output of a forward convolution whose
input is not recomputed itself: a chain of recomputes stops at a stored array, so that
no recompute waits on a long line of others (letting chains run on put every recompute
at the start of backward; docs/paper-headline.md). Rewritten:

- y keeps its forward life only: created by the batch norm, last used by its last
  forward reader. Nothing has to write it out or read it back;
- a new array y' is created just before y's first backward use (or before the
  recompute of an array made from y, if that comes first) by inserted copies of its
  producer (reading its inputs, or their recomputed copies) and of the ReLU, and takes
  over every later access of y.

The inserted batch norm leaves the running statistics alone (the original updated them
once; an executor would run the copy on scratch copies of them, to stay bitwise equal),
and does not recreate the small saved mean and inverse deviation (the originals live
on). An inserted array's `origin` slot is its position in its function's accesses. Its
cost is the original's on the machine model. The in-core baseline is the same as
paper_headline.py's: the largest batch whose step fits without recompute.

    .venv/bin/python benchmarks/recompute_whatif.py [--recompute bn|bn,conv [--chains]] [--batches 256,1440]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from paper_headline import in_core_max, trace_for  # noqa: E402

from outcore.plan import check, plan  # noqa: E402
from outcore.simulate import machine as get_machine, physical_limit, simulate  # noqa: E402
from outcore.trace.model import Access, Function, Trace  # noqa: E402
from outcore.units import parse_bytes  # noqa: E402


PRODUCERS = {"bn": "aten.native_batch_norm.default", "conv": "aten.convolution.default"}


def candidates(trace, kinds=("bn",), chains: bool = False) -> list[tuple[int, int, int]]:
    """(producing function, its in-place ReLU or -1, y) for every forward output y of a
    batch norm ("bn") or convolution ("conv") that nothing but an in-place ReLU right
    after it changes and that backward reads again. Its producer's tensor inputs must
    live until then, or be recomputed themselves (rewrite orders that); a convolution's
    only with `chains`."""
    fns, arrays = trace.functions, trace.arrays
    wanted = {PRODUCERS[k] for k in kinds}
    by_array: dict[int, list[tuple[int, str]]] = {}
    for fn in fns:
        for acc in fn.accesses:
            by_array.setdefault(acc.array, []).append((fn.index, acc.kind))
    out, made = [], set()
    for fn in fns:
        if fn.op not in wanted or fn.phase != "forward":
            continue
        created = [a.array for a in fn.accesses if a.kind == "create"]
        reads = [a.array for a in fn.accesses if a.kind == "read"]
        if not created or not reads:
            continue
        y = created[0]
        uses = by_array[y]
        relu = -1
        if (fn.index + 1 < len(fns) and fns[fn.index + 1].op == "aten.relu_.default"
                and [a.array for a in fns[fn.index + 1].accesses] == [y]):
            relu = fn.index + 1
        writes = [f for f, kind in uses if kind == "write" and f != relu]
        backward = [f for f, kind in uses if fns[f].phase == "backward"]
        if writes or not backward:
            continue
        first_back = backward[0]
        if any(f < first_back and fns[f].phase != "forward" for f, _ in uses):
            continue                     # read between forward and backward: keep it simple
        if fn.op == PRODUCERS["conv"] and not chains and any(x in made for x in reads):
            continue                     # chains stop at a stored array (module docstring)
        alive = True
        for x in reads:
            x_arr = arrays[x]
            if x in made or x_arr.kind == "persistent":
                continue
            release = x_arr.freed_after if x_arr.freed_after is not None else x_arr.last_use
            alive &= release >= first_back
        if alive:
            out.append((fn.index, relu, y))
            made.add(y)
    return out


def rewrite(trace, chosen) -> Trace:
    """The trace with each chosen y recomputed before its first backward use, or before
    the recompute of an array made from it (module docstring)."""
    fns, arrays = list(trace.functions), list(trace.arrays)
    uses = {y: sorted({f for f in range(len(fns)) if y in fns[f].arrays()}) for _, _, y in chosen}
    producer = {y: (p, relu) for p, relu, y in chosen}
    inputs = {y: [a.array for a in fns[p].accesses if a.kind == "read"] for p, _, y in chosen}
    # Where each y is made again: its first backward use, or earlier if a recompute
    # that reads it comes first.
    point = {y: next(f for f in uses[y] if fns[f].phase == "backward") for _, _, y in chosen}
    changed = True
    while changed:
        changed = False
        for y in point:
            for x in inputs[y]:
                if x in point and point[x] > point[y]:
                    point[x], changed = point[y], True
    again = {y: len(arrays) + i for i, (_, _, y) in enumerate(chosen)}       # y -> y'
    new_arrays = []
    for _, _, y in chosen:
        orig = arrays[y]
        last_forward = max(f for f in uses[y] if f < point[y])
        new_arrays.append(dataclasses.replace(orig, id=again[y]))
        arrays[y] = dataclasses.replace(orig, last_use=last_forward, freed_after=last_forward)
    inserts: dict[int, list[Function]] = {}          # before function g: new functions
    for p, relu, y in sorted(chosen):                 # forward order: inputs first
        reads = tuple(Access(again.get(a.array, a.array), "read")
                      for a in fns[p].accesses if a.kind == "read")
        made = [dataclasses.replace(fns[p], op="recompute:" + fns[p].op, phase="backward",
                                    accesses=reads + (Access(again[y], "create"),),
                                    host_s=0.0, host_cpu_s=0.0)]
        if relu >= 0:
            made.append(dataclasses.replace(fns[relu], op="recompute:" + fns[relu].op,
                                            phase="backward", accesses=(Access(again[y], "write"),),
                                            host_s=0.0, host_cpu_s=0.0))
        inserts.setdefault(point[y], []).extend(made)
    # Renumber: inserted functions go right before their point; later accesses of y
    # are y's.
    out_fns, new_index = [], {}
    for f, fn in enumerate(fns):
        out_fns.extend(inserts.get(f, []))
        new_index[f] = len(out_fns)
        accesses = tuple(Access(again[a.array] if a.array in again and f >= point[a.array]
                                else a.array, a.kind) for a in fn.accesses)
        out_fns.append(dataclasses.replace(fn, accesses=accesses))
    out_fns = [dataclasses.replace(fn, index=i) for i, fn in enumerate(out_fns)]
    # Each array's uses, origin and release in the new function order. y' is released
    # where y was (None: alive at the end); y now after its last forward use.
    first, last, origin = {}, {}, {}
    for fn in out_fns:
        for slot, acc in enumerate(fn.accesses):
            first.setdefault(acc.array, fn.index)
            origin.setdefault(acc.array, (fn.index, slot))
            last[acc.array] = fn.index
    died = {again[y]: trace.arrays[y].freed_after for _, _, y in chosen}
    all_arrays = []
    for arr in arrays + new_arrays:
        freed = died[arr.id] if arr.id in died else arr.freed_after
        if freed is not None:
            freed = max(new_index[freed], last[arr.id])
        all_arrays.append(dataclasses.replace(arr, first_use=first[arr.id], last_use=last[arr.id],
                                              origin=origin[arr.id], freed_after=freed))
    return Trace(functions=tuple(out_fns), arrays=tuple(all_arrays), device=trace.device,
                 durations=trace.durations, info=dict(trace.info))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="16GB")
    parser.add_argument("--machine", default="v100-16gb")
    parser.add_argument("--batches", default="256,384,512,768,1024,1280,1440")
    parser.add_argument("--recompute", default="bn",
                        help="comma-separated: bn (batch-norm outputs), conv (convolution "
                             "outputs); default bn")
    parser.add_argument("--chains", action="store_true",
                        help="conv: also convolutions whose input is recomputed itself")
    args = parser.parse_args()
    start = time.perf_counter()
    budget, m = parse_bytes(args.budget), get_machine(args.machine)
    kinds = tuple(args.recompute.split(","))
    unknown = [k for k in kinds if k not in PRODUCERS]
    if unknown:
        parser.error(f"--recompute: unknown {', '.join(unknown)}; choose from {', '.join(PRODUCERS)}")
    if args.chains and "conv" not in kinds:
        parser.error("--chains is about convolutions: give --recompute bn,conv")
    base = in_core_max(budget)
    t0 = trace_for(base)
    base_rate = base / simulate(t0, plan(t0, budget), m).step_time_s
    print(f"in-core maximum batch under {args.budget}: {base} ({base_rate:.1f} img/s on {m.name})\n")
    print("| batch | recomputed | recomputed GB | limit ms: as is | with recompute | auto step ms: "
          "as is | with recompute | speed vs in-core: as is | with recompute | moved GB: as is "
          "| with recompute |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        t = trace_for(batch)
        chosen = candidates(t, kinds, args.chains)
        r = rewrite(t, chosen)
        lim, lim_r = physical_limit(t, budget, m).seconds, physical_limit(r, budget, m).seconds
        s, s_r = plan(t, budget, machine=m), plan(r, budget, machine=m)
        check(r, s_r, budget)            # the rewritten trace plans like any other
        step, step_r = simulate(t, s, m).step_time_s, simulate(r, s_r, m).step_time_s
        gb = sum(t.arrays[y].nbytes for _, _, y in chosen) / 1e9
        print(f"| {batch} | {len(chosen)} | {gb:.1f} | {lim * 1e3:.0f} | {lim_r * 1e3:.0f} "
              f"| {step * 1e3:.0f} | {step_r * 1e3:.0f} | {100 * batch / step / base_rate:.0f}% "
              f"| {100 * batch / step_r / base_rate:.0f}% | {s.bytes_moved / 1e9:.1f} "
              f"| {s_r.bytes_moved / 1e9:.1f} |")
    print(f"\n(took {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
