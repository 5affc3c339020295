"""Planning policies, one registry: `REGISTRY[name]` is a `Policy`, and api.plan looks
policies up there and nowhere else. Every planning policy is the window engine
(window.py) with its own window, and `auto` chooses among them; each module registers
itself with `@register`, and the order below is the order of `outcore.plan.POLICIES`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Policy:
    """name: what a user passes as `policy=`. plan(trace, budget, *, keep_state,
    start_state, end_within_start, **options) -> (WindowPlan, options used).
    options: the keyword options a user may pass (COMMON_OPTIONS for every policy).
    choose: for a policy that picks among others per trace (auto), instead of plan:
    choose(trace, budget, options, cycle) -> ((begin, end, start), options used,
    check.Accounting), where cycle(policy, options) is plan()'s own planning of one
    policy (api._cycle) and returns the same."""
    name: str
    plan: Callable | None
    options: frozenset
    summary: str
    choose: Callable | None = None


REGISTRY: dict[str, Policy] = {}
# Options every policy takes: the step's edges (edges.py), which the window engine plans.
COMMON_OPTIONS = frozenset({"keep_state", "end_keep_share"})


def register(name: str, options=(), summary: str = "", *, chooses: bool = False):
    """Decorator: register `fn` as the planner of policy `name` (with chooses=True, as its
    choose function)."""
    def add(fn):
        if name in REGISTRY:
            raise ValueError(f"policy {name!r} is registered twice")
        REGISTRY[name] = Policy(name, None if chooses else fn,
                                frozenset(options) | COMMON_OPTIONS, summary,
                                fn if chooses else None)
        return fn
    return add


from . import auto, adaptive, fixed, on_demand, belady  # noqa: E402,F401  (registration order)
