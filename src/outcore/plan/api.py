"""`outcore.plan(trace, budget, policy=..., **options) -> Schedule`: a pure function."""
from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Mapping

from ..errors import OutcoreError
from ..trace.model import require_trace
from ..units import parse_bytes
from .check import replay
from .feasibility import occupancy, plan_in_core, require_feasible
from .policies import REGISTRY
from .policies.edges import END_KEEP_SHARE, check_end_keep_share, end_keep_set
from .schedule import Schedule

POLICIES = tuple(REGISTRY)


@contextlib.contextmanager
def _collector_paused():
    """NOTE [Planning and the collector]: a plan allocates several containers per
    function (action lists, heap entries, Actions) that outlive the pass. Every 700
    allocations start a young collection, and the survivors they promote start full ones
    that walk every object of the process, the trace's tens of thousands of frozen
    dataclasses included: half the planning time at 20,000 functions
    (benchmarks/plan_speed.py). Planning makes no reference cycles, so the collector is
    paused for the call, up to the Schedule it returns (the action lists become tuples
    inside the pause too), and put back in
    `finally` as it was (a caller's gc.disable() stands); whatever the call leaves for
    it is collected afterwards as usual (plan_speed.py prints what that costs)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def registered(policy: str, options, *, subject: str, what: str, hint: str = ""):
    """The registered Policy named `policy`; OutcoreError if there is none, or if it takes
    none of some `options` ("{subject} takes no {what}(s) ... (its options: ...){hint}")."""
    if not isinstance(policy, str) or policy not in POLICIES:
        raise OutcoreError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise OutcoreError(f"{subject}: {what}s must be a dict of option names to values, such "
                           f"as {{'window': '3GiB'}}; got {type(options).__name__} {options!r}")
    chosen = REGISTRY[policy]
    unknown = set(options) - chosen.options
    if unknown:
        allowed = ", ".join(sorted(chosen.options)) or "none"
        raise OutcoreError(f"{subject} takes no {what}(s) {', '.join(sorted(unknown))} "
                           f"(its options: {allowed}){hint}")
    return chosen


@functools.lru_cache(maxsize=1)
def _probe_trace():
    """Four functions over two one-byte arrays, of which one fits at a time."""
    from ..trace.model import Access, Array, Function, Trace
    fns = tuple(Function(i, op, "forward", tuple(Access(a, k) for a, k in acc))
                for i, (op, acc) in enumerate((("f0", ((0, "create"),)), ("f1", ((1, "create"),)),
                                                ("f2", ((0, "read"),)), ("f3", ((1, "read"),)))))
    arrays = tuple(Array(a, 1, "float32", "cpu", "transient", "activation", (a, 0), a, a + 2,
                         a + 2, False) for a in (0, 1))
    return Trace(fns, arrays, "cpu", "measured")


def check_options(policy: str, options: dict, *, subject: str) -> None:
    """Refuse now an option value `policy` would refuse only when it first plans (after a
    recording): plan the probe step (`_probe_trace`) under a one-byte budget with them,
    which runs the policy's own checks of every option."""
    try:
        plan(_probe_trace(), 1, policy, **options)
    except OutcoreError as err:
        raise OutcoreError(f"{subject}: {err}") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise OutcoreError(f"{subject}: an option value is not of the kind the policy takes "
                           f"({type(err).__name__}: {err}); see outcore.plan's docstring for "
                           "each option") from None


# Rounds of planning for a schedule that starts with the state it ends with (see plan()).
CYCLE_ROUNDS = 3


