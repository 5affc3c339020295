"""`adaptive-belady`: the paper's window, plus offline keep/evict decisions (beyond the paper).

The paper swaps an array out as soon as the window holds no further use of it, even when
the budget could have kept it until it is needed again. Here a first pass decides, with
the whole future known, which gaps between two uses of an array stay resident: sweep the
functions, tentatively keep every gap, and when the kept gaps plus the function's own
arrays exceed (1 - reserve) x budget, evict the kept gap whose next use is farthest
(Belady's rule). The remaining `reserve` share of the budget is left for the window's
prefetches and in-flight swap-outs, so transfers still hide behind compute. The second
pass is the adaptive window scheduler with those gaps pinned resident."""
from __future__ import annotations

import heapq

from ...errors import OutcoreError
from ..feasibility import needs
from .adaptive import window_limit
from . import register
from .edges import END_KEEP_SHARE, end_keep_used
from .window import access_table, plan_window

DEFAULT_RESERVE = 0.25


def keep_gaps(trace, limit: int) -> set[tuple[int, int]]:
    """(array, f) for each gap after use f that stays resident under `limit` bytes."""
    n = len(trace.functions)
    need = needs(trace)
    acc_fn, acc_arr, nxt, _ = access_table(trace)
    nb = [a.nbytes for a in trace.arrays]
    opening = [[] for _ in range(n)]
    for pos, nu in enumerate(nxt):
        f = acc_fn[pos]
        if nu > f + 1:
            opening[f + 1].append((nu, acc_arr[pos], f))
    kept: set[tuple[int, int]] = set()
    heap = []              # (-next use, array, f) of kept gaps
    expire = [0] * (n + 1)
    load = 0
    for f in range(n):
        load -= expire[f]
        for nu, a, u in opening[f]:
            kept.add((a, u))
            heapq.heappush(heap, (-nu, a, u))
            load += nb[a]
            expire[nu] += nb[a]
        while need[f] + load > limit and heap:
            neg_nu, a, u = heapq.heappop(heap)
            if -neg_nu <= f:
                continue          # gap already over (its bytes left `load` at its end)
            kept.discard((a, u))
            load -= nb[a]
            expire[-neg_nu] -= nb[a]
    return kept


@register("adaptive-belady", {"window", "reserve"},
          "adaptive plus offline Belady keep decisions (beyond the paper)")
def plan_adaptive_belady(trace, budget: int, *, window=None, reserve=DEFAULT_RESERVE, keep_state=True,
                         start_state=None, end_within_start=False,
                         end_keep_share=END_KEEP_SHARE):
    if not isinstance(reserve, (int, float)) or not 0 <= reserve < 1:
        raise OutcoreError(f"adaptive-belady: reserve must be a fraction in [0, 1), got {reserve!r}")
    limit = window_limit(window)
    keep_limit = int(budget * (1 - reserve))
    kept = keep_gaps(trace, keep_limit)
    planned = plan_window(trace, budget, window_bytes=limit, keep=lambda a, f: (a, f) in kept,
                        keep_state=keep_state, start_state=start_state,
                        end_within_start=end_within_start, end_keep_share=end_keep_share)
    return planned, {"window": limit, "reserve": reserve, "keep_state": keep_state,
                     **end_keep_used(end_keep_share)}
