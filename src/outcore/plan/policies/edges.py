"""State at the edges of the step (`keep_state`, docs/planning.md): which persistent arrays
the window engine leaves resident at the start and after their last use.

The executor leaves state where the step leaves it between iterations (run/mapped.py).
The optimizer's state the next step uses first stays resident after its last use
instead of being written out (`end_keep_set`), and the step starts with resident state
that fits beside it (`start_keep_set`, or the state an earlier plan ended with:
api._cycle). Kept arrays are eviction victims for a function's own operands like held
arrays (window.py, `_Victims`), so feasibility is untouched.
"""
from __future__ import annotations

import numpy as np

from ..feasibility import needs, occupancy

END_KEEP_SHARE = 0.75


def end_keep_set(trace, budget: int, share: float = END_KEEP_SHARE) -> set[int]:
    """Persistent arrays to leave resident after their last use, each kept if, at every
    later function g, needs(g) plus the bytes already kept resident at g plus its own
    stay within share x budget. Tried in this order: first the arrays last used in the
    optimizer's part of the step (from its first function on), the one the next step
    uses first first (Belady's rule at the step's edge: an array's next use is its first
    use in the next step); then the others, latest last use first (the shortest stay).

    The optimizer's arrays were kept latest last use first until 2026-12-06: the
    optimizer's final updates, the deepest layers, which the next forward needs last,
    so they sat in the budget while the first layers were read in and the activations
    grew, and were written out for them. Simulated on CPU-recorded steps, the order
    above is 4-5% shorter for ResNet-50 64x64 at a quarter of its peak and GPT-2 at half
    its peak and at its floor, and within 0.4% elsewhere (CHANGELOG, 2026-12-06 fourth
    session). Arrays last used before the optimizer (batch-norm
    statistics, or every array of a step without an optimizer) would stay across the
    step's peak by first use, and a small one kept from the second function can leave
    no room for a large one used at the end (tests/plan/test_properties.py,
    `test_outputs_late_can_pick_a_costly_victim`): they keep the shortest stay first."""
    n = len(trace.functions)
    need = np.asarray(needs(trace), dtype=np.int64)
    cap = int(budget * share)
    kept: set[int] = set()
    kept_at = np.zeros(n, dtype=np.int64)   # bytes kept resident at each function
    worst = np.zeros(n + 1, dtype=np.int64)  # worst[g]: max over h >= g of need + kept_at
    worst[:n] = np.maximum.accumulate(need[::-1])[::-1]
    fns = trace.functions
    tail = next((i for i, f in enumerate(fns) if f.phase == "optimizer"), n)

    def order(a):                           # the optimizer's arrays by first use, then
        if a.last_use >= tail:              # the rest by latest last use
            return (0, a.first_use, a.id)
        return (1, -a.last_use, a.id)
    for a in sorted((a for a in trace.arrays if a.kind == "persistent"), key=order):
        after = a.last_use + 1              # resident from here to the step's end
        if int(worst[after]) + a.nbytes <= cap:
            kept.add(a.id)
            kept_at[after:] += a.nbytes
            worst[:n] = np.maximum.accumulate((need + kept_at)[::-1])[::-1]
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
