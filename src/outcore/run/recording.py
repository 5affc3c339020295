"""The recording iteration: record the trace while running memory-safe (on-demand)."""
from __future__ import annotations

from ..trace.recorder import Recording
from .on_demand import OnDemand, infeasible
from .residency import Residency


class SafeRecording(Recording):
    """Records like `outcore.record()` and keeps managed bytes within the budget as it
    goes (except, unavoidably, for the outputs of the op running right now).

    A function that cannot fit the budget at all raises InfeasibleBudget at once unless
    the optimizer has begun updating state: the step then stops exactly as an
    out-of-memory error in plain PyTorch would, before any parameter changes. Once the
    optimizer is running, stopping would leave parameters half-updated, so the iteration
    is completed correctly (over budget) and the error is raised when it ends."""

    def __init__(self, residency: Residency, budget: int, *, label: str = ""):
        super().__init__(label=label)
        self.on_demand = OnDemand(residency, budget)
        self.budget = budget
        self.infeasible = None
        self._state_written = False
        self._entries = []

    def _before_op(self, func, inputs, index) -> None:
        self._entries = self.on_demand.before(inputs)

    def _after_op(self, func, inputs, written, outputs) -> None:
        entries = self._entries
        created = self.on_demand.after(entries, written, outputs)
        fn = self._functions[-1]
        if fn.phase == "optimizer" and written:
            self._state_written = True
        needed = sum(e.nbytes for e in entries) + sum(e.nbytes for e in created)
        if needed > self.budget and self.infeasible is None:
            error = infeasible(fn.index, fn.op, fn.phase, needed, self.budget)
            if not self._state_written:
                raise error
            self.infeasible = error
