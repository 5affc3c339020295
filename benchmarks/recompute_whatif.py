"""What recompute buys by a fixed rule: ResNet-50 on the paper's machine model.

OutOfCore recomputes by cost (`recompute="auto"`: plan/recompute.py). This benchmark
asks a narrower question: how far recomputing every array of a kind moves the step's
physical limit and the schedules the planner builds. It uses the library's
`candidates` (NOTE [Recompute rules]) without rule 6's per-array cost test, and its
`rewrite`, so the planner, the simulator and the cut bound see exactly what OutOfCore
would run:

- `--recompute bn`: the output y of every forward batch norm that only its in-place
  ReLU changes afterwards (conv -> batch norm -> ReLU, every torchvision ResNet block);
  backward reads y before the batch norm's input x, so x is resident when y is made
  again;
- `--recompute bn,conv`: also every convolution's output whose input is stored; with
  `--chains`, also those whose input is recomputed itself (each then hangs on the one
  before it, and all of them land at the start of backward: docs/paper-headline.md).

Each repeat costs the original's time on the machine model, and holds the bytes it makes
as workspace while it runs (rule 5). The in-core baseline is paper_headline.py's: the
largest batch whose step fits without recompute.

    .venv/bin/python benchmarks/recompute_whatif.py [--recompute bn|bn,conv [--chains [--remake]]] [--batches 256,1440]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from paper_headline import in_core_max, trace_for  # noqa: E402

from outcore.plan import check, plan  # noqa: E402
from outcore.simulate import machine as get_machine, physical_limit, simulate  # noqa: E402
from outcore.plan import recompute  # noqa: E402
from outcore.units import parse_bytes  # noqa: E402


KINDS = tuple(recompute.PRODUCERS)


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
    parser.add_argument("--remake", action="store_true",
                        help="chains: a repeat that needs a recomputed array before that "
                             "array's own repeat makes a temporary copy of it, unless the array "
                             "is needed within 3 functions anyway or is smaller than 1/16 of "
                             "the budget (recompute.temporaries, NOTE [Temporaries])")
    args = parser.parse_args()
    start = time.perf_counter()
    budget, m = parse_bytes(args.budget), get_machine(args.machine)
    kinds = tuple(args.recompute.split(","))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"--recompute: unknown {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    if args.chains and "conv" not in kinds:
        parser.error("--chains is about convolutions: give --recompute bn,conv")
    if args.remake and not args.chains:
        parser.error("--remake is about chains: give --chains")
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
        chosen = recompute.candidates(t, kinds=kinds, chains=args.chains)
        if args.remake:
            chosen = recompute.temporaries(t, chosen, budget)
        r = recompute.rewrite(t, chosen)
        lim, lim_r = physical_limit(t, budget, m).seconds, physical_limit(r, budget, m).seconds
        s, s_r = plan(t, budget, machine=m), plan(r, budget, machine=m)
        check(r, s_r, budget)            # the rewritten trace plans like any other
        step, step_r = simulate(t, s, m).step_time_s, simulate(r, s_r, m).step_time_s
        gb = sum(t.arrays[c.array].nbytes for c in chosen) / 1e9
        print(f"| {batch} | {len(chosen)} | {gb:.1f} | {lim * 1e3:.0f} | {lim_r * 1e3:.0f} "
              f"| {step * 1e3:.0f} | {step_r * 1e3:.0f} | {100 * batch / step / base_rate:.0f}% "
              f"| {100 * batch / step_r / base_rate:.0f}% | {s.bytes_moved / 1e9:.1f} "
              f"| {s_r.bytes_moved / 1e9:.1f} |")
    print(f"\n(took {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
