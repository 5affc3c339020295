"""State at the edges of the step (`keep_state`, docs/planning.md): which persistent arrays
the window engine leaves resident at the start and after their last use.

The executor leaves state where the step leaves it between iterations (run/mapped.py).
The state used last (the optimizer's final updates) stays resident after its last use
instead of being written out (`end_keep_set`), and the step starts with resident state
that fits beside it (`start_keep_set`, or the state an earlier plan ended with:
api._cycle). Kept arrays are eviction victims for a function's own operands like held
arrays (window.py, `_Victims`), so feasibility is untouched.
"""
from __future__ import annotations

from ..feasibility import needs, occupancy

END_KEEP_SHARE = 0.75


def end_keep_set(trace, budget: int, share: float = END_KEEP_SHARE) -> set[int]:
    """Persistent arrays to leave resident after their last use: latest last use first,
    each kept if, at every later function g, needs(g) plus the bytes already kept before
    g plus its own stay within share x budget."""
    n = len(trace.functions)
    need = needs(trace)
    cap = int(budget * share)
    kept: set[int] = set()
    tracked_max = 0            # max over tracked g of needs(g) + kept bytes resident at g
    low = n - 1                # g in (low, n - 1] are tracked
    for a in sorted((a for a in trace.arrays if a.kind == "persistent"),
                    key=lambda a: -a.last_use):
        while low > a.last_use:            # g in (last_use, low]: nothing kept is resident yet
            tracked_max = max(tracked_max, need[low])
            low -= 1
        if tracked_max + a.nbytes <= cap:
            kept.add(a.id)
            tracked_max += a.nbytes
    return kept


def start_keep_set(trace, budget: int, share: float = 1.0, among=None) -> set[int]:
    """Persistent arrays to leave resident at the start instead of writing them out (a
    first guess for plan(), which then starts from the state a plan ends with): earliest first use
    first, each kept if, at every function up to its first use, the bytes of everything
    else that is alive then (nothing moved) plus what is kept stay within share x budget.
    With a budget near the in-core peak this keeps almost all state where it is; with a
    tight one, none (there is no room beside the activations). `among`: only these
    arrays are candidates, each kept if it fits beside the first function (later ones
    evict kept state for room; before the first there is no function to do it after)."""
    state = [a for a in trace.arrays if a.kind == "persistent" and a.existed_before]
    candidates = state if among is None else [a for a in state if a.id in among]
    if not state or not trace.functions:
        return set()
    total = sum(a.nbytes for a in state)
    cap = int(budget * share)
    val = [max(0, occ - total) for occ in occupancy(trace)]     # what is not state
    kept: set[int] = set()
    # Each candidate asks about the functions before `upto`, and `upto` never decreases
    # (first uses in order; 1 for all with `among`). So whatever was kept before covers
    # every function asked about so far: `worst`, the most any of them holds with what
    # is kept, grows by each kept array's bytes, and by the functions a new `upto` adds
    # (untouched by earlier keeps). One pass, not one per candidate.
    worst, covered = 0, 0
    for a in sorted(candidates, key=lambda a: a.first_use):
        upto = a.first_use + 1 if among is None else 1
        if upto > covered:
            worst = max(worst, max(val[covered:upto]))
            covered = upto
        if a.nbytes == 0 or worst + a.nbytes <= cap:    # 0 B: held (run/compose.py)
            kept.add(a.id)
            worst += a.nbytes
    return kept
