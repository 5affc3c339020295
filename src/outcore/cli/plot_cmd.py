"""`outcore plot TRACE --budget B -o memory.png`: the memory picture of a planned step."""
from __future__ import annotations

from ..plan import POLICIES
from ..plan.recompute import choose as choose_recompute
from ..simulate import PRESETS, simulate
from ..trace import Trace
from ..units import parse_budget
from . import check_output
from .plan_cmd import (RECOMPUTE, add_adaptive_options, add_recompute, chosen_policy,
                       policy_options)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plot", help="draw a planned step's memory over time, by category (PNG or SVG)",
        description="Plan a recorded trace under a budget, simulate it on a machine model and "
                    "draw its fast-tier bytes over time, stacked by category (parameters, "
                    "gradients, optimizer state, activations...), with the budget, the in-core "
                    "curve and the swaps. For a measured step beside the plan, call "
                    "ooc.plot(path) after a replayed iteration.")
    p.add_argument("trace", help="trace JSON file (outcore trace -o FILE)")
    p.add_argument("--budget", required=True, help="fast-tier budget, e.g. 512MiB (2^20 bytes each), 16GB (10^9 each)")
    p.add_argument("--policy", choices=POLICIES,
                   help="scheduling policy (default auto; with --window adaptive, with --k fixed)")
    p.add_argument("--machine", default="cpu-disk", choices=sorted(PRESETS),
                   help="machine preset for the clock (default cpu-disk)")
    p.add_argument("--window", help="adaptive window in bytes")
    p.add_argument("--k", type=int, help="fixed window in functions")
    add_adaptive_options(p)
    add_recompute(p)
    p.add_argument("-o", "--output", required=True, help="where to write: a .png or .svg file")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..view.plot import check_picture_path, plot_memory
    check_picture_path(args.output)
    check_output(args.output, "-o")
    trace = Trace.load(args.trace)
    policy = chosen_policy(args)
    # As `outcore simulate` plans it: --recompute may rewrite the trace (its repeats drawn).
    chosen, trace, schedule = choose_recompute(
        trace, parse_budget(args.budget, "--budget"), mode=RECOMPUTE[args.recompute],
        policy=policy, machine=args.machine, **policy_options(args))
    sim = simulate(trace, schedule, args.machine)
    plot_memory(trace, schedule, sim, args.output, title=trace.info.get("label"))
    print(f"memory picture written to {args.output}"
          + (f" ({len(chosen)} activations recomputed)" if chosen else ""))
    return 0
