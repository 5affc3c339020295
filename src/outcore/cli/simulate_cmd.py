"""`outcore simulate TRACE... --budget B --machine M`: predicted step time against in-core.

Several traces (e.g. one per batch size), several budgets (comma-separated), several
policies (comma-separated or `all`) or --sweep give a table, one row per combination.

`--ranks N [--strategy ddp|fsdp|pp] [--interconnect NAME]`: predict one rank's step of
the trace run on N devices (predict in outcore.simulate.cluster; --budget is then the
per-device memory for out-of-core training).

`--together TRACE0 TRACE1 ...`: the traces are ranks 0, 1, ... of one distributed step,
each recorded on its own rank; simulate them together (simulate_ranks in outcore.simulate)."""
from __future__ import annotations

import sys

from ..errors import InfeasibleBudget, OutcoreError
from ..plan import POLICIES, min_feasible_budget, plan
from ..plan.recompute import choose as choose_recompute
from ..simulate import PRESETS, physical_limit, simulate
from ..trace import Trace
from ..units import format_bytes, parse_budget
from ..view.timeline import check_timeline_path
from . import check_output
from .plan_cmd import (ADAPTIVE_ONLY, RECOMPUTE, _for_outofcore, add_adaptive_options,
                       add_recompute, chosen_policy, policy_options)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "simulate", help="predict a planned step's time on a machine model",
        description="Plan each trace under each budget and policy, replay the schedule on a "
                    "machine model and print the predicted step time against in-core.")
    p.add_argument("traces", nargs="+", metavar="TRACE", help="trace JSON file(s)")
    p.add_argument("--budget", help="fast-tier budget(s), comma-separated, e.g. 16GB (10^9 bytes each), "
                                    "512MiB (2^20 each) (default: the machine's memory)")
    p.add_argument("--machine", default="cpu-disk", choices=sorted(PRESETS),
                   help="machine preset (default cpu-disk)")
    p.add_argument("--policy",
                   help=f"policy, comma-separated list, or 'all' ({', '.join(POLICIES)}; "
                        "default auto, or with --window adaptive, with --k fixed)")
    p.add_argument("--sweep", type=int, nargs="?", const=6, metavar="N",
                   help="N budgets from the smallest OutOfCore takes (outcore.smallest_budget) "
                        "to the in-core peak (default 6)")
    p.add_argument("--window", help="adaptive window in bytes (default: no limit but the budget; the paper used 1.5 x budget)")
    p.add_argument("--k", type=int, help="fixed window in functions (default 4)")
    add_adaptive_options(p)
    add_recompute(p)
    p.add_argument("--timeline", metavar="OUT.json",
                   help="write the simulated step as a Chrome trace (opens in Perfetto or "
                        "chrome://tracing); one trace, budget and policy only")
    d = p.add_argument_group("several devices (outcore.simulate.cluster)")
    d.add_argument("--ranks", type=int, help="predict the step on this many devices")
    d.add_argument("--strategy", help="ddp (default), fsdp or pp")
    d.add_argument("--interconnect", help="interconnect preset (default nvlink-a100): "
                                          "see INTERCONNECTS in outcore.simulate.comm")
    d.add_argument("--batch", type=int, help="the trace's (global) batch size, to check the split")
    d.add_argument("--together", action="store_true",
                   help="the TRACEs are ranks 0, 1, ... of one step, each recorded on its rank "
                        "under torchrun: simulate them together, each under --budget (default: "
                        "its in-core peak), collectives over --interconnect (default "
                        "loopback-gloo, or loopback-gloo-busy where the ranks fill the cores)")
    d.add_argument("--ranks-per-node", type=int,
                   help="with --together: how many of the ranks share one machine (default: "
                        "all). With no more cores than that, the mover's and gloo's threads "
                        "take their CPU from compute")
    d.add_argument("--per-op-us", type=float, default=0.0,
                   help="with --together on cpu-disk: outcore's own cost per op, in µs, counted "
                        "with the recorded host time (measure it: outcore bench overhead)")
    p.set_defaults(func=run)


