"""The paper's headline in simulation: ResNet-50 (fp32, 224x224, SGD with momentum) under a
16 GB budget on the v100-16gb model, batches from the in-core maximum up to 1440.

    .venv/bin/python benchmarks/paper_headline.py [--batches 192,384,...] [--budget 16GB]
    .venv/bin/python benchmarks/paper_headline.py --phases 1440 [--recompute]

Records meta traces (no memory, no compute), plans each with every policy, simulates it,
and prints a markdown table: per batch and policy, whether the budget is feasible, bytes
moved (and how many of them are held arrays written out, docs/planning.md#held-arrays),
predicted step time, throughput relative to in-core training at the largest batch that
fits, the batch's physical limit (outcore.simulate.physical_limit: no schedule is
faster) and the step's share of it, and the schedule's own bound (compute, or its
busiest link: Simulation.physical_limit_s). The last row of each batch is OutOfCore's
default, auto with recompute="auto" (plan/recompute.py): its limit is that of the trace
it runs, recomputes included. Paper (Hayakawa & Narihira): batch 1440 = 7.5x the in-core maximum at
55% of in-core speed."""
from __future__ import annotations

import argparse
import time

from outcore.errors import InfeasibleBudget
from outcore.plan import POLICIES, lower_bound, min_feasible_budget, plan, recompute
from outcore.simulate import machine as get_machine, physical_limit, simulate
from outcore.trace import record
from outcore.units import parse_bytes
from outcore import workloads

_CACHE = {}


def trace_for(batch: int):
    if batch not in _CACHE:
        w = workloads.build("resnet50", batch=batch, device="meta", optimizer="sgd", image_size=224)
        w.step()                       # warm-up: momentum buffers exist as in steady state
        with record(label=f"resnet50 batch {batch}") as rec:
            w.step()
        _CACHE[batch] = rec.trace
    return _CACHE[batch]


def held_written(trace, schedule) -> int:
    """Bytes of dead-but-held arrays (after their last use) the schedule swaps out."""
    return sum(trace.arrays[a.array].nbytes for i, step in enumerate(schedule.end) for a in step
               if a.kind == "SWAP_OUT" and trace.arrays[a.array].kind != "persistent"
               and trace.arrays[a.array].last_use <= i)


def in_core_max(budget: int, hi: int = 1440) -> int:
    """Largest batch whose in-core peak fits `budget` (bisection on recorded peaks)."""
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if trace_for(mid).peak(actual=True)[0] <= budget:    # held arrays included
            lo = mid
        else:
            hi = mid - 1
    return lo


def phases(batch: int, budget: int, m, policy: str = "auto", options: dict | None = None,
           with_recompute: bool = False) -> None:
    t = trace_for(batch)
    options = {"machine": m} if policy == "auto" else dict(options or {})
    if with_recompute:
        chosen, t, s = recompute.choose(t, budget, mode="auto", policy=policy, machine=m,
                                        **{k: v for k, v in options.items() if k != "machine"})
        options["recompute"] = len(chosen)
    else:
        s = plan(t, budget, policy, **options)
    sim = simulate(t, s, m)
    print(f"batch {batch} on {m.name}, {_label(policy, options)}: step {sim.step_time_s:.2f} s, "
          f"{s.bytes_in / 1e9:.1f} GB in, {s.bytes_out / 1e9:.1f} GB out; "
          f"{physical_limit(t, budget, m)}")
    repeats = [i for i, fn in enumerate(t.functions) if fn.repeats is not None]
    if repeats:
        print(f"  {len(repeats)} repeats (recompute): compute "
              f"{sum(sim.compute_s[i] for i in repeats):5.2f} s, stalls "
              f"{sum(sim.stall_s[i] for i in repeats):5.2f} s")
    for phase in dict.fromkeys(fn.phase for fn in t.functions):
        idx = [i for i, fn in enumerate(t.functions) if fn.phase == phase]
        a = min(sim.start_s[i] - sim.stall_s[i] for i in idx)
        b = max(sim.start_s[i] + sim.compute_s[i] for i in idx)
        busy = {d: sum(max(0.0, min(x.end_s, b) - max(x.start_s, a)) for x in sim.transfers
                       if x.direction == d) for d in ("in", "out")}
        print(f"  {phase:<10} from {a:6.2f} to {b:6.2f} s: compute "
              f"{sum(sim.compute_s[i] for i in idx):5.2f} s, stalls "
              f"{sum(sim.stall_s[i] for i in idx):5.2f} s, in-link busy {busy['in']:5.2f} s, "
              f"out-link busy {busy['out']:5.2f} s")


