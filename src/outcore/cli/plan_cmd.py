"""`outcore plan TRACE --budget B [--policy P]`: plan a recorded trace and print the schedule.

`outcore plan TRACE --cluster --machine M --interconnect I --max-devices N`: rank every
way of running the step on 1..N devices (single, ddp, fsdp, pp; in-core where it fits,
out-of-core under the device's memory where it does not) by predicted throughput
(rank_configurations in outcore.simulate.cluster)."""
from __future__ import annotations

from ..errors import InfeasibleBudget, OutcoreError
from ..plan import POLICIES, lower_bound, min_feasible_budget
from ..plan.recompute import choose as choose_recompute
from ..simulate import PRESETS, machine
from ..trace import Trace
from ..units import format_bytes, parse_budget
from . import check_output
from .trace_cmd import _count


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="plan when each array of a trace moves under a fast-memory budget",
        description="Plan a recorded trace (outcore trace -o FILE) under a budget and print "
                    "what moves, how much, and the traffic lower bound.")
    p.add_argument("trace", help="trace JSON file")
    p.add_argument("--budget", help="fast-tier budget, e.g. 16GB (10^9 bytes each), 512MiB (2^20 each) (required unless "
                                    "--cluster; with --cluster: per-device budgets to try, "
                                    "comma-separated, default the device's memory)")
    p.add_argument("--policy", choices=POLICIES,
                   help="scheduling policy (default auto: the fastest of the others by "
                        "simulated time on cpu-disk; with --window adaptive, the paper's; "
                        "with --k fixed)")
    p.add_argument("--window", help="adaptive window in bytes (default: no limit but the budget; the paper used 1.5 x budget)")
    p.add_argument("--k", type=int, help="fixed window in functions (default 4)")
    add_adaptive_options(p)
    add_recompute(p)
    p.add_argument("--lines", type=_count, default=20, help="functions to list (default 20)")
    p.add_argument("-o", "--output", help="write the schedule as JSON to this file")
    c = p.add_argument_group("--cluster: how many devices, which strategy")
    c.add_argument("--cluster", action="store_true",
                   help="rank single/ddp/fsdp/pp on 1..--max-devices devices by predicted throughput")
    c.add_argument("--machine",
                   help="device preset of outcore.simulate: with --cluster the devices "
                        "(default a100-40gb); without, the machine policy auto picks its plan "
                        f"on (default cpu-disk); one of {', '.join(sorted(PRESETS))}")
    c.add_argument("--interconnect",
                   help="interconnect preset of outcore.simulate.comm (default nvlink-a100)")
    c.add_argument("--max-devices", type=int, help="most devices to consider (default 8)")
    c.add_argument("--strategies", help="comma-separated (default ddp,fsdp,pp)")
    c.add_argument("--batch", type=int, help="the trace's batch size: no rank or microbatch gets "
                                             "less than one sample")
    c.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.set_defaults(func=run)


# --recompute: OutOfCore's recompute= for a trace file (plan/recompute.py).
RECOMPUTE = {"none": False, "auto": "auto", "all": True}


def add_recompute(p) -> None:
    p.add_argument("--recompute", choices=tuple(RECOMPUTE), default="none",
                   help="recompute activations instead of moving them (plan/recompute.py): "
                        "auto where it simulates faster, all wherever the rules allow "
                        "(default none: the trace as given)")


# adaptive's options that no other policy takes (--policy all hands them to adaptive alone)
ADAPTIVE_ONLY = ("wait_order", "outputs")


def add_adaptive_options(p) -> None:
    """--wait-order and --outputs, adaptive's own options (docs/planning.md, "Waiting in
    completion order", "Reserving outputs late")."""
    p.add_argument("--wait-order", choices=("farthest", "completion"),
                   help="adaptive: which swap-out a function that needs room waits for "
                        "(default farthest, Belady's; completion: the oldest first)")
    p.add_argument("--outputs", choices=("early", "late"),
                   help="adaptive: reserve a later function's outputs when the window "
                        "reaches them (default early, the paper's) or from that function "
                        "on (late; docs/planning.md, \"Reserving outputs late\")")


def policy_options(args, policy: str | None = None) -> dict:
    """--window / --k / --wait-order / --outputs as plan() options; with `policy` auto,
    the machine it chooses on (--machine, where the command has one)."""
    options = {}
    if getattr(args, "window", None) is not None:
        options["window"] = args.window
    if getattr(args, "k", None) is not None:
        options["k"] = args.k
    for name in ADAPTIVE_ONLY:
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    if policy == "auto" and getattr(args, "machine", None):
        options["machine"] = args.machine
    return options


def chosen_policy(args) -> str:
    """--policy as given; without it, the policy --window, --wait-order or --outputs
    (adaptive) or --k (fixed) belongs to, else auto."""
    if args.policy is not None:
        return args.policy
    window = any(getattr(args, name, None) is not None for name in ("window",) + ADAPTIVE_ONLY)
    k = getattr(args, "k", None) is not None
    if window and k:
        raise OutcoreError("--window, --wait-order and --outputs are adaptive's options and "
                           "--k fixed's: give --policy too")
    return "fixed" if k else "adaptive" if window else "auto"


