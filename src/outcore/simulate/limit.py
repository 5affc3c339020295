"""The physical limit of a step: no schedule of `trace` under `budget` runs faster on
`machine` (the simulator's model: functions one after another on the compute lane, each
link moving one copy at a time; `simulate` without `comm`: collectives on their own
lane cost no compute there, and `simulate_ranks` counts host time differently).

`max(compute, bytes read / read speed)` is not such a limit for a training step,
because what backward reads back, forward had to write first, and the two cannot
overlap: the bytes are the same ones. The cut argument (NOTE [Cut bound]) makes that
exact. For a moment τ between two functions c - 1 and c:

- fast bytes at τ are at most the budget, so of the arrays alive across τ (created
  before it, released after it) at least `alive - budget` bytes are on the slow tier;
- each of those that was created in the step got there by a copy that finished before
  τ (a WAIT precedes the next function), so the out-link carried at least
  `written = alive - budget - (bytes that existed before the step)` before τ;
- each of those that is used again is read back by a copy issued after τ, so the
  in-link carries at least `read = alive - budget - (bytes never used again)` after τ;
- functions before c compute before τ, the others after.

So the step takes at least max(compute before, written / link_out) + max(compute after,
read / link_in), for every cut; the limit is the largest of those, the step's compute,
and the pressure bound below. It ignores the links' latency. A property test checks
that no simulated schedule beats it.

NOTE [Both directions]. The cut bound above counts on each side of τ the copies of one
direction only. Two more kinds are forced there, and on a link the two directions share
(a disk: `Machine.shared_link`; or `link_both`) they take their time on the same side:

- `read_before`: an array that existed before the step (state, an input) and that a
  function before c uses (reads or changes: `write` needs its contents) is on the slow
  tier at the step's start unless resident then, and at most the budget is (R2 of
  plan/check.py): at least `used before c - budget` bytes are read before τ;
- `written_after`: persistent state alive at the step's end and last changed by
  function c or later (the optimizer's parameters and moments) must have a current slow
  copy at the step's end unless resident then, and at most the budget is: at least
  `changed from c - budget` bytes are written after τ.

Both happen inside the step whatever the schedule moves between iterations
(`Simulation.boundary_s` comes on top), so the limit bounds the step alone. The cuts
before the first function and after the last count too: there one side is all of the
step, and the other has only these copies.

Each side then takes at least the larger of its compute and its copies' time: `read /
link_in + written / link_out` on a shared link; on a duplex one the largest of each
direction's time and `(read + written) / link_both` (over a direction's own speed where
that is more: `Machine.transfer_end` never lets two copies at once carry more than
link_both, nor one alone more than its own speed); on two, the larger direction's. On
a disk this is where a step with SGD momentum or Adam at a quarter budget is bound:
after backward's last cut, the optimizer reads parameters and moments back and writes
them out again, with little compute beside them (docs/planning.md, "The physical
limit").

NOTE [Pressure bound]. The cut bound counts bytes, not where the fast tier is full. A
function j holds its operands and workspace at once (`needs`, plan/feasibility.py, which
also holds an input from the step's start to its first use: the executor cannot move an
input before an op has touched it, and check.replay refuses a schedule that does, R8;
helper-194's hand-made one beat this bound before it did). An array a that j does not
use, and that does not fit beside them (needs[j] + a > budget), cannot occupy the fast
tier while j runs. So where such a j lies between two uses of a, u1 < j < u2 (or
before the first use of state that existed before the step), a is read back after j:
by a copy issued after the last such j of that gap ends, and finished before u2 starts
(a swap-in's bytes count from its issue). Where a was created or
written in the step, at w, its new bytes have no slow copy: the first such gap after w
(before a is written again) takes a copy out issued after w ends and waited for before
the first such j begins. Each of these forced copies runs inside its window [L, U): from
the end of function L - 1 to the start of function U, while functions L..U-1 compute.
Windows of copies count only toward intervals that contain them whole; in intervals
[L, U) that do not overlap (the next starts after U, so that the stall before U belongs
to one of them), the step spends at least max(compute of L..U-1, bytes in / link_in,
bytes out / link_out) in each (on a shared link the two added: `_side`, NOTE [Both
directions]) and computes everything else outside them: the step
takes at least its compute plus, summed over the intervals, what their copies exceed
their compute by. A dynamic program over the windows' ends (`_pressure`) finds the
intervals that give the most. The bound binds where one function needs nearly the whole
budget, as batch-norm backward in ResNet-50 at batch 1440 on 16 GB does (three arrays
of 4.6 GB at once): every array of 4.6 GB alive across it leaves and comes back.
Dropping copies only lowers the bound, so past PRESSURE_COPIES the smallest are left
out, to keep the program short.

NOTE [Crowd bound]. The pressure bound looks at one array at a time; a function j can
also be crowded by several that each fit beside it. The arrays alive across j that j
does not use (nor an input not used yet: `needs` counts those) have `room = budget -
needs[j]` beside it, and arrays move whole. For a later function k, let `due` be those
of them used again at j + 1..k: if `due` exceeds the room by `short` bytes, arrays of
`due` of at least `short` bytes in all are not in fast memory while j runs (arrays
used later are the best ones to have out: counting them all as out is what leaves
`short`), and each is read back by a copy issued after j ends and finished before its
use starts, so before k starts. Whole arrays: if those of `due` smaller than `short`
add up to less than it, one of at least `short` bytes is among them, so at least the
smallest such array is read (`_least_cover`). That copy runs in the window [j + 1, k)
with functions j + 1..k - 1 computing. The same holds before j for writes: of those
arrays, the ones used again after j whose bytes were made or changed at f..j - 1 have
no copy on the slow tier unless one is written after f ends and before j starts (an
array never used again may be dropped unwritten; one last written before f, or not in
the step, is counted as having its copy), so if they exceed the room by `short`, at
least a cover of it is written in the window [f + 1, j). Each window joins the
pressure bound's intervals as one more candidate (with the bytes it forces, never
added to the forced copies of the same interval). At batch 1024 of ResNet-50 on
v100-16gb with recompute, a block's input (3.3 GB), needed again by the first repeat of
its block's backward, cannot be in fast memory beside the residual `add`'s gradients
three functions before: about 0.25 s of the read stands in the open, twice.
"""
from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass

