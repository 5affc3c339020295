"""Memory-safe execution without a plan: make an op's inputs resident before it runs and
evict the least recently used storages after it whenever the budget needs the room.

This is how the recording iteration runs (nothing is known about the future yet) and how
the rest of an iteration runs once it deviated from its plan. It never loses data: an
evicted storage is written out before its memory is released.
"""
from __future__ import annotations

from ..errors import InfeasibleBudget
from ..units import format_bytes
from .residency import Residency
from ..aten import distinct_storages as storages
from ..aten import iter_tensors, output_tensors, written_tensors


class OnDemand:
    def __init__(self, residency: Residency, budget: int):
        self.residency = residency
        self.budget = budget

    def before(self, inputs, func) -> list:
        """Make every input storage resident, with room left for what `func` will create
        (`room`); return their entries."""
        res = self.residency
        entries = [res.track(s) for s in storages(inputs) if s.nbytes() or s._cdata in res.entries]
        incoming = sum(e.nbytes for e in entries if not e.occupies_fast)
        keep = {e.key for e in entries}
        res.evict_lru(self.budget - incoming - room(func, entries), keep)
        for e in entries:
            res.ready(e)
        return entries

    def run(self, func, args, kwargs):
        """Run one op memory-safe: inputs resident before, budget restored after."""
        inputs = list(iter_tensors(args)) + list(iter_tensors(kwargs.values()))
        entries = self.before(inputs, func)
        out = func(*args, **kwargs)
        self.after(entries, written_tensors(func, args, kwargs), output_tensors(out))
        return out

    def after(self, entries, written, outputs) -> list:
        """Track the op's outputs, note what it wrote, and evict until within budget.
        Returns the entries of the storages the op created (not those it returned in place)."""
        res = self.residency
        written_keys = {s._cdata for s in storages(written)}
        for e in entries:
            if e.key in written_keys:
                res.mark_written(e)
        seen = {e.key for e in entries}
        created = [res.track(s) for s in storages(outputs)
                   if s._cdata not in seen and (s.nbytes() or s._cdata in res.entries)]
        res.evict_lru(self.budget, set())
        return created


def room(func, entries) -> int:
    """Bytes to leave free before `func` runs for the storages it will create, which are
    not known until it returns: as much as its largest movable input (an elementwise op,
    a convolution or a norm makes an output of about that size), and none for an op that
    only writes its arguments or returns a view of one. Without it an op's outputs came
    on top of a full budget (ooc.report(): the recording iteration's peak)."""
    if func.is_view or func._schema.is_mutable:
        return 0
    return max((e.nbytes for e in entries if not e.pinned), default=0)


def infeasible(index: int, what: str, phase: str, movable: int, pinned: int, budget: int,
               min_move_bytes: int, *, completed: bool = False) -> InfeasibleBudget:
    """The error for a function that cannot fit: it needs `movable` bytes of its own
    arrays at once beside `pinned` bytes of arrays that never move. `completed`: the
    optimizer had begun, so the step was finished (over budget) before raising."""
    needed = movable + pinned
    held = (f" ({format_bytes(movable)} of its own arrays beside {format_bytes(pinned)} of "
            f"arrays that never move: under min_move_bytes={min_move_bytes:,}, not resizable, "
            "or held by a collective or FSDP)") if pinned else ""
    return InfeasibleBudget(
        f"function {index} ({what}, {phase}) needs {format_bytes(needed)} ({needed:,} B) resident "
        f"at once{held}, more than the budget of {format_bytes(budget)} ({budget:,} B) you passed; "
        f"no schedule can run it. The smallest feasible budget is at least {format_bytes(needed)} "
        f"({needed:,} B): raise the budget to that or more, or lower the batch. "
        + ("The optimizer had begun updating the parameters when this was found, so the step was "
           "completed correctly, over the budget; later iterations of this OutOfCore will not start."
           if completed else "Nothing was trained: the optimizer has not changed any parameter."),
        function_index=index, op=what, phase=phase, needed_bytes=needed, budget_bytes=budget,
        min_feasible_bytes=needed)