# --cluster's own options: without --cluster they would be ignored, so they are refused
CLUSTER_ONLY = ("interconnect", "max_devices", "strategies", "batch", "markdown")


def run(args) -> int:
    if args.cluster and args.output:
        raise OutcoreError("-o writes one device's schedule, and --cluster ranks "
                           "configurations and writes none: drop -o (--markdown prints the "
                           "table to paste), or drop --cluster to plan one device")
    if args.cluster:
        return run_cluster(args)
    given = [f"--{n.replace('_', '-')}" for n in CLUSTER_ONLY
             if getattr(args, n) is not None and getattr(args, n) is not False]   # 0 too
    if given:
        raise OutcoreError(f"{', '.join(given)} go{'es' if len(given) == 1 else ''} with "
                           "--cluster (rank multi-device configurations): add --cluster, or "
                           "drop them to plan one device under --budget")
    if args.budget is None:
        raise OutcoreError("outcore plan needs --budget (e.g. --budget 2GiB), or --cluster to "
                           "rank multi-device configurations")
    policy = chosen_policy(args)
    if args.machine is not None:
        machine(args.machine)                  # an unknown preset: refused here
        if policy != "auto":
            raise OutcoreError(f"--machine is the machine policy auto picks its plan on; "
                               f"policy {policy} plans the same on any: drop --machine, or "
                               "give --policy auto")
    if args.output:
        check_output(args.output, "-o")
    trace = Trace.load(args.trace)
    budget = parse_budget(args.budget, "--budget")
    try:
        chosen, trace, schedule = choose_recompute(trace, budget, mode=RECOMPUTE[args.recompute],
                                                   policy=policy,
                                                   **policy_options(args, policy))
    except InfeasibleBudget as exc:
        exc.args = (f"{exc} {_for_outofcore(trace)}", *exc.args[1:])
        raise
    if args.output:                  # before a word: output cut short still leaves the files
        schedule.save(args.output)
        if chosen:
            trace.save(args.output + ".trace.json")
    print(repr(trace))
    if chosen:
        made = sum(trace.arrays[c.array].nbytes for c in chosen)
        print(f"recomputes {len(chosen)} activations ({format_bytes(made)}) instead of moving "
              "them: the functions named recompute:... below make them again")
    print(schedule.summary(trace=trace, max_lines=args.lines))
    bound = lower_bound(trace, budget)
    print(f"  lower bound {format_bytes(bound.bytes_moved):>12}  (no schedule moves less; "
          f"this one moves {format_bytes(schedule.bytes_moved)})")
    print(f"  smallest feasible budget {format_bytes(min_feasible_budget(trace))} for this "
          f"plan, in-core peak {format_bytes(trace.peak()[0])}; {_for_outofcore(trace)}")
    if args.output:
        print(f"  written to {args.output}")
        if chosen:
            print(f"  the trace it is for (with the recomputes) written to "
                  f"{args.output}.trace.json")
    return 0


def _for_outofcore(trace) -> str:
    """The smallest budget OutOfCore takes for the step `trace` recorded: the plan's
    figure counts every array as movable; OutOfCore keeps small ones in memory."""
    from ..run.ooc import MIN_MOVE_BYTES, smallest_budget
    least = smallest_budget(trace)
    return (f"OutOfCore, which keeps arrays under min_move_bytes={MIN_MOVE_BYTES:,} and those "
            f"of collectives in memory beside the plan, needs at least {format_bytes(least)} "
            f"({least:,} B) for this step, a little more where its recording finds more "
            "arrays that cannot move")


def run_cluster(args) -> int:
    from ..simulate.cluster import STRATEGIES, format_table, rank_configurations
    from ..simulate.comm import interconnect
    args.machine = args.machine or "a100-40gb"
    m = machine(args.machine)                  # an unknown preset: refused before the trace loads
    link = interconnect(args.interconnect or "nvlink-a100")
    strategies = [s.strip() for s in (args.strategies or "ddp,fsdp,pp").split(",") if s.strip()]
    for s in strategies:
        if s not in STRATEGIES:
            raise OutcoreError(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
    budgets = [parse_budget(b, "--budget") for b in args.budget.split(",")] if args.budget else None
    trace = Trace.load(args.trace)
    rows = rank_configurations(trace, device=args.machine, interconnect=link,
                               max_devices=8 if args.max_devices is None else args.max_devices,
                               budgets=budgets,
                               strategies=tuple(strategies), batch=args.batch)
    print(repr(trace))
    print(f"devices: {m.name} ({format_bytes(m.fast_bytes)} each), interconnect {link}")
    print("throughput: samples/s relative to one device running the whole step in-core; the "
          "trace's batch is the global batch\n")
    print(format_table(rows, markdown=args.markdown))
    best = next((r for r in rows if r.fits), None)
    if best is not None:
        where = "in-core" if best.budget is None else f"out-of-core under {format_bytes(best.budget)}"
        print(f"\nbest: {best.strategy} on {best.ranks} device(s), {where}, "
              f"{best.step_s * 1e3:.1f} ms per step ({best.throughput_relative:.2f}x)")
    else:
        print("\nno configuration fits: try more devices or a bigger device")
    return 0
