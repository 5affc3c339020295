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


class OnDemand:
    def __init__(self, residency: Residency, budget: int):
        self.residency = residency
        self.budget = budget

    def before(self, inputs) -> list:
        """Make every input storage resident; return their entries."""
        res = self.residency
        entries = [res.track(s) for s in storages(inputs) if s.nbytes() or s._cdata in res.entries]
        incoming = sum(e.nbytes for e in entries if not e.occupies_fast)
        keep = {e.key for e in entries}
        res.evict_lru(self.budget - incoming, keep)
        for e in entries:
            res.ready(e)
        return entries

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


def infeasible(index: int, op: str, phase: str, needed: int, budget: int) -> InfeasibleBudget:
    return InfeasibleBudget(
        f"function {index} ({op}, {phase}) needs {format_bytes(needed)} resident at once, more than "
        f"the budget of {format_bytes(budget)}; no schedule can run it. The smallest feasible budget "
        f"is at least {format_bytes(needed)}: raise the budget to that or more, or lower the batch.",
        function_index=index, op=op, phase=phase, needed_bytes=needed, budget_bytes=budget,
        min_feasible_bytes=needed)