def run_cluster(args) -> int:
    from ..simulate.cluster import STRATEGIES, predict
    from ..simulate.comm import interconnect
    strategy = args.strategy or "ddp"
    if strategy not in STRATEGIES:
        raise OutcoreError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    name = args.interconnect or "nvlink-a100"
    interconnect(name)                     # an unknown name is a clear error here
    ranks = 1 if args.ranks is None else args.ranks
    if ranks < 1:
        raise OutcoreError(f"--ranks must be at least 1, got {ranks}")
    if args.budget and "," in args.budget or args.sweep or args.timeline:
        raise OutcoreError("--ranks predicts one configuration: give at most one --budget, no "
                           "--sweep or --timeline")
    for path in args.traces:
        trace = Trace.load(path)
        print(repr(trace))
        print(predict(trace, machine=args.machine, interconnect=name, ranks=ranks,
                      strategy=strategy, batch=args.batch,
                      budget=parse_budget(args.budget, "--budget") if args.budget else None))
    return 0


def run_together(args) -> int:
    import dataclasses

    from ..simulate import simulate_ranks
    from ..simulate.comm import interconnect
    from ..simulate.machines import trace_threads
    if len(args.traces) < 2:
        raise OutcoreError("--together simulates the ranks of one step: give one trace per "
                           f"rank, at least 2 (got {len(args.traces)})")
    if args.ranks is not None or args.strategy or args.sweep or args.timeline or args.batch:
        raise OutcoreError("--together takes the ranks from the traces: no --ranks, --strategy, "
                           "--batch, --sweep or --timeline")
    if args.budget and "," in args.budget:
        raise OutcoreError("--together takes one --budget (each rank's)")
    if args.per_op_us < 0:
        raise OutcoreError(f"--per-op-us must be >= 0, got {args.per_op_us}")
    per_node = len(args.traces) if args.ranks_per_node is None else args.ranks_per_node
    if not 1 <= per_node <= len(args.traces):
        raise OutcoreError(f"--ranks-per-node must be from 1 to the {len(args.traces)} ranks, "
                           f"got {per_node}")
    policies = _policies(chosen_policy(args))
    if len(policies) != 1:
        raise OutcoreError("--together takes one --policy")
    policy = policies[0]
    machine = PRESETS[args.machine]
    traces = [Trace.load(path) for path in args.traces]
    threads = max(trace_threads(t) for t in traces)
    filled = machine.no_core_to_spare(per_node, threads)   # NOTE [No core to spare], engine.py
    name = args.interconnect or ("loopback-gloo-busy" if filled else "loopback-gloo")
    interconnect(name)                     # an unknown name is a clear error here
    if machine.use_trace_durations:     # recorded on this machine: its host time too
        machine = dataclasses.replace(machine, host_time=True,
                                      per_function_s=args.per_op_us * 1e-6)
    elif args.per_op_us:
        raise OutcoreError(f"--per-op-us is for machines that use the trace's own durations "
                           f"(cpu-disk), not {args.machine}")
    schedules = []
    for rank, trace in enumerate(traces):
        budget = parse_budget(args.budget, "--budget") if args.budget else trace.peak(actual=True)[0]
        try:
            schedules.append(plan(trace, budget, policy, **policy_options(args, policy)))
        except InfeasibleBudget as exc:
            raise OutcoreError(f"rank {rank} ({args.traces[rank]}): {exc}") from None
    sims = simulate_ranks(traces, schedules, machine, link=name, ranks_per_node=per_node)
    if not any(sim.collectives for sim in sims):
        # simulate_ranks runs such traces side by side (two runs sharing a machine's
        # cores), but --together says they are one step's ranks: most likely the traces
        # of separate runs were given (helper-152).
        raise OutcoreError(f"--together: none of the {len(traces)} traces has a collective or "
                           "a send/receive, so they are not the ranks of one distributed step; "
                           "record each rank's same iteration under torchrun (outcore trace "
                           "or outcore.record() on every rank), or simulate each trace alone")
    print(f"{len(traces)} ranks simulated together on {args.machine}, collectives over {name}"
          + (f", {args.per_op_us:g} µs per op" if args.per_op_us else ""))
    if filled:
        print(f"{per_node} ranks per node computing on {threads} thread(s) each, on "
              f"{machine.cores} cores: no core to spare, so the mover's and gloo's threads "
              "take their CPU from compute")
    header = (f"{'rank':>4} {'functions':>9} {'budget':>11} {'moved':>11} {'step ms':>9} "
              f"{'compute ms':>10} {'stall ms':>9} {'comm ms':>8}")
    print(header)
    print("-" * len(header))
    for rank, (trace, schedule, sim) in enumerate(zip(traces, schedules, sims)):
        print(f"{rank:>4} {len(trace.functions):>9} {format_bytes(schedule.budget):>11} "
              f"{format_bytes(schedule.bytes_moved):>11} {sim.iteration_time_s * 1e3:9.2f} "
              f"{sum(sim.compute_s) * 1e3:10.2f} {sim.total_stall_s * 1e3:9.2f} "
              f"{sim.comm_s * 1e3:8.2f}")
    slowest = max(range(len(sims)), key=lambda r: sims[r].iteration_time_s)
    print(f"step: {sims[slowest].iteration_time_s * 1e3:.2f} ms (rank {slowest}, the slowest); "
          "stall includes waiting for the other ranks")
    return 0


