"""The window scheduler of Hayakawa & Narihira (arXiv 2010.14109), shared by every policy.

One pass over the trace's accesses in order, as in nnabla's SwapInOutScheduler. Per
function f (`_WindowPlanner.plan`, one method per step):

1. **Extend the window** (`extend`). The window is the accesses [tail, head). `head`
   walks forward admitting future accesses while the window's limit holds (`_Window`:
   adaptive: bytes of the distinct arrays in the window, by default unlimited, the
   paper's was 1.5 x budget; fixed: a number of functions; on-demand: only the current
   function) and the fast tier has room. Admitting an array *reserves* its bytes from
   then on (`admit`): a swap-in is issued at f's begin; an array a later function
   creates (an output, a fresh array) needs no transfer but its bytes are reserved all
   the same, so that function can never find itself short; an array whose swap-out is
   still in flight has that swap-out cancelled (it simply stays).
2. **Make room** (`make_room`) only by WAITs on swap-outs in flight (`_SwapOuts`), never
   from anything f uses. A swap-out in flight is a lazily evicted array: until it is
   waited for, its next use entering the window cancels it. So WAITs are chosen as
   Belady would:
   - f's own operands wait for the array needed farthest ahead first;
   - a prefetch (an access of a later function, swap-in or reservation of an output)
     waits only for the oldest swap-out in flight, and only while that one's array is
     never used again in this step (NOTE [A prefetch waits at the head]). It never
     evicts something that will be needed again to make room for something needed
     earlier: it goes into free room or the window stops growing until room frees up.
   Only f's own operands, when that is not enough, evict a victim (`_Victims`, below).
   With `wait_order="completion"`, f's own operands wait oldest first instead, passing
   over arrays the window is about to reach again: the link finishes swap-outs in issue
   order, so the oldest costs the least time (NOTE [Waiting in completion order]).
3. **f runs** (`execute`): what it writes has no current slow copy any more.
4. **Leave** (`leave`): each array whose last use *inside the window* is f leaves the
   fast tier: FREE if it is dead, DROP if its slow copy is current, SWAP_OUT otherwise.
   Arrays PyTorch releases after f are FREEd (`release`).
5. At the end, WAIT on every swap-out still in flight (`drain`).

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
State at the edges (`keep_state`, edges.py): state kept resident after its last use and
state the step starts with are victims too, after every dead held array.
`keep(array, f) -> bool` lets a caller pin an array resident across its gap after f
(the adaptive-belady policy uses it for offline keep decisions).

NOTE [Waiting in completion order]. Belady's order keeps the arrays needed soonest in
flight, where the window may still cancel them, but the one it waits for may have been
issued last: the link writes in issue order, so the function waits for every swap-out
queued before it. Where forward produces more than the link can write behind compute
(ResNet-50 on the v100-16gb model, batch 256-1024), every function that must make room
then stalls until the queue drains. Waiting oldest first makes the same room sooner.
The price would be traffic: an array waited for can no longer be cancelled when the
window reaches its next use. So completion order passes over the arrays whose next use
lies within the window's last reach: as far past its function as the head stood once
the previous function was planned (`_WindowPlanner.reach`; while f makes room for its
own operands the head stands at f, which says nothing). The window is likely to reach
those again and cancel their swap-outs. With none left, Belady's order as before. It
stays a heuristic (docs/planning.md, "Waiting in completion order"), and `auto`
screens both orders. No policy moves more than on-demand either way (the argument
does not depend on which swap-out is waited for).

NOTE [A prefetch waits at the head]. The link writes in issue order, so a WAIT for one
swap-out waits for every swap-out queued before it. A prefetch that waited for any array
never used again, in Belady's order, picked the one needed farthest ahead: often a tiny
one (a batch-norm counter, written out after its last use) queued behind activations of
gigabytes, and the function stalled until they were all written, for a few bytes of
room. A prefetch waits only for the head of the queue, while its array is never used
again: that costs no more than its own copy. When the head is needed again, the window
stops growing instead. On ResNet-50 at batch 1440 (v100-16gb, recompute) the forward's
stalls fell from 1.73 s to 0.68 s and the step from 14.6 s to 13.6 s; on the CPU traces
of benchmarks/auto_choice.py no configuration of `auto` got slower by more than 2.5%
(docs/planning.md, "A prefetch waits at the head").

NOTE [Reserving outputs late]. With outputs="early" (the paper's accounting) an array
a later function g creates, and g's workspace, are reserved when the window reaches
them, and every reservation counts at every function ahead. In backward, where each
function creates a gradient as large as what it frees, the window's head then stops at
an output reservation that has no room yet, though by g the arrays before it will have
left: nothing behind it is prefetched, and backward stalls on read-backs issued late
(ResNet-50 on v100-16gb: docs/paper-headline.md). With outputs="late" each reservation
holds only over its span (`_Reserved`): an output from g on, a swap-in from the begin
that issues it, each to the last function it is reserved for. The span's end is known
at admission: the window reserves an array for g and leave() frees it after g unless
the next function uses it again or `keep` pins it, and `span_end` counts those two in
the span already. A prefetch is admitted only if its whole span fits beside the
reservations there and what can be given back (`soft`: swap-outs in flight,
victims), which counts at every function ahead. Arrays that leave by a swap-out turn
reserved bytes into soft ones, which admissions had counted as free after the span:
`settle` waits for swap-outs (and evicts victims) before a function until it fits,
which is always possible since every reservation fitted without any soft bytes. A
cancelled swap-out or a victim reserved again turns soft bytes back into reserved
ones, so it too must fit over its span. Function f's own accesses still find room:
they are admitted before any later function's, and only they may evict. Both modes
give plans `check` accepts; "late" prefetches sooner where outputs are large and
costs about 1.8 times the planning time (`auto` screens it on traces small enough,
policies/auto.py; docs/planning.md, "Measured").
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy

from ...states import ABSENT, DEAD, FAST, OUT, SLOW
from ..feasibility import per_trace, release_points
from ..schedule import DROP, FREE, SWAP_IN, SWAP_OUT, WAIT, Action
from .edges import END_KEEP_SHARE, check_end_keep_share, end_keep_set, start_keep_set


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


@dataclass(frozen=True)
class WindowPlan:
    """A window schedule's action lists and the planner's own tally of it. The tally
    equals check.replay's accounting of the same lists (a property test checks it), so
    api._cycle ranks candidates without replaying each; the plan it keeps is replayed."""
    begin: list
    end: list
    start: list
    bytes_in: int
    bytes_out: int
    resident_at_end: tuple


class _SwapOuts:
    """Swap-outs in flight, the paper's swap-out queue: each issued after function `fn[p]`,
    its fast memory counted until a WAIT. Two orders over one list: oldest first (what
    moves the window's tail; eager waits) and farthest next use first (Belady's order for
    room), the latter a heap with lazy deletion. An entry leaves when it is waited for or
    cancelled (its array is admitted again before anyone waited)."""
    __slots__ = ("arr", "fn", "next_use", "active", "pos", "first", "far", "never")

    def __init__(self, m: int, never: int):
        self.arr, self.fn, self.next_use, self.active = [], [], [], []
        self.pos = [-1] * m        # queue position of each array's swap-out in flight
        self.first = 0             # no active entry before this position
        self.far = []              # (-next use, position)
        self.never = never         # the next use of an array not used again in this step

    def push(self, a: int, f: int, next_use: int) -> None:
        p = len(self.arr)
        self.pos[a] = p
        heapq.heappush(self.far, (-next_use, p))
        self.arr.append(a)
        self.fn.append(f)
        self.active.append(True)
        self.next_use.append(next_use)

    def remove(self, a: int) -> int:
        """Take a's entry out; returns the function after which its SWAP_OUT was issued."""
        p = self.pos[a]
        self.pos[a] = -1
        self.active[p] = False
        return self.fn[p]

    def oldest(self, dead_only: bool = False) -> int:
        """The oldest array in flight (with dead_only: only if it is never used again in
        this step), or -1."""
        active, p = self.active, self.first
        while p < len(active) and not active[p]:
            p += 1
        self.first = p
        if p == len(active) or (dead_only and self.next_use[p] != self.never):
            return -1
        return self.arr[p]

    def oldest_fn(self, default: int) -> int:
        """The function after which the oldest swap-out in flight was issued, or default."""
        return default if self.oldest() < 0 else self.fn[self.first]

    def farthest(self, dead_only: bool) -> int:
        """The array in flight needed farthest ahead (with dead_only: only if it is never
        used again in this step), or -1."""
        far, active = self.far, self.active
        while far and not active[far[0][1]]:
            heapq.heappop(far)
        if not far or (dead_only and -far[0][0] != self.never):
            return -1
        return self.arr[heapq.heappop(far)[1]]

    def all(self):
        """Every array still in flight, oldest first."""
        return [a for a, live in zip(self.arr[self.first:], self.active[self.first:]) if live]


