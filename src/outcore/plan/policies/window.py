"""The window scheduler of Hayakawa & Narihira (arXiv 2010.14109), shared by three policies.

One pass over the trace's accesses in order, as in nnabla's SwapInOutScheduler:

* The window is the accesses [tail, head). `head` walks forward admitting future accesses
  while the window's limit holds (adaptive: bytes of the distinct arrays in the window,
  by default unlimited, the paper's was 1.5 x budget; fixed: a number of functions; on-demand: only the current
  function) and the fast tier has room. Admitting an array *reserves* its bytes from then
  on: a swap-in is issued at the current function's begin; an array a later function
  creates (an output, a fresh array) needs no transfer but its bytes are reserved all the
  same, so that function can never find itself short; an array whose swap-out is still in
  flight has that swap-out cancelled (it simply stays).
* Room comes from WAITs on swap-outs still in flight, never from anything the current
  function uses. A swap-out in flight is a lazily evicted array: until it is waited for,
  its next use entering the window cancels it. So WAITs are chosen as Belady would:
  - the current function's own operands wait for the array needed farthest ahead first;
  - a prefetch (an access of a later function, swap-in or reservation of an output)
    waits only for arrays never used again in this step. It never evicts something
    that will be needed again to make room for something needed earlier: it goes into
    free room or the window stops growing until room frees up.
* After function f, each array whose last use *inside the window* is f leaves the fast
  tier: FREE if it is dead, DROP if its slow copy is current, SWAP_OUT otherwise.

Deviations from the paper, each strictly saving traffic (docs/planning.md):
  - an array the very next function uses again is kept (never swapped out and back in
    across one function boundary), so no policy moves more than on-demand;
  - an array whose slow copy is still current (read-only since it was last copied) is
    DROPped instead of copied out again;
  - the paper backtracks when a function's outputs do not fit; reserving outputs at
    admission (as nnabla counts them) makes that case impossible: at function f every
    reservation belongs to f itself once older swap-outs are waited for, so f fits
    whenever the budget is feasible at all.
  - WAITs are Belady-ordered (above) rather than oldest first; the window's byte limit
    still waits oldest first (that is what moves `tail`), but only for arrays never
    used again. Unlike the others this one is a heuristic, not a strict saving: on some
    trace it may move more (docs/planning.md, "Waiting in Belady's order").
Held arrays (docs/planning.md#held-arrays): a non-persistent array whose storage PyTorch
releases only after function `release > last_use` stays resident after its last use
(it is dead but held) and is FREEd at the end of `release`. If it is clean (its slow copy
is current) it is DROPped right after its last use instead: that frees its memory at no
cost. A dirty one is the planner's only eviction victim chosen for room: when a function's
own operands do not fit after waiting for every swap-out in flight, held arrays are
swapped out after the previous function (farthest release first: Belady, since they are
never read again) and waited for before this one. Never for prefetching, so a longer
window cannot make a policy move more held bytes than on-demand does. The FREE at the
release point is emitted all the same (it then drops the slow copy).
`keep(array, f) -> bool` lets a caller pin an array resident across its gap after f
(the adaptive-belady policy uses it for offline keep decisions).
State at the edges (`keep_state`, docs/planning.md): the executor leaves state where the
step leaves it between iterations (run/mapped.py). The state used last (the optimizer's
final updates) stays resident after its last use instead of being written out
(`end_keep_set`; with `end_within_start` only state the step starts with), and the
step starts with resident state that fits beside it (`start_keep_set`, or
`start_state`: plan() replans with the state the step ended with, so that a loop moves
nothing at its boundaries). Kept arrays are eviction victims for a function's own
operands like held arrays (after every dead one), so feasibility is untouched.
"""
from __future__ import annotations

import heapq

from ...states import ABSENT, DEAD, FAST, OUT, SLOW
from ..feasibility import needs, occupancy, per_trace, release_points
from ..schedule import DROP, FREE, SWAP_IN, SWAP_OUT, WAIT, Action


def access_table(trace):
    """Flat access arrays (function, array, next use of that array or -1), first occurrence
    of an array per function only, plus offsets of each function's slice; tuples, computed
    once per trace (feasibility.per_trace)."""
    return _access_table(trace, shared=True)


@per_trace
def _access_table(trace):
    acc_fn, acc_arr = [], []
    offsets = [0]
    for fn in trace.functions:
        seen = set()
        for acc in fn.accesses:
            if acc.array not in seen:
                seen.add(acc.array)
                acc_fn.append(fn.index)
                acc_arr.append(acc.array)
        offsets.append(len(acc_fn))
    nxt = [-1] * len(acc_fn)
    last_seen = {}
    for pos in range(len(acc_fn) - 1, -1, -1):
        a = acc_arr[pos]
        nxt[pos] = last_seen.get(a, -1)
        last_seen[a] = acc_fn[pos]
    return tuple(acc_fn), tuple(acc_arr), tuple(nxt), tuple(offsets)


