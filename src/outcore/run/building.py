"""`with ooc.building():` — create or load a model larger than the memory it runs in.

Under this mode every op (module construction, initialization, `load_state_dict`'s
copies) runs memory-safe, as the recording iteration does: its inputs are made resident
first and the least recently used storages are written to the swap file whenever the
managed bytes would exceed the budget. When the block ends, what is on the slow tier is
mapped (NOTE [Mapped state] in mapped.py), so the model is a plain PyTorch module with
the right values that was never whole in memory. The same ops run in the same order as
without outcore, so initialization from a seed gives the same numbers, bitwise.
"""
from __future__ import annotations

from ..aten import call_split
from .interrupts import HeldMode, Shield
from .on_demand import OnDemand
from .residency import Residency


class Building(HeldMode):
    def __init__(self, residency: Residency, budget: int, shield: Shield):
        super().__init__(shield)
        self.on_demand = OnDemand(residency, budget)

    def _dispatch(self, func, args, kwargs):
        return call_split(func, args, kwargs, self._one)

    def _one(self, func, args, kwargs, split=None):
        return self.on_demand.run(func, args, kwargs)