class _Window:
    """Which arrays the window holds: `last[a]`, the last function for which a is reserved
    (its bytes count from admission to then), and, for a window limited in bytes, the
    bytes of the distinct arrays with an admitted access in [tail, head). `tail` is the
    oldest swap-out still in flight, or the current function."""
    __slots__ = ("last", "limit", "functions", "bytes", "inside", "ends", "tail", "nb")

    def __init__(self, n: int, nb: list, limit: int | None, functions: int | None):
        self.last = [-1] * len(nb)
        self.limit, self.functions, self.nb = limit, functions, nb
        self.bytes, self.tail = 0, 0
        self.inside = [False] * len(nb)
        self.ends = [[] for _ in range(n + 1)]      # arrays whose reservation ends there

    def reserve(self, a: int, g: int) -> None:
        """a stays reserved up to function g."""
        self.last[a] = g
        if self.limit is not None:
            self.ends[g].append(a)
            if not self.inside[a]:
                self.inside[a] = True
                self.bytes += self.nb[a]

    def advance(self, swap_outs: _SwapOuts, f: int) -> None:
        """Move the tail up to the oldest swap-out in flight, or f; arrays reserved for
        no function from the tail on leave the window's bytes."""
        if self.limit is None:
            return
        new_tail = min(f, swap_outs.oldest_fn(f))
        while self.tail < new_tail:
            for a in self.ends[self.tail]:
                if self.inside[a] and self.last[a] == self.tail:
                    self.inside[a] = False
                    self.bytes -= self.nb[a]
            self.tail += 1

    def beyond(self, f: int, g: int) -> bool:
        """Is function g past the window's count of functions from f?"""
        return self.functions is not None and g >= f + self.functions

    def over_bytes(self, a: int) -> bool:
        """Would admitting a break the window's byte limit?"""
        return (self.limit is not None and not self.inside[a]
                and self.bytes + self.nb[a] > self.limit)


