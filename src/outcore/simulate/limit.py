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
read / link_in), for every cut; the limit is the largest of those and the step's
compute. It ignores the links' latency and holds for a shared link too (a shared link
is only slower). A property test checks that no simulated schedule beats it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..plan.feasibility import release_points
from ..units import parse_bytes
from .machines import machine as get_machine


@dataclass(frozen=True)
class Limit:
    seconds: float          # no schedule of the step under the budget is faster
    compute_s: float        # the step's compute on the machine (the limit with room to spare)
    cut: int | None         # the binding cut lies before this function (None: compute binds)
    written: int            # bytes the out-link must carry before that cut
    read: int               # bytes the in-link must carry after it

    def __str__(self) -> str:
        if self.cut is None:
            return f"physical limit {self.seconds * 1e3:.1f} ms: the step's compute"
        return (f"physical limit {self.seconds * 1e3:.1f} ms (compute {self.compute_s * 1e3:.1f} ms): "
                f"before function {self.cut} at least {self.written / 1e9:.2f} GB must be written "
                f"out, after it {self.read / 1e9:.2f} GB read back")


def physical_limit(trace, budget, machine="cpu-disk") -> Limit:
    """The cut bound of the module docstring for `trace` under `budget` on `machine`."""
    m = get_machine(machine)
    budget = parse_bytes(budget)
    n = len(trace.functions)
    compute = [m.compute_time(fn) for fn in trace.functions]
    total = sum(compute)
    best = Limit(total, total, None, 0, 0)
    if n < 2:
        return best
    # Per cut c in 1..n-1 (before function c): bytes alive across it, of which existed
    # before the step, and of which never used again (difference arrays).
    alive, existed, unused = ([0] * (n + 1) for _ in range(3))
    for a, release in zip(trace.arrays, release_points(trace)):
        lo = 1 if a.existed_before else a.first_use + 1
        if release < lo:
            continue
        for table, start in ((alive, lo), (existed, lo if a.existed_before else n),
                             (unused, max(lo, a.last_use + 1))):
            if start <= release:
                table[start] += a.nbytes
                table[release + 1] -= a.nbytes
    before = 0.0
    run_alive = run_existed = run_unused = 0
    for c in range(n):
        run_alive += alive[c]
        run_existed += existed[c]
        run_unused += unused[c]
        if c:
            written = max(0, run_alive - budget - run_existed)
            read = max(0, run_alive - budget - run_unused)
            seconds = (max(before, written / m.link_out) + max(total - before, read / m.link_in))
            if seconds > best.seconds:
                best = Limit(seconds, total, c, written, read)
        before += compute[c]
    return best
