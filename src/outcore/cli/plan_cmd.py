"""`outcore plan TRACE --budget B [--policy P]`: plan a recorded trace and print the schedule."""
from __future__ import annotations

from ..plan import POLICIES, lower_bound, min_feasible_budget, plan
from ..trace import Trace
from ..units import format_bytes, parse_bytes


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="plan when each array of a trace moves under a fast-memory budget",
        description="Plan a recorded trace (outcore trace -o FILE) under a budget and print "
                    "what moves, how much, and the traffic lower bound.")
    p.add_argument("trace", help="trace JSON file")
    p.add_argument("--budget", required=True, help="fast-tier budget, e.g. 16GB, 512MiB")
    p.add_argument("--policy", default="adaptive", choices=POLICIES,
                   help="scheduling policy (default adaptive, the paper's)")
    p.add_argument("--window", help="adaptive window in bytes (default: no limit but the budget; the paper used 1.5 x budget)")
    p.add_argument("--k", type=int, help="fixed window in functions (default 4)")
    p.add_argument("--lines", type=int, default=20, help="functions to list (default 20)")
    p.add_argument("-o", "--output", help="write the schedule as JSON to this file")
    p.set_defaults(func=run)


def policy_options(args) -> dict:
    options = {}
    if getattr(args, "window", None) is not None:
        options["window"] = args.window
    if getattr(args, "k", None) is not None:
        options["k"] = args.k
    return options


def run(args) -> int:
    trace = Trace.load(args.trace)
    budget = parse_bytes(args.budget)
    schedule = plan(trace, budget, args.policy, **policy_options(args))
    print(repr(trace))
    print(schedule.summary(trace=trace, max_lines=args.lines))
    bound = lower_bound(trace, budget)
    print(f"  lower bound {format_bytes(bound.bytes_moved):>12}  (no schedule moves less; "
          f"this one moves {format_bytes(schedule.bytes_moved)})")
    print(f"  smallest feasible budget {format_bytes(min_feasible_budget(trace))}, "
          f"in-core peak {format_bytes(trace.peak()[0])}")
    if args.output:
        schedule.save(args.output)
        print(f"  written to {args.output}")
    return 0