_largest = numpy.maximum.reduce     # ndarray.max without its Python wrapper


class _Reserved:
    """The fast tier's bytes over the functions ahead, with outputs="late". `at[h]`: bytes
    reserved while function h runs (arrays admitted for it or across it, h's
    workspace), each array over one span of functions: from the function whose begin
    issues its swap-in (an array to be created, a workspace: from the function that
    creates or needs it) to `end[a]`, its last reserved function (`open`, past every
    function: an input the step starts with, until the window first reaches it).
    `soft`: bytes that can be given back at any moment (swap-outs in flight, victims):
    they count at every function ahead, as they may stay. What is resident at function
    h is at most at[h] + soft, and every admission keeps max(at[its span]) + soft within
    the budget, so the window can prefetch into room that is free until a later output
    needs it.

    Spans run from one function to thousands (a swap-in is reserved from the function
    that issues it, and the window admits as far ahead as there is room), so `at` is one
    numpy array and a span's add or peak is one vector operation over it, at C speed per
    function (docs/planning.md, "Measured", has the figures: blocks of 64 functions with
    a lazy add per block were slower, in Python and in numpy alike). `now`
    and `peak` hand back Python ints, so no numpy scalar leaks into the plan."""
    __slots__ = ("at", "soft", "end", "open")
    hard = 0                    # the early accounting's figure (`_Held`): none here

    def __init__(self, n: int, m: int):
        self.at = numpy.zeros(n + 1, dtype=numpy.int64)
        self.soft = 0
        self.end = [-1] * m
        self.open = n

    def now(self, f: int) -> int:
        return int(self.at[f])

    def peak(self, s: int, e: int) -> int:
        """The most reserved at any function from s to e (0 over none). Spans of one
        function or two, the commonest, are read an element at a time: a numpy scalar
        costs a tenth of a slice's operation."""
        if e - s < 2:
            if e <= s:
                return int(self.at[s]) if e == s else 0
            return int(max(self.at[s], self.at[e]))
        return int(_largest(self.at[s:e + 1]))

    def add(self, a: int, s: int, e: int, nbytes: int) -> None:
        """a holds nbytes over [s, e]: a new span (a = -1: a workspace); as `peak`, a span
        of one function or two is added an element at a time."""
        at = self.at
        if e - s < 2:
            if e >= s:
                at[s] += nbytes
            if e > s:
                at[e] += nbytes
        else:
            at[s:e + 1] += nbytes
        if a >= 0:
            self.end[a] = e

    def extend(self, a: int, e: int, nbytes: int) -> None:
        """a's span goes on to e."""
        self.add(a, self.end[a] + 1, e, nbytes)

    def close(self, a: int, e: int, nbytes: int) -> None:
        """a's open span ends at e."""
        self.at[e + 1:self.open + 1] -= nbytes
        self.end[a] = e


