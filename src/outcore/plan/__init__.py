"""Stage 2: plan when each array moves between the fast and the slow tier.

plan(trace, budget, policy) -> Schedule; check(trace, schedule, budget) raises on any
violated invariant; lower_bound(trace, budget) -> the fewest bytes any schedule moves."""
from .api import POLICIES, plan
from .check import check
from .feasibility import min_feasible_budget
from .lower_bound import LowerBound, lower_bound
from .schedule import ACTION_KINDS, Action, Schedule

__all__ = ["ACTION_KINDS", "Action", "LowerBound", "POLICIES", "Schedule", "check",
           "lower_bound", "min_feasible_budget", "plan"]