from ..plan.feasibility import needs, occupancy, release_points
from ..trace.model import require_trace
from ..units import count, format_bytes, parse_bytes
from .machines import machine as get_machine


# NOTE [Pressure bound]: the most forced copies its dynamic program looks at.
PRESSURE_COPIES = 3000
# NOTE [Crowd bound]: how many functions after a crowded one its windows reach.
CROWD_WINDOW = 64


@dataclass(frozen=True)
class Pressure:
    """The pressure bound's part beyond compute (NOTE [Pressure bound])."""
    stall_s: float          # at least this much longer than the step's compute
    read: int               # bytes the in-link must carry inside `intervals`
    written: int            # bytes the out-link must carry inside them
    intervals: tuple[tuple[int, int], ...] = ()    # [L, U): functions L..U-1


@dataclass(frozen=True)
class Limit:
    seconds: float          # no schedule of the step under the budget is faster
    compute_s: float        # the step's compute on the machine (the limit with room to spare)
    cut: int | None         # the cut bound's binding cut lies before this function (None: none
                            # beats compute; `functions`: after the last)
    written: int            # bytes the out-link must carry before that cut
    read: int               # bytes the in-link must carry after it
    pressure: Pressure | None = None   # set when the pressure bound binds
    read_before: int = 0    # what existed before the step that the in-link must carry
                            # before the cut (NOTE [Both directions])
    written_after: int = 0  # state the out-link must carry after the cut
    functions: int = 0      # the step's

    @property
    def binding(self) -> str:
        """Which bound the limit is: "compute", "cut" or "pressure"."""
        return "pressure" if self.pressure else "compute" if self.cut is None else "cut"

    def __str__(self) -> str:
        head = f"physical limit {self.seconds * 1e3:.1f} ms"
        if self.pressure is not None:
            p = self.pressure
            return (f"{head} (compute {self.compute_s * 1e3:.1f} ms): functions that leave "
                    f"too little of the budget for the arrays alive across them force "
                    f"{format_bytes(p.read)} of read-backs and "
                    f"{format_bytes(p.written)} of writes into "
                    f"{count(len(p.intervals), 'stretch', 'stretches')} "
                    f"of the step, {p.stall_s * 1e3:.1f} ms more than their compute")
        if self.cut is None:
            return f"{head}: the step's compute"
        before = f"at least {format_bytes(self.written)} must be written out"
        if self.read_before:
            before += (f" and {format_bytes(self.read_before)} of what existed before the "
                       "step read back")
        after = f"{format_bytes(self.read)} read back"
        if self.written_after:
            after += f" and {format_bytes(self.written_after)} of state written out"
        where = ("after the last function" if self.cut == self.functions
                 else f"before function {self.cut}")
        return f"{head} (compute {self.compute_s * 1e3:.1f} ms): {where} {before}, after it {after}"