class _Held:
    """outputs="early", the paper's accounting (nnabla counts outputs so): one figure,
    `hard`, every byte reserved, resident or in flight, from the admission of its array
    until the array leaves the fast tier, whatever function it is for; it stands for
    every function ahead, so an output reserved at admission holds its room from then
    on and a prefetch behind it waits for it. `soft` stays 0: a swap-out in flight is
    counted in `hard` until it is waited for. The planner updates `hard` itself where
    an array leaves (`_WindowPlanner.late` False), at O(1) each."""
    __slots__ = ("hard", "soft")

    def __init__(self):
        self.hard = 0
        self.soft = 0

    def add(self, a: int, s: int, e: int, nbytes: int) -> None:
        self.hard += nbytes


# Eviction order of victims (`_Victims`), Belady's: dead held arrays first (never read
# again), by farthest release; then state kept for the end (read back after the step);
# then state kept from the start, by farthest first use. Priorities for n functions:
def _held_priority(n, release):
    return -3 * n - release


def _end_kept_priority(n):
    return -2 * n


def _start_kept_priority(first_use):
    return -first_use


class _Victims:
    """Resident arrays that may be evicted for a function's own operands, and nothing
    else: dirty dead-but-held arrays, and state kept at the edges. A heap in eviction
    order with lazy deletion: `resident[a]` says who is still in."""
    __slots__ = ("heap", "resident")

    def __init__(self, m: int):
        self.heap = []
        self.resident = [False] * m

    def add(self, a: int, priority: int, nbytes: int) -> None:
        self.resident[a] = True
        heapq.heappush(self.heap, (priority, -nbytes, a))

    def discard(self, a: int) -> None:
        self.resident[a] = False

    def pop(self) -> int:
        """The next victim still resident, or -1."""
        while self.heap:
            a = heapq.heappop(self.heap)[2]
            if self.resident[a]:
                self.resident[a] = False
                return a
        return -1