def _policies(text: str) -> list[str]:
    names = list(POLICIES) if text == "all" else [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise OutcoreError(f"--policy {text!r} names no policy; choose from "
                           f"{', '.join(POLICIES)} or all")
    for name in names:
        if name not in POLICIES:
            raise OutcoreError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)} or all")
    return names


SWEEP_MOST = 100        # rows of a sweep: each plans the trace once per policy


def _budgets(args, trace, machine) -> list[int]:
    if args.sweep is not None:
        if not 2 <= args.sweep <= SWEEP_MOST:
            raise OutcoreError(f"--sweep N gives N budgets from the smallest OutOfCore takes to "
                               f"the in-core peak, each planned and simulated: N must be at "
                               f"least 2 and at most {SWEEP_MOST}, got {args.sweep}")
        if args.budget:
            raise OutcoreError("--sweep chooses the budgets itself: give --sweep or --budget")
        # From the least OutOfCore takes, not the plan's own least, which counts every
        # array as movable: the first row was a budget OutOfCore refused (helper-162).
        # Where OutOfCore needs the in-core peak or more (every array small enough to
        # stay), the plan's own least, and a note.
        from ..run.ooc import smallest_budget
        hi = trace.peak(actual=True)[0]                     # held arrays too
        lo = smallest_budget(trace)
        if lo >= hi:
            lo = min_feasible_budget(trace)
            print(f"outcore simulate: note: {_for_outofcore(trace)}; the rows below are "
                  "the plan's alone", file=sys.stderr)
        n = args.sweep
        return sorted({lo + (hi - lo) * i // (n - 1) for i in range(n)})
    if args.budget:
        budgets = [parse_budget(b, "--budget") for b in args.budget.split(",")]
        _past_the_device(budgets, machine)
        return budgets
    return [PRESETS[machine].fast_bytes]


def _past_the_device(budgets: list[int], machine: str) -> None:
    """Say on stderr where a budget is more than the machine's fast memory: the step
    predicted would not fit the device (helper-81: `--budget 64GiB --machine v100-16gb`
    printed a prediction and nothing else)."""
    size = PRESETS[machine].fast_bytes
    past = [b for b in budgets if b > size]
    if past:
        print(f"outcore simulate: note: the budget {format_bytes(max(past))} is more than the "
              f"{format_bytes(size)} of memory {machine} has: its prediction is for a device "
              f"larger than that one. Give a budget of at most {format_bytes(size)} (less the "
              "room the framework keeps) to predict a run on it", file=sys.stderr)


def _trace_line(trace, recorded) -> str:
    """What the simulation ran, in words: `trace`, which is `recorded` with the functions
    recompute inserted where there are any (helper-187: a bare `Trace(...)` repr, in bytes,
    with more functions than the trace just recorded and nothing saying why)."""
    remade = len(trace.functions) - len(recorded.functions)
    return (f"trace: {len(trace.functions):,} functions"
            + (f" ({remade:,} of them recomputing activations)" if remade > 0 else "")
            + f", {len(trace.arrays):,} arrays, in-core peak "
            f"{format_bytes(recorded.peak()[0])}, durations {trace.durations}")


def run(args) -> int:
    if args.recompute != "none" and (args.together or args.ranks is not None or args.strategy
                                     or args.interconnect):
        raise OutcoreError("--recompute goes with a single-device simulation, not with "
                           "--together, --ranks, --strategy or --interconnect")
    if args.together:
        return run_together(args)
    if args.per_op_us:
        raise OutcoreError("--per-op-us goes with --together")
    if args.ranks_per_node is not None:
        raise OutcoreError("--ranks-per-node goes with --together")
    if args.ranks is not None or args.strategy or args.interconnect:
        return run_cluster(args)
    if args.batch is not None:
        raise OutcoreError("--batch checks the split of a step over several devices: it goes "
                           "with --ranks, --strategy or --interconnect")
    policies = _policies(chosen_policy(args))
    options = policy_options(args)
    if args.timeline:
        check_timeline_path(args.timeline)
        check_output(args.timeline, "--timeline")
    if args.timeline and (len(args.traces) > 1 or len(policies) > 1 or args.sweep
                          or (args.budget and "," in args.budget)):
        raise OutcoreError("--timeline draws one simulated step: give one trace, one budget and "
                           "one policy")
    rows = []
    single = first = None
    for path in args.traces:
        trace = Trace.load(path)
        if not trace.functions:
            raise OutcoreError(f"{path} recorded no op (an empty step): there is nothing to "
                               "simulate. Record a step that runs the model")
        first = trace if first is None else first
        label = trace.info.get("label") or path
        for budget in _budgets(args, trace, args.machine):
            for policy in policies:
                # --policy all: each policy takes the options that are its own; one
                # policy gets them all, so that plan() refuses what it does not take.
                opts = dict(options) if len(policies) == 1 else {
                    k: v for k, v in options.items()
                    if (k == "window" and policy.startswith("adaptive"))
                    or (k in ADAPTIVE_ONLY and policy == "adaptive")
                    or (k == "k" and policy == "fixed")}
                try:                          # auto chooses on the machine simulated
                    chosen, run, schedule = choose_recompute(
                        trace, budget, mode=RECOMPUTE[args.recompute], policy=policy,
                        machine=args.machine, **opts)
                except InfeasibleBudget as exc:
                    rows.append((label, budget, policy, None, exc))
                    continue
                sim = simulate(run, schedule, args.machine)
                shown = policy + (f" +{len(chosen)} rc" if chosen else "")
                rows.append((label, budget, shown, sim, schedule))
                single = (run, schedule, sim)
    if single is None and not args.timeline:     # nothing could run: as `plan` says it, exit 2
        exc = rows[0][4]
        exc.args = (f"{exc} {_for_outofcore(first)}", *exc.args[1:])
        raise exc
    if args.timeline:
        if single is None:
            _, budget, _, _, exc = rows[0]
            raise OutcoreError(f"no timeline: the budget {format_bytes(budget)} is infeasible "
                               f"(needs {format_bytes(exc.min_feasible_bytes)})")
        from ..view.timeline import simulated_timeline, write
        write(args.timeline, simulated_timeline(*single))
    if len(rows) == 1 and single is not None:
        trace, schedule, sim = single
        print(_trace_line(trace, first))
        print(schedule.summary(trace=trace, max_lines=0))
        print(sim)
        limit = physical_limit(trace, schedule.budget, args.machine)
        print(f"  {limit}; this step takes {sim.step_time_s / limit.seconds:.2f}x it "
              "(no schedule under this budget is faster on this machine)")
        if args.timeline:
            print(f"timeline written to {args.timeline} (open it in ui.perfetto.dev or "
                  "chrome://tracing)")
        return 0
    print(f"machine {args.machine}")
    # step = in-core + recompute + stall + contention (the mover's CPU, where the machine
    # has no core to spare for it): every part of the step has its column.
    header = (f"{'trace':<34} {'budget':>11} {'policy':<16} {'in':>11} {'out':>11} "
              f"{'step ms':>10} {'in-core ms':>10} {'speed':>6} {'recomp ms':>9} "
              f"{'stall ms':>10} {'cpu ms':>9} {'between ms':>10}")
    print(header)
    print("-" * len(header))
    for label, budget, policy, sim, extra in rows:
        head = f"{label[:34]:<34} {format_bytes(budget):>11} {policy:<16}"
        if sim is None:
            print(f"{head} infeasible: needs {format_bytes(extra.min_feasible_bytes)}")
            continue
        print(f"{head} {format_bytes(sim.bytes_in):>11} {format_bytes(sim.bytes_out):>11} "
              f"{sim.step_time_s * 1e3:10.1f} {sim.plain_time_s * 1e3:10.1f} "
              f"{100 * sim.speed_vs_in_core:5.1f}% {sim.recompute_s * 1e3:9.1f} "
              f"{sim.total_stall_s * 1e3:10.1f} {sim.contention_s * 1e3:9.1f} "
              f"{sim.boundary_s * 1e3:10.1f}")
    print("step = in-core + recomp (arrays made again) + stall (waits on transfers) + cpu (the "
          "mover's CPU taking compute's cores); between: state moved between two iterations, "
          "outside the step (auto ranks plans by step + between)")
    return 0