def _side(m, read: int, written: int) -> float:
    """The least time a side of a cut spends on copies (NOTE [Both directions])."""
    if m.shared_link:
        return read / m.link_in + written / m.link_out
    apart = max(read / m.link_in, written / m.link_out)
    if not m.link_both:
        return apart
    # Both at once carry link_both together; one alone its own speed, which may be more.
    return max(apart, (read + written) / max(m.link_both, m.link_in, m.link_out))


def physical_limit(trace, budget, machine="cpu-disk") -> Limit:
    """The cut bound of the module docstring for `trace` under `budget` on `machine`, or
    the pressure bound where it is more: no schedule of the step is faster."""
    require_trace(trace, "physical_limit")
    m = get_machine(machine)
    budget = parse_bytes(budget)
    n = len(trace.functions)
    compute = [m.compute_time(fn) for fn in trace.functions]
    total = sum(compute)
    best = Limit(total, total, None, 0, 0, functions=n)
    if not n:
        return best
    # Per cut c in 0..n (before function c; n: after the last): bytes alive across it, of
    # which existed before the step, and of which never used again (difference arrays).
    alive, existed, unused = ([0] * (n + 1) for _ in range(3))
    # NOTE [Both directions]: per function, what existed before the step that it is the
    # first to use, and the state alive at the end that it is the last to change.
    first_used, last_changed = [0] * n, [0] * n
    changed = {acc.array: fn.index for fn in trace.functions for acc in fn.accesses
               if acc.kind != "read"}
    for a, release in zip(trace.arrays, release_points(trace)):
        if a.existed_before and any(acc.array == a.id and acc.kind != "create"
                                    for acc in trace.functions[a.first_use].accesses):
            first_used[a.first_use] += a.nbytes
        if a.kind == "persistent" and release >= n - 1 and a.id in changed:
            last_changed[changed[a.id]] += a.nbytes
        lo = 1 if a.existed_before else a.first_use + 1
        if release < lo:
            continue
        for table, start in ((alive, lo), (existed, lo if a.existed_before else n),
                             (unused, max(lo, a.last_use + 1))):
            if start <= release:
                table[start] += a.nbytes
                table[release + 1] -= a.nbytes
    before = 0.0
    run_alive = run_existed = run_unused = used_before = 0
    changed_from = sum(last_changed)
    for c in range(n + 1):
        run_alive += alive[c]
        run_existed += existed[c]
        run_unused += unused[c]
        written = max(0, run_alive - budget - run_existed)
        read = max(0, run_alive - budget - run_unused)
        read_before = max(0, used_before - budget)        # NOTE [Both directions]
        written_after = max(0, changed_from - budget)
        seconds = (max(before, _side(m, read_before, written))
                   + max(total - before, _side(m, read, written_after)))
        if seconds > best.seconds:
            best = Limit(seconds, total, c, written, read, None, read_before, written_after, n)
        if c < n:
            before += compute[c]
            used_before += first_used[c]
            changed_from -= last_changed[c]
    if n < 2:
        return best
    pressure = _pressure(trace, budget, m, compute)
    if total + pressure.stall_s > best.seconds:
        best = dataclasses.replace(best, seconds=total + pressure.stall_s, pressure=pressure)
    return best