class _WindowPlanner:
    """One pass of the window scheduler over a trace (module docstring). `state[a]` is a
    Residence; `dirty[a]`: a has no current slow copy; `reserved`: the fast tier's bytes
    over the functions ahead (`_Reserved`)."""

    def __init__(self, trace, budget, *, window_bytes, window_functions, keep, eager_wait,
                 keep_state, start_state, end_within_start, wait_order="farthest",
                 outputs="early", end_keep_share=END_KEEP_SHARE):
        self.trace, self.budget, self.keep, self.eager_wait = trace, budget, keep, eager_wait
        self.late = outputs == "late"
        self.completion_order = wait_order == "completion"
        self.reach = 0                   # functions past f the head stood at after f's extend
        arrays = trace.arrays
        self.n, m = len(trace.functions), len(arrays)
        self.nb = [a.nbytes for a in arrays]
        self.persistent = [a.kind == "persistent" for a in arrays]
        self.release_point = release_points(trace)
        self.acc_fn, self.acc_arr, self.nxt, self.offsets = access_table(trace)
        self.head = 0
        self.workspace_next = 0          # functions before it have their workspace reserved
        self.state = [ABSENT] * m
        self.dirty = [True] * m
        self.reserved = _Reserved(self.n, m) if self.late else _Held()
        self.bytes_in = self.bytes_out = 0
        self.begin = [[] for _ in range(self.n)]
        self.end = [[] for _ in range(self.n)]
        self.release_at = [[] for _ in range(self.n)]
        self.swap_outs = _SwapOuts(m, never=self.n)
        self.window = _Window(self.n, self.nb, window_bytes, window_functions)
        self.victims = _Victims(m)
        self.keep_end, self.start = self._edges(budget, keep_state, start_state,
                                                end_within_start, end_keep_share)

    def _edges(self, budget, keep_state, start_state, end_within_start, end_keep_share):
        """State kept at the edges, and the arrays resident at the start: inputs (handed to
        us resident; the executor learns which storage is which only when an op touches
        it, run/replay.py) and the state kept from the start, a victim from then on."""
        trace = self.trace
        keep_end = end_keep_set(trace, budget, end_keep_share) if keep_state else set()
        if start_state is not None:       # what fits of it, by the same rule
            keep_start = start_keep_set(trace, budget, among=set(start_state))
        else:
            keep_start = start_keep_set(trace, budget) if keep_state else set()
        if end_within_start:
            keep_end &= keep_start
        start = []
        for a in trace.arrays:
            if not a.existed_before:
                continue
            if a.kind == "input" or a.id in keep_start:
                self.state[a.id] = FAST
                start.append(a.id)
            else:                                 # persistent, written out at the start
                self.state[a.id] = SLOW
                self.dirty[a.id] = False
        kept = sorted((_start_kept_priority(trace.arrays[a].first_use), -self.nb[a], a)
                      for a in start if a in keep_start)      # in eviction order
        # Before function 0 there is no function to evict after: what it lacks (to swap
        # in or create) must fit beside what the step starts with. Kept state it does not
        # use starts on the slow tier instead, in eviction order, until it does.
        if self.n:
            used = {acc.array for acc in trace.functions[0].accesses}
            lacking = (sum(self.nb[a] for a in used if self.state[a] != FAST)
                       + trace.functions[0].workspace_bytes)
            occ = sum(self.nb[a] for a in start)
            for _, _, a in kept:
                if occ + lacking <= budget:
                    break
                if a not in used and self.nb[a]:
                    self.state[a] = SLOW
                    self.dirty[a] = False
                    occ -= self.nb[a]
                    start.remove(a)
        for priority, minus_nbytes, a in kept:
            if self.state[a] == FAST:
                self.add_victim(a, priority)
        for a in start:                  # inputs: held until the window first reaches them
            if not self.victims.resident[a]:
                self.reserved.add(a, 0, self.n, self.nb[a])
            elif not self.late:          # early: victims are counted in `hard` too
                self.reserved.hard += self.nb[a]
        return keep_end, start

    # -- the pass ------------------------------------------------------------------------
    def plan(self) -> WindowPlan:
        for f in range(self.n):
            self.window.advance(self.swap_outs, f)
            if self.late:                  # early: nothing ever turns reserved bytes soft
                self.settle(f)                                 # ahead of a function
            if self.eager_wait:
                while self.wait_oldest(f):
                    pass
            self.extend(f)
            self.execute(f)
            self.leave(f)
            self.release(f)
        self.drain()
        return WindowPlan(self.begin, self.end, self.start, self.bytes_in, self.bytes_out,
                          tuple(a for a, s in enumerate(self.state) if s == FAST))

    def extend(self, f: int) -> None:
        """1. Admit accesses from `head` on: all of f's own, then later ones while the
        window's limit holds and there is room. A function's workspace (NOTE
        [Workspace], feasibility.py) is reserved when the window first reaches it, before
        its operands, like one more of its arrays."""
        self.reserve_workspace(f, f)
        acc_fn, acc_arr, window = self.acc_fn, self.acc_arr, self.window
        limited = window.limit is not None or window.functions is not None
        total = len(acc_fn)
        head = self.head
        while head < total:
            g, a = acc_fn[head], acc_arr[head]
            mandatory = g == f
            if not mandatory and limited:
                if window.beyond(f, g):
                    break
                # the byte limit waits only for arrays never used again, oldest first
                while window.over_bytes(a) and self.wait_oldest(f, dead_only=True):
                    pass
                if window.over_bytes(a):
                    break
            if self.workspace_next <= g and not self.reserve_workspace(f, g):
                break
            if not self.admit(a, f, g, mandatory, head):
                break
            head += 1
        self.head = head
        self.reach = (acc_fn[head] if head < total else self.n) - f

    def settle(self, f: int) -> None:
        """Before f: what f holds, beside what can be given back, fits. Arrays that left
        after a function became swap-outs in flight or victims, and count from then on at
        every function ahead, where admissions had counted on their room: wait for
        swap-outs (in the wait order) and evict victims until f fits."""
        reserved, budget = self.reserved, self.budget
        over = reserved.now(f) + reserved.soft - budget
        while over > 0 and self.completion_order and self.wait_oldest_outside_reach(f):
            over = reserved.now(f) + reserved.soft - budget
        while over > 0 and self.wait_farthest(f, dead_only=False):
            over = reserved.now(f) + reserved.soft - budget
        if over > 0:
            self.evict_victims(f, over)

    def reserve_workspace(self, f: int, g: int) -> bool:
        """Reserve the workspace of each function up to g not reserved yet (for g > f a
        prefetch, which may find no room: False). It is held while its function runs
        (with outputs="early": from when the window reaches it)."""
        while self.workspace_next <= g:
            h = self.workspace_next
            nbytes = self.trace.functions[h].workspace_bytes
            if nbytes:
                s = h if self.late else f
                if not self.make_room(f, nbytes, h == f, s, h):
                    return False
                self.reserved.add(-1, s, h, nbytes)
            self.workspace_next += 1
        return True

    def span_end(self, a: int, g: int, pos: int) -> int:
        """The last function a stays reserved for when admitted for g: g, or its next use
        where leave() will keep it across the gap (the very next function, or `keep`)."""
        next_use = self.nxt[pos]
        if next_use >= 0 and (next_use == g + 1 or (self.keep is not None and self.keep(a, g))):
            return next_use
        return g

    def admit(self, a: int, f: int, g: int, mandatory: bool, pos: int) -> bool:
        """Reserve a for function g (>= f), issuing what that takes at f's begin; False if
        a prefetch finds no room."""
        state, reserved, nbytes = self.state[a], self.reserved, self.nb[a]
        e = self.span_end(a, g, pos) if self.late else g      # early: spans unused
        if state == OUT or (state == FAST and self.victims.resident[a]):
            # Held again from f on: a swap-out in flight is cancelled, a victim is one no
            # longer. Its bytes count at every function ahead already (soft), but there
            # (late) admissions may have counted on a settle giving them back: they must fit.
            late = self.late
            if (late and not mandatory
                    and not self.make_room(f, nbytes, False, f, e, credit=nbytes)):
                return False
            if state == OUT:                       # needed again: cancel its swap-out
                self.end[self.swap_outs.remove(a)].remove(Action(SWAP_OUT, a))
                self.bytes_out -= nbytes
                self.state[a] = FAST
                self.dirty[a] = True
                self.window.advance(self.swap_outs, f)
            else:
                self.victims.discard(a)
            if late:                               # early: counted as it was
                reserved.soft -= nbytes
                if mandatory:
                    self.make_room(f, nbytes, True, f, e)
                reserved.add(a, f, e, nbytes)
        elif state == FAST:
            if self.late:                          # early: reserved until it leaves already
                end = reserved.end[a]
                if end == reserved.open:                  # an input, first reached
                    reserved.close(a, e, nbytes)
                elif end < e:                             # held longer
                    if not self.make_room(f, nbytes, mandatory, end + 1, e):
                        return False
                    reserved.extend(a, e, nbytes)
        else:                                      # on the slow tier, or not created yet
            s = g if state != SLOW and self.late else f
            if not self.make_room(f, nbytes, mandatory, s, e):
                return False
            reserved.add(a, s, e, nbytes)
            if state == SLOW:
                self.begin[f].append(Action(SWAP_IN, a))
                self.bytes_in += nbytes
                self.dirty[a] = False
            self.state[a] = FAST
        self.window.reserve(a, g)
        return True

    def make_room(self, f: int, nbytes: int, mandatory: bool, s: int, e: int,
                  credit: int = 0) -> bool:
        """2. Wait for swap-outs in Belady's order until nbytes fit over functions s..e (a
        prefetch: only for the oldest, while it is never used again, NOTE [A prefetch
        waits at the head]); f's own operands then evict victims. `credit`: bytes of the
        soft ones that would become these."""
        budget, reserved = self.budget, self.reserved
        # late: the spans' peak over s..e, plus what can be given back (soft, the waits
        # lower it); early: everything counted is `hard`, and the waits lower that
        held = (reserved.peak(s, e) if self.late else 0) + nbytes - credit
        if held + reserved.hard + reserved.soft <= budget:
            return True
        if mandatory and self.completion_order:
            while (held + reserved.hard + reserved.soft > budget
                   and self.wait_oldest_outside_reach(f)):
                pass
        if mandatory:
            while (held + reserved.hard + reserved.soft > budget
                   and self.wait_farthest(f, dead_only=False)):
                pass
        else:                              # NOTE [A prefetch waits at the head]
            while (held + reserved.hard + reserved.soft > budget
                   and self.wait_oldest(f, dead_only=True)):
                pass
        if held + reserved.hard + reserved.soft > budget and mandatory:
            self.evict_victims(f, held + reserved.hard + reserved.soft - budget)
        if held + reserved.hard + reserved.soft <= budget:
            return True
        if mandatory:
            raise AssertionError(f"planner bug: function {f} does not fit a budget "
                                 "that passed the feasibility check")
        return False

    def execute(self, f: int) -> None:
        """3. f runs: what it writes or creates has no current slow copy (its workspace's
        span ends with it)."""
        dirty, fn = self.dirty, self.trace.functions[f]
        for acc in fn.accesses:
            if acc.kind != "read":
                dirty[acc.array] = True
        if fn.workspace_bytes and not self.late:          # late: its span ends with f
            self.reserved.hard -= fn.workspace_bytes

    def leave(self, f: int) -> None:
        """4. Arrays whose last use inside the window is f leave the fast tier, unless the
        next function uses them again or `keep` pins them across the gap."""
        acc_arr, nxt, window, keep = self.acc_arr, self.nxt, self.window, self.keep
        for p in range(self.offsets[f], self.offsets[f + 1]):
            a, next_use = acc_arr[p], nxt[p]
            if window.last[a] > f:
                continue
            if next_use < 0:
                self.after_last_use(a, f)
            elif next_use == f + 1 or (keep is not None and keep(a, f)):
                window.reserve(a, next_use)        # reserved so far already (span_end)
            else:
                self.evict(a, f, next_use)

    def after_last_use(self, a: int, f: int) -> None:
        """a is not used again in this step: state stays if kept for the end and is written
        out otherwise; the rest is FREEd, or held until PyTorch releases it."""
        if self.persistent[a]:
            if a in self.keep_end:                 # stays; evicted for room last
                self.add_victim(a, _end_kept_priority(self.n))
            else:
                self.evict(a, f, -1)
            return
        release = self.release_point[a]
        if release == f:
            self.end[f].append(Action(FREE, a))
            self.state[a] = DEAD
            if not self.late:                      # late: its span ended with f
                self.reserved.hard -= self.nb[a]
            return
        self.release_at[release].append(a)         # dead but held until its release
        if not self.dirty[a]:
            self.drop(a, f)
        else:
            self.add_victim(a, _held_priority(self.n, release))

    def add_victim(self, a: int, priority: int) -> None:
        """a stays resident (after its span ended), to be given back for room (`_Victims`):
        with outputs late its bytes turn soft; early, they stay counted as they were."""
        self.victims.add(a, priority, self.nb[a])
        if self.late:
            self.reserved.soft += self.nb[a]

    def release(self, f: int) -> None:
        """Held arrays PyTorch releases after f are FREEd (a victim still resident frees
        its memory; one on the slow tier drops its copy)."""
        for a in self.release_at[f]:
            self.end[f].append(Action(FREE, a))
            if self.victims.resident[a]:
                self.victims.discard(a)
                self.give_back(self.nb[a])
            self.state[a] = DEAD

    def drain(self) -> None:
        """5. The iteration ends with no copy in flight."""
        if self.n:
            self.end[self.n - 1].extend(Action(WAIT, a) for a in self.swap_outs.all())

    # -- moving one array ----------------------------------------------------------------
    def evict(self, a: int, f: int, next_use: int) -> None:
        """After f, a leaves: SWAP_OUT if dirty (in flight until waited for), else DROP."""
        nbytes = self.nb[a]
        if nbytes == 0:            # frees nothing (a held array, run/compose.py): stays
            return
        if self.dirty[a]:
            self.end[f].append(Action(SWAP_OUT, a))
            self.bytes_out += nbytes
            self.state[a] = OUT
            self.dirty[a] = False
            if self.late:                          # in flight: given back when waited for
                self.reserved.soft += nbytes
            self.swap_outs.push(a, f, self.n if next_use < 0 else next_use)
        else:
            self.drop(a, f)

    def drop(self, a: int, f: int) -> None:
        """After f, let go of a's fast copy: its slow copy is current (late: its span ended
        with f)."""
        self.end[f].append(Action(DROP, a))
        self.state[a] = SLOW
        if not self.late:
            self.reserved.hard -= self.nb[a]

    def wait(self, a: int, f: int) -> None:
        """WAIT before f for a's swap-out; its memory is free from then on."""
        self.swap_outs.remove(a)
        self.begin[f].append(Action(WAIT, a))
        self.state[a] = SLOW
        self.give_back(self.nb[a])
        self.window.advance(self.swap_outs, f)

    def give_back(self, nbytes: int) -> None:
        """A swap-out waited for or a victim gone: its bytes are free."""
        if self.late:
            self.reserved.soft -= nbytes
        else:
            self.reserved.hard -= nbytes

    def wait_oldest(self, f: int, dead_only: bool = False) -> bool:
        """WAIT before f for the oldest swap-out in flight; False if there is none."""
        return self._wait_for(self.swap_outs.oldest(dead_only), f)

    def wait_oldest_outside_reach(self, f: int) -> bool:
        """WAIT before f for the oldest swap-out in flight unless its array's next use lies
        within the window's last reach from f; False otherwise (NOTE [Waiting in
        completion order]). Called while f's own accesses are admitted, when `reach`
        still holds the previous function's."""
        a = self.swap_outs.oldest()
        if a < 0 or self.swap_outs.next_use[self.swap_outs.pos[a]] <= f + self.reach:
            return False
        return self._wait_for(a, f)

    def wait_farthest(self, f: int, dead_only: bool) -> bool:
        """WAIT before f for the swap-out needed farthest ahead; False if there is none."""
        return self._wait_for(self.swap_outs.farthest(dead_only), f)

    def _wait_for(self, a: int, f: int) -> bool:
        if a < 0:
            return False
        self.wait(a, f)
        return True

    def evict_victims(self, f: int, short: int) -> None:
        """Swap out victims after f - 1 and wait for them before f until `short` bytes are
        released (or none is left). Only f's own operands call this."""
        while short > 0:
            a = self.victims.pop()
            if a < 0:
                return
            nbytes = self.nb[a]
            if nbytes == 0:
                continue
            if self.dirty[a]:
                self.end[f - 1].append(Action(SWAP_OUT, a))
                self.bytes_out += nbytes
                self.begin[f].append(Action(WAIT, a))
                self.state[a] = SLOW
                self.dirty[a] = False
                self.give_back(nbytes)
            else:                                  # state kept at the end, unchanged
                if self.late:
                    self.reserved.soft -= nbytes
                self.drop(a, f - 1)
            short -= nbytes