def _cycle(trace, policy, budget, options):
    """Plan so that iteration k+1 starts where k ended. State stays where the step leaves
    it between iterations (run/mapped.py), so state a schedule starts with in fast memory
    but ends without must be read in before the next step, and the reverse written out,
    synchronously: the boundary. Candidates: the policy's plan; plans that start with
    the state the previous candidate ended with (up to CYCLE_ROUNDS in all); and the
    best of those again with state kept at the end only if the step starts with it
    (its writes then overlap the step). Kept: the one that moves the fewest bytes,
    boundary included. Candidates are ranked by the planner's own tally
    (window.WindowPlan); only the one kept is walked through check.replay, which refuses
    any plan over the budget (R2), and the next in rank if replay refuses it. The
    policy's own plan (the first) must pass: a refusal there is a planner bug and is
    raised.

    NOTE [The last candidate]: every registered policy plans with the window planner,
    whose edges (window._WindowPlanner._edges) keep at the end `end_keep_set` and, from a
    start state S, start with the arrays of S that fit beside the first function. The
    best candidate started with `best[4]`, arrays that all fit; planned from them, the
    step starts with exactly them again, in the same order and victim priority. With
    state kept at the end only where the start holds it, the end keeps
    end_keep_set & best[4], which is end_keep_set itself when best[4] holds it all: the
    plan would be best's own, action for action, and is not made again. In steps: (1)
    start_keep_set(among=best[4]) keeps all of best[4], since each fit beside the first
    function with a superset kept before it; (2) the room made before the first function
    demotes nothing more, since best's start already fit or held only arrays that
    function uses; (3) the start list, its order and the victims' priorities are then
    best's, and so is every later step, which reads nothing else of the two options.
    tests/plan/test_properties.py compares plans with and without the shortcut."""
    state = {a.id: a.nbytes for a in trace.arrays if a.kind == "persistent" and a.existed_before}
    ranked = []         # (cost, order, plan, options used, persistent arrays at the start)

    def candidate(start_state, end_within_start):
        try:
            wp, used = policy.plan(trace, budget, **options, start_state=start_state,
                                   end_within_start=end_within_start)
        except OutcoreError:
            if not ranked:
                raise
            return None        # a start the planner cannot serve: the others stand
        starts = state.keys() & set(wp.start)
        ends = state.keys() & set(wp.resident_at_end)
        cost = wp.bytes_in + wp.bytes_out + sum(state[a] for a in starts ^ ends)
        ranked.append((cost, len(ranked), wp, used, starts))
        return starts, ends

    starts, ends = candidate(None, False)
    if options.get("keep_state", True):
        for _ in range(CYCLE_ROUNDS - 1):
            if starts == ends:
                break
            starts, ends = candidate(ends, False) or (ends, ends)
        best = min(ranked)
        share = options.get("end_keep_share", END_KEEP_SHARE)
        if best[0] > 0 and not end_keep_set(trace, budget, share) <= best[4]:
            candidate(best[4], True)      # NOTE [The last candidate], else it is best again
    for cost, order, wp, used, _ in sorted(ranked):
        try:
            acc = replay(trace, wp.begin, wp.end, wp.start, budget)
        except OutcoreError:
            if order == 0:
                raise
            continue
        return (wp.begin, wp.end, wp.start), used, acc
    raise AssertionError("unreachable: the policy's own plan is replayed or raised")


def plan(trace, budget, policy: str = "auto", **options) -> Schedule:
    """Decide, for every function of `trace`, what to swap in / wait for before it and
    swap out / drop / free after it, so fast-tier bytes never exceed `budget`.

    budget: bytes, or a string such as "6GiB". policy: one of POLICIES (see
    docs/planning.md); options: auto `machine` (a preset name or Machine to simulate
    candidates on; default cpu-disk; the schedule's options then say which policy it
    chose and what each candidate simulated to), adaptive `window` (bytes; default: no
    limit but the budget; the paper used 1.5 x budget), fixed `k`
    (functions, default 4), adaptive-belady `window`, `reserve` (fraction of the budget
    kept free for prefetching, default 0.25); every policy `keep_state` (default True:
    persistent state that fits stays resident after its last use and the step starts
    with the state it ends with, so that a training loop moves nothing between
    iterations (`_cycle`); False: state starts and ends the step on the slow tier),
    `end_keep_share` (default 0.75: the share of the budget that state kept resident
    after its last use may fill beside what each later function needs, edges.end_keep_set;
    auto tries 1.0 as well on its near ties: auto's NOTE [Shares at the end]).
    Raises InfeasibleBudget when some function cannot fit. When the whole step fits in-core (the occupancy peak, held arrays
    included: trace.peak(actual=True)), nothing moves, whatever the policy.
    For the traffic lower bound see outcore.plan.lower_bound."""
    require_trace(trace, "outcore.plan")
    if policy in ("lower-bound", "lower_bound"):
        raise OutcoreError("the lower bound is not a runnable schedule; call "
                           "outcore.lower_bound(trace, budget) for the bound in bytes")
    chosen = registered(policy, options, subject=f"policy {policy!r}", what="option")
    if not isinstance(options.get("keep_state", True), bool):
        raise OutcoreError(f"keep_state must be True or False, got {options['keep_state']!r}")
    if "end_keep_share" in options:       # checked here too: a step that fits plans nothing
        check_end_keep_share(options["end_keep_share"])
    budget = parse_bytes(budget)
    if budget <= 0:
        raise OutcoreError(f"the budget must be positive, got {budget!r} bytes: pass the fast "
                           "tier's size, e.g. '2GiB'")
    require_feasible(trace, budget)
    with _collector_paused():      # NOTE [Planning and the collector]: up to the Schedule
        if max(occupancy(trace), default=0) <= budget:     # held arrays included
            (begin, end, start), used, acc = plan_in_core(trace), dict(options), None
            used["in_core"] = True
        elif chosen.choose is not None:
            # _cycle has walked its choice through check.replay already: the same actions.
            (begin, end, start), used, acc = chosen.choose(
                trace, budget, options, lambda policy, opts: _cycle(trace, policy, budget, opts))
        else:
            (begin, end, start), used, acc = _cycle(trace, chosen, budget, options)
        begin = tuple(tuple(step) for step in begin)
        end = tuple(tuple(step) for step in end)
        start = tuple(sorted(start))
        if acc is None:
            acc = replay(trace, begin, end, start, budget)
        return Schedule(policy=policy, budget=budget, begin=begin, end=end,
                        resident_at_start=start, resident_at_end=acc.resident_at_end,
                        bytes_in=acc.bytes_in, bytes_out=acc.bytes_out,
                        peak_bytes=acc.peak_bytes, resident_curve=acc.resident_curve,
                        options=used)
