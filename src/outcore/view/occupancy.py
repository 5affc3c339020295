"""Fast- and slow-tier bytes per function of a schedule, by what the arrays are for.

`by_category` walks a schedule the way `outcore.check` does (plan/check.py, which
enforces the rules; this walk assumes them) and keeps, per function, the fast-tier
bytes of each category (`Trace.arrays[i].category`: parameter, gradient, activation...)
and the bytes that are only on the slow tier. A trace whose functions take workspace
(NOTE [Workspace], plan/feasibility.py) gets a last column, "workspace", with each
function's own. Its rows add up to the schedule's `resident_curve`, function by
function (tests/view/test_timeline.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..plan.recompute import plain_live_bytes
from ..plan.schedule import DROP, FREE, SWAP_IN, SWAP_OUT, WAIT
from ..trace.model import CATEGORIES


@dataclass(frozen=True)
class Occupancy:
    categories: tuple[str, ...]           # those the trace has, in CATEGORIES order
    fast: tuple[tuple[int, ...], ...]     # per function: bytes per category while it runs
    slow: tuple[int, ...]                 # per function: bytes only on the slow tier
    in_core: tuple[int, ...]              # per function: what plain PyTorch held (actual;
                                          # with repeats, as without: plain_live_bytes)

    def total(self, index: int) -> int:
        return sum(self.fast[index])


def by_category(trace, schedule) -> Occupancy:
    arrays = trace.arrays
    present = {a.category for a in arrays}
    categories = tuple(c for c in CATEGORIES if c in present) + tuple(sorted(present - set(CATEGORIES)))
    workspace = any(fn.workspace_bytes for fn in trace.functions)
    categories += ("workspace",) if workspace else ()
    column = {c: k for k, c in enumerate(categories)}
    col = [column[a.category] for a in arrays]
    nbytes = [a.nbytes for a in arrays]
    fast = [0] * (len(categories) - workspace)     # arrays only
    in_fast = [False] * len(arrays)       # occupies fast memory (FAST, or OUT until its WAIT)
    only_slow = [False] * len(arrays)     # its bytes are on the slow tier alone (SLOW)
    slow = 0

    def enter(a):
        in_fast[a] = True
        fast[col[a]] += nbytes[a]

    def leave(a):
        in_fast[a] = False
        fast[col[a]] -= nbytes[a]

    def to_slow(a, yes):
        nonlocal slow
        if only_slow[a] != yes:
            only_slow[a] = yes
            slow += nbytes[a] if yes else -nbytes[a]

    # 1. The start: resident what the schedule starts with; the rest of the state is out.
    start = set(schedule.resident_at_start)
    for a in arrays:
        if a.id in start:
            enter(a.id)
        elif a.existed_before:
            to_slow(a.id, True)
    rows, slows = [], []
    for i, fn in enumerate(trace.functions):
        # 2. Begin-actions: a swap-in takes its room when issued; a WAIT frees a swap-out's.
        for act in schedule.begin[i]:
            if act.kind == SWAP_IN:
                to_slow(act.array, False)
                enter(act.array)
            elif act.kind == WAIT:
                leave(act.array)
                to_slow(act.array, True)
        # 3. The function creates its outputs in fast memory.
        for acc in fn.accesses:
            if acc.kind == "create" and not in_fast[acc.array]:
                enter(acc.array)
        rows.append(tuple(fast) + ((fn.workspace_bytes,) if workspace else ()))
        slows.append(slow)
        # 4. End-actions: FREE and DROP let go at once, a swap-out only at its WAIT.
        for act in schedule.end[i]:
            a = act.array
            if act.kind == FREE:
                if in_fast[a]:
                    leave(a)
                to_slow(a, False)
            elif act.kind == DROP:
                leave(a)
                to_slow(a, True)
            elif act.kind == WAIT:
                leave(a)
                to_slow(a, True)
            elif act.kind != SWAP_OUT:
                raise ValueError(f"{act.kind} is not an end-action")
    return Occupancy(categories, tuple(rows), tuple(slows), tuple(plain_live_bytes(trace)))