WAIT_ORDERS = ("farthest", "completion")
OUTPUTS = ("early", "late")


def plan_window(trace, budget: int, *, window_bytes: int | None = None,
                window_functions: int | None = None, keep=None, eager_wait: bool = False,
                keep_state: bool = True, start_state=None,
                end_within_start: bool = False, wait_order: str = "farthest",
                outputs: str = "early", end_keep_share: float = END_KEEP_SHARE) -> WindowPlan:
    """Plan `trace` under `budget` with the window scheduler (module docstring).
    `start_state`: the persistent arrays to start with in fast memory (those of them that
    fit beside the first function), instead of `start_keep_set` (plan() passes the state
    an earlier plan ended with). `end_within_start`: keep state resident after its last
    use only if the step starts with it, so that the step ends with no state the next
    one must write out before it starts (plan() tries both, see api._cycle).
    The caller has already checked that the budget is feasible. With eager_wait, every
    swap-out is waited for before the next function (synchronous offload, as vDNN does).
    wait_order: "farthest" (Belady's, step 2) or "completion" (oldest first, passing
    over arrays within the window's last reach, then Belady's; NOTE [Waiting in
    completion order]). outputs: "early" reserves an array a later function creates,
    and a workspace, from when the window reaches it, and counts every reservation at
    every function ahead (`_Held`); "late" from that function on, counting each
    reservation only over its span (`_Reserved`, NOTE [Reserving outputs late]).
    end_keep_share: the share of the budget state kept at the end may fill with what
    each later function needs (edges.end_keep_set)."""
    check_end_keep_share(end_keep_share)
    return _WindowPlanner(trace, budget, window_bytes=window_bytes,
                          window_functions=window_functions, keep=keep,
                          eager_wait=eager_wait, keep_state=keep_state,
                          start_state=start_state, end_within_start=end_within_start,
                          wait_order=wait_order, outputs=outputs,
                          end_keep_share=end_keep_share).plan()
