"""Recompute instead of transfer (beyond the paper): which activations to drop after
forward and make again before backward, written into the trace itself.

Where recomputing an activation y from arrays that are resident anyway costs less than
writing y out and reading it back, y is dropped after its last forward use and its
producer is run again right before backward first needs it. The recompute is written
into the trace (`rewrite`): y's forward life ends at its last forward use, and a new
array y' is created by an inserted function that *repeats* the producer
(`Function.repeats`) and takes over every later access of y. So the planner, `check`,
the simulator and the cut bound work on the rewritten trace unchanged, and a schedule
for it says, per array, what is kept, moved, or recomputed. The executor
(run/replay.py, NOTE [Replaying a recompute]) keeps the producer's arguments, discards
y's bytes where the plan frees y, and runs the repeat into y's own storage.

NOTE [Recompute rules] (cited from code as "rule N"; `check` enforces 3 as R9)
  1. Producers are the deterministic ops of PRODUCERS (convolution, batch norm), never
     an op that draws random numbers (dropout's bernoulli_) and never a view. The
     in-place follower of FOLLOWERS right after it (conv -> batch norm -> relu_, the
     pattern of every ResNet block) is repeated with it.
  2. y is created by its producer p in forward and written afterwards only by that
     follower; backward reads it again; nothing outside forward touches it before
     backward does.
  3. Every array the repeat reads holds, when the repeat runs, what it held when p ran:
     nothing writes it in between, and it is alive then (state, or released at or after
     the repeat) - or it is a recomputed array made again first. A batch norm may read
     a recomputed convolution (their repeats run together); a convolution reading a
     recomputed array only with `chains`: long chains hang each on the one before, and
     all of them land where the first of them is needed (docs/paper-headline.md), so
     "auto" plans without them, with them, and with them and temporaries (NOTE
     [Temporaries]), and keeps the fastest (`choose`).
  4. Arrays p writes besides y (batch norm's running statistics) are small, at most
     SMALL_WRITES bytes: the executor runs the repeat on copies of their values from
     before p, so that the step updates them once, as plain PyTorch does.
  5. The repeat runs right before y's first use in backward (or before the repeat of
     an array made from y, if that comes first). Its workspace is the producer's plus
     the bytes the producer creates besides y: the executor computes into fresh
     tensors, and y's own storage, which autograd holds, takes over the output's memory
     (NOTE 3 of [Replaying a recompute], run/recompute.py).
  6. Worth it: the producer's and follower's time is less than writing y out and
     reading it back on the machine (`candidates(machine=...)`). Whether the plan with
     recompute beats the plan without, by MARGIN, is decided by simulated time
     (`choose`, mode "auto").
  7. On CUDA only where PyTorch's deterministic algorithms are enabled (cuDNN may pick
     a kernel that sums in another order otherwise; `deterministic()`). On the CPU the
     ops are deterministic.
  8. Never a producer that touches a storage another library manages (`foreign`: FSDP2's
     unsharded parameters, which it frees after forward and gathers again only when
     their module's backward begins, later than a repeat may run; buffers a collective
     holds). OutOfCore passes its held and owned arrays (run/compose.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import InfeasibleBudget, OutcoreError, ScheduleError
from ..trace.model import Access, Function, Trace

# Rule 1. Ops whose output is a function of their inputs alone, bitwise, on one machine.
PRODUCERS = {
    "conv": ("aten.convolution.default",),
    "bn": ("aten.native_batch_norm.default", "aten._native_batch_norm_legit.default",
           "aten._native_batch_norm_legit.no_stats"),
}
FOLLOWERS = ("aten.relu_.default",)
# Rule 4: the most bytes a producer may write besides y (copied before it runs).
SMALL_WRITES = 1 << 20
PREFIX = "recompute:"


@dataclass(frozen=True)
class Recompute:
    """One recomputed array: `array` (y), made by function `producer`, then changed in
    place by function `follower` (-1: none). `temporary`: where the repeat of an array
    made from y needs y before y's own repeat, make a temporary copy of y for it rather
    than making y there and keeping it (NOTE [Temporaries])."""
    producer: int
    follower: int
    array: int
    temporary: bool = False


def deterministic(device: str) -> bool:
    """Rule 7: whether the ops of PRODUCERS give the same bits twice on `device`."""
    if device.split(":")[0] in ("cpu", "meta"):
        return True
    import torch
    return torch.are_deterministic_algorithms_enabled()


def _uses(trace) -> dict[int, list[tuple[int, str]]]:
    out: dict[int, list[tuple[int, str]]] = {}
    for fn in trace.functions:
        for acc in fn.accesses:
            out.setdefault(acc.array, []).append((fn.index, acc.kind))
    return out


def candidates(trace, *, kinds=("bn", "conv"), chains: bool = False,
               machine=None, min_bytes: int = 1, foreign=frozenset()) -> list[Recompute]:
    """The arrays of at least `min_bytes` (smaller ones never move: OutOfCore's
    min_move_bytes) that may be recomputed by NOTE [Recompute rules], in forward order;
    with `machine` (a preset name or Machine), only those where recomputing costs less
    than moving (rule 6). Nothing touching an array of `foreign` is (rule 8)."""
    if not deterministic(trace.device):
        return []
    from ..simulate import machine as get_machine
    m = get_machine(machine) if machine is not None else None
    fns, arrays = trace.functions, trace.arrays
    wanted = {op: kind for kind in kinds for op in PRODUCERS[kind]}
    uses = _uses(trace)
    out, made = [], set()
    for fn in fns:
        if fn.op not in wanted or fn.phase != "forward" or fn.repeats is not None:
            continue
        created = [a.array for a in fn.accesses if a.kind == "create"]
        reads = [a.array for a in fn.accesses if a.kind == "read"]
        writes = [a.array for a in fn.accesses if a.kind == "write"]
        if not created or not reads or sum(arrays[a].nbytes for a in writes) > SMALL_WRITES:
            continue                                                    # rules 1, 4
        if foreign and not foreign.isdisjoint(a.array for a in fn.accesses):
            continue                                                    # rule 8
        y = created[0]
        if arrays[y].nbytes < min_bytes:
            continue
        follower = -1
        if (fn.index + 1 < len(fns) and fns[fn.index + 1].op in FOLLOWERS
                and [(a.array, a.kind) for a in fns[fn.index + 1].accesses] == [(y, "write")]):
            follower = fn.index + 1
        y_uses = uses[y]
        backward = [f for f, _ in y_uses if fns[f].phase == "backward"]
        if (not backward or any(k == "write" and f != follower for f, k in y_uses)
                or arrays[y].kind != "transient"):
            continue                                                    # rule 2
        first_back = backward[0]
        if any(f < first_back and fns[f].phase != "forward" for f, _ in y_uses):
            continue                                                    # rule 2
        if wanted[fn.op] == "conv" and not chains and any(x in made for x in reads):
            continue                                                    # rule 3: no chains
        if not all(_holds(trace, uses, x, fn.index, first_back, made) for x in reads):
            continue                                                    # rule 3
        if m is not None:                                               # rule 6
            redo = m.compute_time(fn) + (m.compute_time(fns[follower]) if follower >= 0 else 0.0)
            nbytes = arrays[y].nbytes
            if redo >= m.transfer_time(nbytes, "out") + m.transfer_time(nbytes, "in"):
                continue
        out.append(Recompute(fn.index, follower, y))
        made.add(y)
    return out


def _first_backward(trace, uses, y: int) -> int:
    """The first function of backward that uses array y (a recomputed array has one)."""
    return next(f for f, _ in uses[y] if trace.functions[f].phase == "backward")


def _holds(trace, uses, x: int, p: int, until: int, made) -> bool:
    """Rule 3: array x, read by function p, still holds the same bytes at function
    `until` (or is made again before, when in `made`)."""
    if x in made:
        return True
    arr = trace.arrays[x]
    if any(p < f < until and kind != "read" for f, kind in uses[x]):
        return False
    if arr.kind == "persistent":
        return True
    release = arr.freed_after if arr.freed_after is not None else len(trace.functions)
    return release >= until


def rewrite(trace, chosen) -> Trace:
    """The trace with each chosen array recomputed (module docstring; rule 5).

    NOTE [Temporaries]. A repeat that reads a recomputed x whose own repeat comes later
    (a chain) needs x earlier than backward does. By default x' is made there, with that
    repeat, and kept until its own uses. Where x is chosen `temporary`, a temporary copy
    of x is made for that repeat alone, freed right after it, and x' is made again where
    backward first needs it: compute traded for memory. On ResNet-50 at batch 1440 under
    16 GB (v100-16gb) the chain's first arrays, made with the block's largest and kept,
    do not fit beside it and are written out and read back; `temporaries` picks which
    arrays to copy, and `choose` plans with them beside the plans without. The executor
    discards and remakes the same storage once per copy (NOTE 5 of [Replaying a
    recompute], run/recompute.py)."""
    if not chosen:
        return trace
    fns, arrays = list(trace.functions), list(trace.arrays)
    uses = _uses(trace)
    by_array = {c.array: c for c in chosen}
    ys = list(by_array)
    inputs = {c.array: [a.array for a in fns[c.producer].accesses if a.kind == "read"]
              for c in chosen}
    # Where each y is made again: its first backward use, or earlier where the repeat of
    # an array made from it comes first and holds it.
    point = {y: _first_backward(trace, uses, y) for y in ys}
    changed = True
    while changed:
        changed = False
        for y in ys:
            for x in inputs[y]:
                if x in point and point[x] > point[y] and not by_array[x].temporary:
                    point[x], changed = point[y], True
    again = {y: len(arrays) + i for i, y in enumerate(ys)}            # y -> y'
    new_arrays = []
    for y in ys:
        orig = arrays[y]
        last_forward = max(f for f, _ in uses[y] if f < point[y])
        new_arrays.append(dataclasses.replace(orig, id=again[y]))
        arrays[y] = dataclasses.replace(orig, last_use=last_forward, freed_after=last_forward)
    temporaries: dict[tuple[int, int], int] = {}     # (x, where) -> its temporary's id

    def repeats(y: int, where: int, made: int) -> list[Function]:
        """The functions that make y into array `made` before function `where`: the
        temporaries its producer reads first, then the producer and its follower."""
        c = by_array[y]
        p = fns[c.producer]
        out, reads = [], []
        for acc in p.accesses:
            if acc.kind != "read":
                continue
            x = acc.array
            if x in by_array and point[x] > where:            # not made yet: a temporary
                if (x, where) not in temporaries:
                    temporaries[x, where] = len(arrays) + len(new_arrays)
                    new_arrays.append(dataclasses.replace(trace.arrays[x],
                                                          id=temporaries[x, where]))
                    out += repeats(x, where, temporaries[x, where])
                reads.append(Access(temporaries[x, where], "read"))
            else:
                reads.append(Access(again.get(x, x), "read"))
        besides = sum(trace.arrays[a.array].nbytes for a in p.accesses
                      if a.kind == "create" and a.array != y)                  # rule 5
        out.append(dataclasses.replace(
            p, op=PREFIX + p.op, phase="backward", accesses=tuple(reads) + (Access(made, "create"),),
            host_s=0.0, host_cpu_s=0.0, repeats=c.producer,
            workspace_bytes=p.workspace_bytes + besides))
        if c.follower >= 0:
            f = fns[c.follower]
            out.append(dataclasses.replace(
                f, op=PREFIX + f.op, phase="backward", accesses=(Access(made, "write"),),
                host_s=0.0, host_cpu_s=0.0, repeats=c.follower))
        return out

    inserts: dict[int, list[Function]] = {}          # before function g: the repeats
    for c in sorted(chosen, key=lambda c: c.producer):       # forward order: inputs first
        inserts.setdefault(point[c.array], []).extend(
            repeats(c.array, point[c.array], again[c.array]))
    # Renumber: repeats go right before their point; later accesses of y are y''s.
    out_fns, new_index = [], {}
    for f, fn in enumerate(fns):
        out_fns.extend(inserts.get(f, []))
        new_index[f] = len(out_fns)
        accesses = tuple(Access(again[a.array] if a.array in again and f >= point[a.array]
                                else a.array, a.kind) for a in fn.accesses)
        out_fns.append(dataclasses.replace(fn, accesses=accesses))
    out_fns = [dataclasses.replace(fn, index=i, repeats=None if fn.repeats is None
                                   else new_index[fn.repeats])
               for i, fn in enumerate(out_fns)]
    # Each array's uses, origin and release in the new order. y' is released where y was
    # (None: alive at the end); y after its last forward use; a temporary after its use.
    first, last, origin = {}, {}, {}
    for fn in out_fns:
        for slot, acc in enumerate(fn.accesses):
            first.setdefault(acc.array, fn.index)
            origin.setdefault(acc.array, (fn.index, slot))
            last[acc.array] = fn.index
    died = {again[y]: trace.arrays[y].freed_after for y in ys}
    temporary = set(temporaries.values())
    all_arrays = []
    for arr in arrays + new_arrays:
        freed = died[arr.id] if arr.id in died else arr.freed_after
        if arr.id in temporary:
            freed = last[arr.id]
        elif freed is not None:
            freed = max(new_index[freed], last[arr.id])
        all_arrays.append(dataclasses.replace(arr, first_use=first[arr.id], last_use=last[arr.id],
                                              origin=origin[arr.id], freed_after=freed))
    info = dict(trace.info)
    info["recomputed"] = len(chosen)
    info["remade_as"] = [[y, again[y]] for y in ys]       # `plain_live_bytes`
    return Trace(functions=tuple(out_fns), arrays=tuple(all_arrays), device=trace.device,
                 durations=trace.durations, info=info)


# NOTE [Temporaries]: an array is held for a repeat that needs it early when backward
# needs it within this many functions anyway, or when it is smaller than this share of
# the budget; otherwise it is a temporary.
TEMPORARY_WITHIN = 3
TEMPORARY_SHARE = 1 / 16


def temporaries(trace, chosen, budget: int) -> list[Recompute]:
    """`chosen` with `temporary` set by NOTE [Temporaries]'s rule: for an array another
    chosen repeat reads, unless backward first needs it within TEMPORARY_WITHIN
    functions of that repeat's array, or it is smaller than TEMPORARY_SHARE of the
    budget."""
    uses = _uses(trace)
    by_array = {c.array: c for c in chosen}
    early = set()
    for c in chosen:
        for acc in trace.functions[c.producer].accesses:
            x = acc.array
            if (acc.kind == "read" and x in by_array
                    and trace.arrays[x].nbytes >= budget * TEMPORARY_SHARE
                    and (_first_backward(trace, uses, x) - _first_backward(trace, uses, c.array)
                         > TEMPORARY_WITHIN)):
                early.add(x)
    return [dataclasses.replace(c, temporary=c.array in early) for c in chosen]


def verify(trace) -> None:
    """R9 of `check` (rule 3): a repeat reads exactly what its original read - each array
    as it was, nothing having written it in between, or the copy an earlier repeat made
    of it - and makes one array (a repeated producer), or writes the one the repeat
    right before it made (a repeated follower, itself right after its producer in the
    step). Raises ScheduleError."""
    fns = trace.functions
    made: dict[int, int] = {}              # array a repeat made -> the array it stands for
    writes_at: dict[int, list[int]] = {}
    for fn in fns:
        for acc in fn.accesses:
            if acc.kind != "read":
                writes_at.setdefault(acc.array, []).append(fn.index)
    for fn in fns:
        if fn.repeats is None:
            continue
        p = fns[fn.repeats]
        where = f"R9: function {fn.index} ({fn.op}) repeats function {p.index} ({p.op})"
        if p.repeats is not None or fn.op != PREFIX + p.op or p.index >= fn.index:
            raise ScheduleError(f"{where}, which is not an earlier recorded function of that op")
        reads = [a.array for a in fn.accesses if a.kind == "read"]
        if {made.get(a, a) for a in reads} != {a.array for a in p.accesses if a.kind == "read"}:
            raise ScheduleError(f"{where}: it does not read what the original read")
        for a in reads:
            wrote = [w for w in writes_at.get(a, ()) if p.index < w < fn.index]
            if a not in made and wrote:
                raise ScheduleError(f"{where}: array {a} it reads was written by function "
                                    f"{wrote[0]} in between, so the repeat would not give "
                                    "the same bytes")
        creates = [a.array for a in fn.accesses if a.kind == "create"]
        writes = [a.array for a in fn.accesses if a.kind == "write"]
        p_creates = [a.array for a in p.accesses if a.kind == "create"]
        if creates:
            if len(creates) != 1 or writes or not p_creates:
                raise ScheduleError(f"{where}: a repeated producer makes exactly one array")
            made[creates[0]] = p_creates[0]
            continue
        before = fns[fn.index - 1] if fn.index else None
        made_before = [a.array for a in before.accesses if a.kind == "create"] if before else []
        if (before is None or before.repeats != p.index - 1 or writes != made_before
                or [(a.array, a.kind) for a in p.accesses]
                != [(made[made_before[0]], "write")]):
            raise ScheduleError(f"{where}: a repeated follower must come right after its "
                                "producer's repeat and write the array that repeat made")


MODES = ("auto", True, False)


def check_mode(mode) -> None:
    """OutcoreError unless `mode` is one of MODES (True and False themselves: 1 is not)."""
    if not any(mode is m or mode == m == "auto" for m in MODES):
        raise OutcoreError(f"recompute must be 'auto', True (every activation the rules allow: "
                           f"the command line's --recompute all) or False (--recompute none), "
                           f"got {mode!r}")


def plain_live_bytes(trace) -> list[int]:
    """What plain PyTorch holds during each function of `trace` (`Trace.live_bytes` with
    actual=True), where `trace` may be one `rewrite` gave repeats: plain PyTorch runs
    none of them and keeps each recomputed y from its making to where its remade y' dies,
    so y' and the repeats' temporaries and workspace count for nothing, and a repeat's
    row is the one before it (the views drew the recomputing step's memory as plain
    PyTorch's: 35.51 GiB for a ResNet-50 whose plain step holds 116.48 GiB, helper-204)."""
    remade_as = trace.info.get("remade_as")
    if not remade_as:
        return trace.live_bytes(actual=True)
    from ..trace.lifetimes import live_interval
    n = len(trace.functions)
    arrays = trace.arrays
    made_by_repeat = {acc.array for fn in trace.functions if fn.repeats is not None
                      for acc in fn.accesses if acc.kind == "create"}
    end_of = {y: live_interval(arrays[again], n, actual=True)[1] for y, again in remade_as}
    delta = [0] * (n + 1)
    for arr in arrays:
        if arr.id in made_by_repeat:
            continue
        start, end = live_interval(arr, n, actual=True)
        end = max(end, end_of.get(arr.id, end))
        delta[start] += arr.nbytes
        delta[end + 1] -= arr.nbytes
    curve, running = [], 0
    for i, fn in enumerate(trace.functions):
        running += delta[i]
        if fn.repeats is not None:
            curve.append(curve[-1] if curve else running)
        else:
            curve.append(running + fn.workspace_bytes)
    return curve


def remade(trace) -> list[tuple[int, int]]:
    """(function, array) for every repeat of a producer in `trace`: what it makes again."""
    return [(fn.index, a.array) for fn in trace.functions if fn.repeats is not None
            for a in fn.accesses if a.kind == "create"]


# Rule 6 for the whole plan: "auto" keeps recompute only if its plan simulates at least
# this much faster. The simulator charges a repeat its producer's recorded time, not the
# fresh memory it fills (its output's pages faulted in); on this 2-core CPU plans
# simulated a few percent faster with recompute ran as fast or slower (docs/planning.md,
# "Recompute"), while on the GPU presets recompute gains 5-50% (docs/paper-headline.md).
MARGIN = 0.05


def choose(trace, budget: int, *, mode="auto", policy: str = "auto", machine="cpu-disk",
           min_bytes: int = 1, foreign=frozenset(), **options):
    """(chosen, the trace to run, its Schedule). `mode`: False plans `trace` as it is, and
    so does every mode when the whole step fits the budget (nothing to gain); True
    recomputes every array of at least `min_bytes` that rules 1-5, 7 and 8 allow
    (`foreign`: rule 8), without chains; "auto" those where rule 6 holds on `machine`,
    without chains, with them (rule 3), and with them and `temporaries` where that rule
    copies any (NOTE [Temporaries]), and keeps the fastest by simulated iteration there,
    and only if it is faster than the plan without recompute by MARGIN.
    A plan whose repeats do not fit the budget falls back to the plan without. `policy`
    and `options` go to plan() for each."""
    from ..simulate import simulate
    from ..units import parse_bytes
    from .api import plan
    from .feasibility import occupancy
    check_mode(mode)
    if policy == "auto":
        options.setdefault("machine", machine)
    if max(occupancy(trace), default=0) <= parse_bytes(budget):      # fits: as plan() sees it
        mode = False
    base = None if mode is True else plan(trace, budget, policy, **options)
    sets = []                                   # the candidate sets to plan, distinct
    if mode is not False:
        for chains in ((False, True) if mode == "auto" else (False,)):
            chosen = candidates(trace, machine=machine if mode == "auto" else None,
                                min_bytes=min_bytes, foreign=foreign, chains=chains)
            if chosen and chosen not in sets:
                sets.append(chosen)
            copied = temporaries(trace, chosen, parse_bytes(budget)) if chains else []
            if any(c.temporary for c in copied):                # NOTE [Temporaries]
                sets.append(copied)
    if policy == "auto" and base is not None and "configuration" in base.options:
        # Plan each rewritten trace with the configuration auto chose for the trace as
        # recorded, and its share for state kept at the end (auto's NOTE [Shares at the
        # end]), not all of them again: planning stays within about twice auto's.
        options = {**options, "screen": [base.options["configuration"]]}
        if "end_keep_share" in base.options:
            options["end_keep_share"] = base.options["end_keep_share"]
    best = None                                 # (seconds, chosen, trace, schedule)
    for chosen in sets:
        again = rewrite(trace, chosen)
        try:
            schedule = plan(again, budget, policy, **options)
        except InfeasibleBudget:  # the repeats' workspace does not fit beside the rest
            continue
        seconds = simulate(again, schedule, machine).iteration_time_s if base is not None else 0
        if best is None or seconds < best[0]:
            best = (seconds, chosen, again, schedule)
    if best is None:
        return [], trace, base if base is not None else plan(trace, budget, policy, **options)
    if base is not None and (best[0] > (1 - MARGIN)
                             * simulate(trace, base, machine).iteration_time_s):
        return [], trace, base
    return best[1], best[2], best[3]
