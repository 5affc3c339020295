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

from ...errors import OutcoreError
from ..feasibility import needs, occupancy

END_KEEP_SHARE = 0.75        # the default; auto also screens 1.0 (auto.END_KEEP_SHARES)


def check_end_keep_share(share) -> None:
    """OutcoreError unless `share` is a fraction in (0, 1], as end_keep_set takes it."""
    if (isinstance(share, bool) or not isinstance(share, (int, float))
            or not 0 < share <= 1):
        raise OutcoreError(f"end_keep_share must be a fraction of the budget in (0, 1] (the "
                           f"room state kept at the step's end may fill beside what each "
                           f"later function needs; default {END_KEEP_SHARE}), got {share!r}")


def end_keep_used(share) -> dict:
    """The share as a policy's options used name it: only when not the default, so that
    summaries of default plans stay as they were."""
    return {} if share == END_KEEP_SHARE else {"end_keep_share": share}


def end_keep_set(trace, budget: int, share: float = END_KEEP_SHARE) -> set[int]:
    """Persistent arrays to leave resident after their last use, each kept if, at every
    later function g, needs(g) plus the bytes already kept resident at g plus its own
    stay within share x budget, the step's end included. Tried in this order: first the
    arrays last used in the optimizer's part of the step (from its first function after
    the last of forward and backward on), the one the next step uses first first
    (Belady's rule at the step's edge: an array's next use is its first use in the next
    step); then the others, latest last use first (the shortest stay).

    The optimizer's arrays were kept latest last use first until 2026-12-06: the
    optimizer's final updates, the deepest layers, which the next forward needs last,
    so they sat in the budget while the first layers were read in and the activations
    grew, and were written out for them. Simulated on CPU-recorded steps, the order
    above is 4-5% shorter for ResNet-50 64x64 at a quarter of its peak and GPT-2 at half
    its peak and at its floor, and within 0.4% elsewhere (CHANGELOG, 2026-12-06 fourth
    session). Arrays last used before that part (batch-norm statistics; a step without
    an optimizer, or whose optimizer runs inside backward or around a closure) would
    stay across the step's peak by first use, and a small one kept from the second
    function can leave no room for a large one used at the end
    (tests/plan/test_properties.py, `test_outputs_late_can_pick_a_costly_victim`): they
    keep the shortest stay first."""
    n = len(trace.functions)
    state = [a for a in trace.arrays if a.kind == "persistent"]
    if not state or not n:
        return set()
    cap = int(budget * share)
    fns = trace.functions
    last_pass = max((i for i, f in enumerate(fns) if f.phase in ("forward", "backward")),
                    default=-1)
    tail = next((i for i in range(last_pass + 1, n) if fns[i].phase == "optimizer"), n)

    def order(a):                           # the optimizer's arrays by first use, then
        if a.last_use >= tail:              # the rest by latest last use
            return (0, a.first_use, a.id)
        return (1, -a.last_use, a.id)
    # Only the points where a stay begins are asked about (after a last use, or n: the
    # step's end, which the next step starts from), and what is kept changes only
    # there: each stretch between two of them counts by its largest need.
    starts = np.unique(np.array([a.last_use + 1 for a in state] + [n], dtype=np.int64))
    need = np.append(np.asarray(needs(trace), dtype=np.int64), 0)     # need[n]: the end
    largest = np.maximum.reduceat(need, starts)
    kept_in = np.zeros(len(starts), dtype=np.int64)     # bytes kept in each stretch
    kept: set[int] = set()
    for a in sorted(state, key=order):
        j = int(np.searchsorted(starts, a.last_use + 1))
        if int((largest[j:] + kept_in[j:]).max()) + a.nbytes <= cap:
            kept.add(a.id)
            kept_in[j:] += a.nbytes
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
