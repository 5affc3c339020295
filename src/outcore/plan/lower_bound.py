"""A traffic lower bound: the fewest bytes any schedule must move under a budget.

Not a runnable policy: a number to judge the policies by. With full knowledge of the
future, at every function f the bytes that exist (the occupancy, see below) beyond the budget must sit on the slow tier. Bytes on the slow tier belong to arrays in a
*gap* — between two uses, or before the first use of an array that existed before the
step, or after the last use of a persistent one — and each evicted byte of a gap that
ends in a use must be read back (cost 1 per byte); trailing gaps of persistent arrays
may cost nothing (an unmodified array is dropped), so they are counted free.

Held arrays (docs/planning.md#held-arrays): the bytes that exist are the occupancy curve
(feasibility.occupancy, = trace.live_bytes(actual=True)), which includes arrays after
their last use until PyTorch releases them. Such a *held interval* [last use + 1,
release] can only be vacated by a copy to the slow tier made after the array's last write
(or creation; an input has no slow copy to begin with): a SWAP_OUT while it is held, or an
earlier swap-out that left it clean so that it can be DROPped. Either way it is a
swap-out of that array that nothing else in the bound pays for (gaps are charged for
their read-back, never for their write), so a held interval costs 1 per byte vacated.
The bound is thus on bytes read back plus held bytes written, hence on bytes moved.

Relaxations, each of which can only lower the optimum (so the result is a true bound):
gaps may be evicted fractionally, swap-out traffic is not charged (beyond the one
swap-out per held interval above), in-flight copies
occupy nothing, inputs are resident at function 0 (as every schedule has them). For
that relaxed problem — covering the excess at every function with intervals at unit cost
per byte — Belady's rule is optimal: take the free gaps, then the gaps (held intervals
included) that end farthest. Ties and sizes do not matter in the fractional version.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from ..units import format_bytes, parse_bytes
from ..trace.model import require_trace
from .feasibility import occupancy, release_points, require_feasible


@dataclass(frozen=True)
class LowerBound:
    budget: int
    bytes_moved: int        # bytes read back plus held bytes written, at least, for any schedule

    def __str__(self) -> str:
        return (f"Traffic lower bound under {format_bytes(self.budget)}: any schedule moves at "
                f"least {format_bytes(self.bytes_moved)} ({self.bytes_moved} B)")


def lower_bound(trace, budget) -> LowerBound:
    """The fewest bytes any schedule of `trace` moves under `budget` (bytes, or a size
    with its unit such as "2GiB"): a yardstick for the plans, not a plan (module
    docstring). Raises InfeasibleBudget where no schedule can run the step at all."""
    require_trace(trace, "outcore.lower_bound")
    budget = parse_bytes(budget)
    require_feasible(trace, budget)
    n = len(trace.functions)
    live = occupancy(trace)
    if not n or max(live) <= budget:
        return LowerBound(budget, 0)
    release = release_points(trace)
    uses = [[] for _ in trace.arrays]
    for fn in trace.functions:
        for acc in fn.accesses:
            u = uses[acc.array]
            if not u or u[-1] != fn.index:
                u.append(fn.index)
    starts = [[] for _ in range(n)]      # (end, nbytes, free) of gaps opening at f
    for a in trace.arrays:
        u = uses[a.id]
        if a.nbytes == 0:
            continue
        if a.existed_before and u[0] > 0:
            first = 1 if a.kind == "input" else 0
            if first <= u[0] - 1:
                starts[first].append((u[0] - 1, a.nbytes, False))
        for u1, u2 in zip(u, u[1:]):
            if u2 > u1 + 1:
                starts[u1 + 1].append((u2 - 1, a.nbytes, False))
        if a.kind == "persistent" and u[-1] < n - 1:
            starts[u[-1] + 1].append((n - 1, a.nbytes, True))
        elif a.kind != "persistent" and release[a.id] > u[-1]:      # held interval
            starts[u[-1] + 1].append((release[a.id], a.nbytes, False))
    expire = [0] * (n + 1)
    heap = []          # (-end, seq, remaining capacity)
    covered = cost = seq = 0
    for f in range(n):
        covered -= expire[f]
        for end, nbytes, free in starts[f]:
            if free:
                covered += nbytes
                expire[end + 1] += nbytes
            else:
                heapq.heappush(heap, (-end, seq, nbytes))
                seq += 1
        deficit = live[f] - budget - covered
        while deficit > 0 and heap:
            neg_end, s, cap = heapq.heappop(heap)
            if -neg_end < f:
                continue
            take = min(cap, deficit)
            covered += take
            cost += take
            deficit -= take
            expire[-neg_end + 1] += take
            if cap > take:
                heapq.heappush(heap, (neg_end, s, cap - take))
        if deficit > 0:   # cannot happen for a feasible budget; be loud if it does
            raise AssertionError(f"lower bound: function {f} cannot be covered")
    return LowerBound(budget, cost)