def _forced_copies(trace, budget: int) -> list[tuple[int, int, int, bool]]:
    """(L, U, nbytes, out) per copy NOTE [Pressure bound] forces: it runs from the end
    of function L - 1 to the start of function U; out: a write, else a read."""
    need = needs(trace)
    most = max(need, default=0)
    uses: dict[int, list[tuple[int, bool]]] = {}       # array -> (function, writes it)
    for fn in trace.functions:
        for acc in fn.accesses:
            u = uses.setdefault(acc.array, [])
            writes = acc.kind != "read"
            if u and u[-1][0] == fn.index:
                u[-1] = (fn.index, u[-1][1] or writes)
            else:
                u.append((fn.index, writes))
    # Arrays that some function cannot hold beside its own, smallest first: each one's
    # blockers (functions with need > budget - nbytes) include the previous one's.
    arrays = sorted((a for a in trace.arrays if a.nbytes and most + a.nbytes > budget
                     and a.id in uses), key=lambda a: a.nbytes)
    by_need = sorted(range(len(need)), key=lambda j: -need[j])
    blockers, taken, copies = [], 0, []
    for a in arrays:
        while taken < len(by_need) and need[by_need[taken]] + a.nbytes > budget:
            bisect.insort(blockers, by_need[taken])
            taken += 1
        u = uses[a.id]
        # Gaps: before the first use of state that existed before the step (an input is
        # counted in needs() until its first use), then between uses.
        gaps = [(-1, u[0][0])] if a.existed_before and a.kind != "input" else []
        gaps += [(u1, u2) for (u1, _), (u2, _) in zip(u, u[1:])]
        writes = {f for f, w in u if w}
        made = None                     # last write with no slow copy yet
        for u1, u2 in gaps:
            if u1 in writes:
                made = u1
            lo, hi = bisect.bisect_right(blockers, u1), bisect.bisect_left(blockers, u2)
            if lo < hi:
                copies.append((blockers[hi - 1] + 1, u2, a.nbytes, False))
                if made is not None:
                    copies.append((made + 1, blockers[lo], a.nbytes, True))
                    made = None
    if len(copies) > PRESSURE_COPIES:   # fewer copies: a lower bound still
        copies = sorted(copies, key=lambda c: -c[2])[:PRESSURE_COPIES]
    return copies


def _least_cover(sizes: list[int], short: int) -> int:
    """A lower bound on the bytes of any subset of `sizes` (ascending; their sum is at
    least `short`) that adds up to `short` or more (NOTE [Crowd bound])."""
    i = bisect.bisect_left(sizes, short)
    return short if sum(sizes[:i]) >= short else sizes[i]


def _crowded(trace, budget: int, m, prefix: list[float]) -> list[tuple[int, int, float, int, bool]]:
    """(L, U, seconds beyond compute, bytes, out) per window NOTE [Crowd bound] finds: at
    least those bytes are read (out: written) between the end of function L - 1 and the
    start of function U, while functions L..U-1 compute."""
    fns, arrays = trace.functions, trace.arrays
    need, crowd = needs(trace), occupancy(trace)
    out = []
    for j, fn in enumerate(fns):
        if crowd[j] <= budget:          # everything alive fits: nothing is forced out
            continue
        room = budget - need[j]
        others = crowd[j] - need[j]     # bytes alive across j that j does not hold
        own = {acc.array for acc in fn.accesses}
        # Reads: arrays used again at j + 1..k, read back after j and before k starts.
        seen, due, sizes = set(own), 0, []
        for k in range(j + 1, min(len(fns), j + 1 + CROWD_WINDOW)):
            hidden = prefix[k] - prefix[j + 1]          # compute of j + 1..k - 1
            if hidden * m.link_in >= others:            # no read can stand out any more
                break
            for acc in fns[k].accesses:
                a = arrays[acc.array]
                if acc.array in seen:
                    continue
                seen.add(acc.array)
                if not (a.existed_before or a.first_use < j):
                    continue                            # made after j
                if a.kind == "input" and a.existed_before and a.first_use > j:
                    continue                            # an input not used yet: in needs[j]
                due += a.nbytes
                bisect.insort(sizes, a.nbytes)
            if due > room and (over := _over(sizes, due - room, m.link_in, hidden)):
                out.append((j + 1, k, *over, False))
        # Writes: arrays used again after j whose bytes were made (or changed) at
        # f..j - 1 have no copy on the slow tier unless one is written after f ends and
        # before j starts; those used again that were last written before f, or not in
        # the step, can be out without one.
        seen, due, sizes = set(own), 0, []
        for f in range(j - 1, max(-1, j - 1 - CROWD_WINDOW), -1):
            hidden = prefix[j] - prefix[f + 1]          # compute of f + 1..j - 1
            if hidden * m.link_out >= others:
                break
            for acc in fns[f].accesses:
                a = arrays[acc.array]
                if acc.kind == "read" or acc.array in seen:
                    continue
                seen.add(acc.array)
                if a.last_use <= j:
                    continue                            # never used again: dropped unwritten
                due += a.nbytes
                bisect.insort(sizes, a.nbytes)
            if due > room and (over := _over(sizes, due - room, m.link_out, hidden)):
                out.append((f + 1, j, *over, True))
    return out