END_KEEP_SHARE = 0.75


def end_keep_set(trace, budget: int, share: float = END_KEEP_SHARE) -> set[int]:
    """Persistent arrays to leave resident after their last use (see the module docstring):
    latest last use first, each kept if, at every later function g, needs(g) plus the bytes
    already kept before g plus its own stay within share x budget."""
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


def plan_window(trace, budget: int, *, window_bytes: int | None = None,
                window_functions: int | None = None, keep=None, eager_wait: bool = False,
                keep_state: bool = True, start_state=None, end_within_start: bool = False):
    """Return (begin, end, resident_at_start) action lists for `trace` under `budget`.
    `start_state`: the persistent arrays to start with in fast memory (those of them that
    fit beside the first function), instead of `start_keep_set` (plan() passes the state
    an earlier plan ended with). `end_within_start`: keep state resident after its last
    use only if the step starts with it, so that the step ends with no state the next
    one must write out before it starts (plan() tries both, see api._cycle).
    The caller has already checked that the budget is feasible. With eager_wait, every
    swap-out is waited for before the next function (synchronous offload, as vDNN does)."""
    arrays = trace.arrays
    n, m = len(trace.functions), len(arrays)
    nb = [a.nbytes for a in arrays]
    persistent = [a.kind == "persistent" for a in arrays]
    release = release_points(trace)
    keep_end = end_keep_set(trace, budget) if keep_state else set()
    if start_state is not None:       # what fits of it, by the same rule
        keep_start = start_keep_set(trace, budget, among=set(start_state))
    else:
        keep_start = start_keep_set(trace, budget) if keep_state else set()
    if end_within_start:
        keep_end &= keep_start
    acc_fn, acc_arr, nxt, offsets = access_table(trace)
    total = len(acc_fn)

    state = [ABSENT] * m
    dirty = [True] * m            # no current slow copy
    win_last = [-1] * m           # last function for which the array is reserved
    occ = 0                       # reserved + resident + swap-outs in flight
    start = []
    for a in arrays:
        if a.existed_before:
            if a.kind == "input":                 # the batch is handed to us resident
                # and stays until its first use: the executor learns which storage it is
                # only when an op touches it (run/replay.py binds arrays as they come).
                state[a.id] = FAST
                occ += a.nbytes
                start.append(a.id)
            elif a.id in keep_start:              # persistent, left where it is
                state[a.id] = FAST
                occ += a.nbytes
                start.append(a.id)
            else:                                 # persistent, written out at the start
                state[a.id] = SLOW
                dirty[a.id] = False
    begin = [[] for _ in range(n)]
    end = [[] for _ in range(n)]

    # Swap-outs in flight, oldest first; cancelled entries are marked inactive.
    q_arr, q_fn, q_active, q_nu = [], [], [], []
    q_pos = [-1] * m
    qt = 0
    never = n                     # "next use" of an array not used again in this step
    far = []                      # (-next use, queue position): Belady's order, lazy deletion
    # Window bytes: distinct arrays with an admitted access in [tail, head).
    in_wb = [False] * m
    wbytes = 0
    tail = 0
    leave = [[] for _ in range(n + 1)]
    # Dead-but-held arrays: FREE at their release point; dirty resident ones are eviction
    # candidates, farthest release first (lazy deletion: `held_res` says who is still in).
    release_at = [[] for _ in range(n)]
    held_heap = []
    held_res = [False] * m
    # Eviction order for room, Belady's: dead held arrays first (never read again), by
    # farthest release; then state kept for the end (read back after the step); then
    # state kept from the start, by farthest first use.
    for a in start:
        if a in keep_start:
            held_res[a] = True
            heapq.heappush(held_heap, (-arrays[a].first_use, -nb[a], a))

    def oldest_active():
        nonlocal qt
        while qt < len(q_arr) and not q_active[qt]:
            qt += 1
        return qt if qt < len(q_arr) else -1

    def wait_oldest(f, dead_only: bool = False) -> bool:
        p = oldest_active()
        if p < 0 or (dead_only and q_nu[p] != never):
            return False
        wait_at(p, f)
        return True

    def wait_farthest(f, dead_only: bool = False) -> bool:
        """WAIT for the in-flight array needed farthest ahead (with dead_only: only if it
        is never used again in this step)."""
        while far and not q_active[far[0][1]]:
            heapq.heappop(far)
        if not far or (dead_only and -far[0][0] != never):
            return False
        wait_at(heapq.heappop(far)[1], f)
        return True

    def wait_at(p, f):
        nonlocal occ
        a = q_arr[p]
        q_active[p] = False
        q_pos[a] = -1
        begin[f].append(Action(WAIT, a))
        state[a] = SLOW
        occ -= nb[a]
        advance_tail(f)

    def advance_tail(f):
        nonlocal tail, wbytes
        p = oldest_active()
        new_tail = f if p < 0 else min(f, q_fn[p])
        while tail < new_tail:
            for a in leave[tail]:
                if in_wb[a] and win_last[a] == tail:
                    in_wb[a] = False
                    wbytes -= nb[a]
            tail += 1

    def evict(a, f, nu):
        nonlocal occ
        if nb[a] == 0:             # frees nothing (a held array, run/compose.py): stays
            return
        if dirty[a]:
            end[f].append(Action(SWAP_OUT, a))
            state[a] = OUT
            dirty[a] = False
            nu = never if nu < 0 else nu
            q_pos[a] = len(q_arr)
            heapq.heappush(far, (-nu, len(q_arr)))
            q_arr.append(a)
            q_fn.append(f)
            q_active.append(True)
            q_nu.append(nu)
        else:
            end[f].append(Action(DROP, a))
            state[a] = SLOW
            occ -= nb[a]

    def evict_held(f, short):
        """Swap out held arrays after function f - 1 and wait for them before f until
        `short` bytes are released (or none is left). Only f's own operands call this."""
        nonlocal occ
        while short > 0 and held_heap:
            _, _, a = heapq.heappop(held_heap)
            if not held_res[a] or nb[a] == 0:
                continue
            held_res[a] = False
            if dirty[a]:
                end[f - 1].append(Action(SWAP_OUT, a))
                begin[f].append(Action(WAIT, a))
            else:                                  # state kept at the end, unchanged
                end[f - 1].append(Action(DROP, a))
            state[a] = SLOW
            dirty[a] = False
            occ -= nb[a]
            short -= nb[a]

    head = 0
    for f in range(n):
        advance_tail(f)
        if eager_wait:
            while wait_oldest(f):
                pass
        # -- extend the window ---------------------------------------------------------
        while head < total:
            g = acc_fn[head]
            a = acc_arr[head]
            mandatory = g == f
            if not mandatory and window_functions is not None and g >= f + window_functions:
                break
            if window_bytes is not None and not mandatory and not in_wb[a]:
                while wbytes + nb[a] > window_bytes and wait_oldest(f, dead_only=True):
                    pass
                if wbytes + nb[a] > window_bytes:
                    break
            load = False
            if win_last[a] >= f or state[a] == FAST:
                cost = 0
                held_res[a] = False                # reserved now: no longer a victim
            elif state[a] == OUT:                  # needed again: cancel its swap-out
                p = q_pos[a]
                q_active[p] = False
                q_pos[a] = -1
                end[q_fn[p]].remove(Action(SWAP_OUT, a))
                state[a] = FAST
                dirty[a] = True
                cost = 0
                advance_tail(f)
            else:
                cost = nb[a]
                load = True
            if load:
                while occ + cost > budget and wait_farthest(f, dead_only=not mandatory):
                    pass
                if occ + cost > budget and mandatory:
                    evict_held(f, occ + cost - budget)
                if occ + cost > budget:
                    if mandatory:
                        raise AssertionError(f"planner bug: function {f} does not fit a budget "
                                             "that passed the feasibility check")
                    break
                occ += cost
                if state[a] == SLOW:
                    begin[f].append(Action(SWAP_IN, a))
                    dirty[a] = False
                state[a] = FAST
            win_last[a] = g
            leave[g].append(a)
            if not in_wb[a]:
                in_wb[a] = True
                wbytes += nb[a]
            head += 1
        # -- function f runs ---------------------------------------------------------
        for acc in trace.functions[f].accesses:
            if acc.kind != "read":
                dirty[acc.array] = True
        # -- after f: arrays the window no longer needs leave ----------------------------
        positions = [(acc_arr[p], nxt[p]) for p in range(offsets[f], offsets[f + 1])]
        for a, nu in positions:
            if win_last[a] > f:
                continue
            if nu < 0:
                if persistent[a] and a in keep_end:  # stays; evicted for room last
                    held_res[a] = True
                    heapq.heappush(held_heap, (-2 * n, -nb[a], a))
                elif persistent[a]:
                    evict(a, f, nu)
                elif release[a] == f:
                    end[f].append(Action(FREE, a))
                    state[a] = DEAD
                    occ -= nb[a]
                else:                              # dead but held until release[a]
                    release_at[release[a]].append(a)
                    if not dirty[a]:
                        end[f].append(Action(DROP, a))
                        state[a] = SLOW
                        occ -= nb[a]
                    else:
                        held_res[a] = True
                        heapq.heappush(held_heap, (-3 * n - release[a], -nb[a], a))
            elif nu == f + 1 or (keep is not None and keep(a, f)):
                win_last[a] = nu
                leave[nu].append(a)
            else:
                evict(a, f, nu)
        for a in release_at[f]:                    # PyTorch drops these after f
            end[f].append(Action(FREE, a))
            if held_res[a]:
                held_res[a] = False
                occ -= nb[a]
            state[a] = DEAD
    if n:
        p = oldest_active()
        while p >= 0:
            end[n - 1].append(Action(WAIT, q_arr[p]))
            q_active[p] = False
            p = oldest_active()
    return begin, end, start