# Every policy by name, adaptive waiting in completion order and reserving outputs late
# (two of auto's configurations), and auto with recompute="auto" (what OutOfCore does by
# default).
NAMED = {"completion": {"wait_order": "completion"}, "late": {"outputs": "late"},
         "completion-late": {"wait_order": "completion", "outputs": "late"}}
CONFIGURATIONS = [(p, {}) for p in POLICIES]
CONFIGURATIONS[POLICIES.index("adaptive") + 1:POLICIES.index("adaptive") + 1] = [
    ("adaptive", NAMED[n]) for n in ("completion", "late", "completion-late")]
CONFIGURATIONS.append(("auto", {"recompute": "auto"}))


def _label(policy: str, options: dict) -> str:
    return (policy + (", completion order" if options.get("wait_order") == "completion" else "")
            + (", outputs late" if options.get("outputs") == "late" else "")
            + (", recompute" if options.get("recompute") else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="16GB")
    parser.add_argument("--machine", default="v100-16gb")
    parser.add_argument("--batches", help="comma-separated (default: in-core max, then 256..1440)")
    parser.add_argument("--phases", type=int, metavar="BATCH",
                        help="instead of the table: where the default policy's step at BATCH "
                             "spends its time, per phase (compute, stalls, each link busy)")
    parser.add_argument("--recompute", action="store_true",
                        help="with --phases: plan with recompute='auto', as OutOfCore does")
    parser.add_argument("--policy", default="auto",
                        help="with --phases: the policy (default auto); 'completion', 'late' "
                             "and 'completion-late' are adaptive waiting in completion order, "
                             "reserving outputs late, both")
    args = parser.parse_args()
    if (args.policy != "auto" or args.recompute) and not args.phases:
        parser.error("--policy and --recompute go with --phases (the table has every policy, "
                     "and auto with recompute)")
    if args.phases:
        policy, options = (("adaptive", NAMED[args.policy]) if args.policy in NAMED
                           else (args.policy, {}))
        return phases(args.phases, parse_bytes(args.budget), get_machine(args.machine),
                      policy, options, args.recompute)
    budget = parse_bytes(args.budget)
    start = time.perf_counter()
    base = in_core_max(budget)
    t0 = trace_for(base)
    sim0 = simulate(t0, plan(t0, budget), args.machine)
    base_rate = base / sim0.step_time_s
    print(f"in-core maximum batch under {args.budget}: {base} (peak {t0.peak(actual=True)[0] / 1e9:.2f} GB, "
          f"step {sim0.step_time_s * 1e3:.1f} ms, {base_rate:.1f} img/s on {args.machine})\n")
    batches = ([int(b) for b in args.batches.split(",")] if args.batches
               else [base, 256, 384, 512, 768, 1024, 1280, 1440])
    m = get_machine(args.machine)
    print("| batch | x in-core max | in-core peak GB | min budget GB | policy | moved GB (in+out) "
          "| held written GB | lower bound GB | step ms | img/s | speed vs in-core "
          "| limit ms | of limit | own links ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for batch in batches:
        t = trace_for(batch)
        need = min_feasible_budget(t)
        try:
            bound = f"{lower_bound(t, budget).bytes_moved / 1e9:.1f}"
        except InfeasibleBudget:
            bound = "-"
        limit = physical_limit(t, budget, m).seconds     # holds for a feasible budget only
        for policy, options in CONFIGURATIONS:
            head = (f"| {batch} | {batch / base:.2f} | {t.peak(actual=True)[0] / 1e9:.1f} | {need / 1e9:.1f} "
                    f"| {_label(policy, options)}")
            run, lim = t, limit
            try:
                # auto chooses by simulated time: on the machine simulated here
                if options.get("recompute"):
                    chosen, run, s = recompute.choose(t, budget, mode="auto", machine=m)
                    lim = physical_limit(run, budget, m).seconds    # of the trace it runs
                    head += f" ({len(chosen)} recomputed)"
                else:
                    s = plan(t, budget, policy, **({"machine": m} if policy == "auto" else options))
            except InfeasibleBudget:
                print(f"{head} | infeasible | | | | | | | | |")
                continue
            if policy == "auto" and "chosen" in s.options:    # not when the step fits
                head += f" ({_label(s.options['chosen'], s.options)})"
            head += " |"
            sim = simulate(run, s, m)
            rate = batch / sim.step_time_s
            print(f"{head} {s.bytes_moved / 1e9:.1f} | {held_written(run, s) / 1e9:.1f} | {bound} "
                  f"| {sim.step_time_s * 1e3:.0f} "
                  f"| {rate:.1f} | {100 * rate / base_rate:.0f}% | {lim * 1e3:.0f} "
                  f"| {lim / sim.step_time_s:.2f} | {sim.physical_limit_s * 1e3:.0f} |")
    print(f"\n(took {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