def _over(sizes: list[int], short: int, link: float, hidden: float) -> tuple[float, int] | None:
    """(seconds beyond `hidden`, bytes) of the copies that carry at least `short` bytes
    of whole arrays of `sizes` over `link`; None when `hidden` covers them."""
    nbytes = _least_cover(sizes, short)
    over = nbytes / link - hidden
    return (over, nbytes) if over > 0 else None


def _pressure(trace, budget: int, m, compute: list[float]) -> Pressure:
    """NOTE [Pressure bound]: the largest sum, over intervals [L, U) that do not overlap,
    of what the forced copies inside each take beyond its compute, or what a window of
    NOTE [Crowd bound] forces, whichever is more for that interval."""
    prefix = [0.0]
    for c in compute:
        prefix.append(prefix[-1] + c)
    if max(needs(trace), default=0) > budget:      # no schedule at all: nothing to bound
        return Pressure(0.0, 0, 0)
    copies = _forced_copies(trace, budget)
    windows: dict[int, list[tuple[int, float, int, bool]]] = {}
    for lo, hi, over, nbytes, out in _crowded(trace, budget, m, prefix):
        windows.setdefault(hi, []).append((lo, over, nbytes, out))
    if not copies and not windows:
        return Pressure(0.0, 0, 0)
    starts = sorted({c[0] for c in copies})
    ends: dict[int, list[tuple[int, int, int, bool]]] = {}
    for c in copies:
        ends.setdefault(c[1], []).append(c)
    read = [0] * len(starts)            # bytes in of copies inside [starts[i], U)
    written = [0] * len(starts)
    done_u, done_best = [-1], [(0.0, 0, 0, ())]   # intervals ending by U: (stall, in, out, [L, U))
    for u in sorted(set(ends) | set(windows)):
        for lo, _, nbytes, out in ends.get(u, ()):
            table = written if out else read
            for i in range(bisect.bisect_right(starts, lo)):
                table[i] += nbytes
        best = done_best[-1]
        for lo, over, nbytes, out in windows.get(u, ()):   # NOTE [Crowd bound]
            before = done_best[bisect.bisect_right(done_u, lo - 1) - 1]
            if before[0] + over > best[0]:
                best = (before[0] + over, before[1] + (0 if out else nbytes),
                        before[2] + (nbytes if out else 0), before[3] + ((lo, u),))
        for i in range(bisect.bisect_right(starts, u)):
            start = starts[i]
            over = _side(m, read[i], written[i]) - (prefix[u] - prefix[start])
            if over <= 0:
                continue
            before = done_best[bisect.bisect_right(done_u, start - 1) - 1]
            if before[0] + over > best[0]:
                best = (before[0] + over, before[1] + read[i], before[2] + written[i],
                        before[3] + ((start, u),))
        done_u.append(u)
        done_best.append(best)
    stall, nin, nout, intervals = done_best[-1]
    return Pressure(stall, nin, nout, intervals)
