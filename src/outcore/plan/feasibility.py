"""What a budget must at least hold, and the schedule when everything fits."""
from __future__ import annotations

from ..errors import InfeasibleBudget
from ..trace.lifetimes import function_bytes
from ..units import format_bytes
from .schedule import FREE, Action


def needs(trace) -> list[int]:
    """Bytes that must be on the fast tier together while each function runs: its own
    distinct arrays, and at function 0 also every input (inputs are handed over resident)."""
    out = [function_bytes(trace, i) for i in range(len(trace.functions))]
    if out:
        used0 = {acc.array for acc in trace.functions[0].accesses}
        out[0] += sum(a.nbytes for a in trace.arrays
                      if a.kind == "input" and a.existed_before and a.id not in used0)
    return out


def min_feasible_budget(trace) -> int:
    """The smallest budget every runnable policy (adaptive, fixed, on-demand, adaptive-belady)
    can plan: waiting for all older swap-outs always leaves room for one function."""
    return max(needs(trace), default=0)


def require_feasible(trace, budget: int) -> None:
    """Raise InfeasibleBudget naming the most demanding function when `budget` is too small."""
    need = needs(trace)
    if not need:
        return
    worst = max(range(len(need)), key=need.__getitem__)
    if need[worst] <= budget:
        return
    fn = trace.functions[worst]
    raise InfeasibleBudget(
        f"a budget of {format_bytes(budget)} ({budget} B) cannot run function {worst} "
        f"({fn.op}, {fn.phase}): it needs {format_bytes(need[worst])} ({need[worst]} B) on the "
        f"fast tier at once. The smallest feasible budget for this trace is "
        f"{format_bytes(need[worst])}; raise the budget or lower the batch size.",
        function_index=worst, op=fn.op, phase=fn.phase, needed_bytes=need[worst],
        budget_bytes=budget, min_feasible_bytes=need[worst])


def plan_in_core(trace):
    """Everything fits: nothing moves. Arrays that existed before the step start resident;
    dead arrays are freed right after their last use; persistent ones stay."""
    n = len(trace.functions)
    begin = [[] for _ in range(n)]
    end = [[] for _ in range(n)]
    start = []
    for a in trace.arrays:
        if a.existed_before:
            start.append(a.id)
        if a.kind != "persistent":
            end[a.last_use].append(Action(FREE, a.id))
    return begin, end, start
