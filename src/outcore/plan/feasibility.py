"""What a budget must at least hold, when arrays really leave memory, and the schedule
when everything fits.

Release points (docs/planning.md#held-arrays): a non-persistent array occupies fast
memory until PyTorch drops its last reference, `Array.freed_after` (None: still alive at
the end of the step, i.e. function n - 1), never before its last use. Between its last
use and its release it is *dead but held*: never read again, but resident unless the
plan moves it out. Persistent arrays live to the end and carry over.

NOTE [Workspace]: `Function.workspace_bytes` is memory an op takes for itself while it
runs (a cuDNN or oneDNN workspace) and gives back before it returns. It is no array: it
never moves and no action names it. Every count of what a function holds includes it:
`needs` and `function_bytes` (so the smallest feasible budget leaves room for it), the
occupancy curve and `Trace.live_bytes` (the in-core peak), the window planner (which
reserves it before the function's operands and releases it after the function runs)
and `check.replay` (R2 counts it while the function runs)."""
from __future__ import annotations

import functools
import weakref

from ..errors import InfeasibleBudget
from ..trace.lifetimes import function_bytes
from ..units import exact_bytes, format_bytes
from .schedule import FREE, Action

# trace id -> {function: its table}, for as long as the trace lives (see per_trace).
_TABLES: dict[int, dict] = {}


def per_trace(fn):
    """Compute `fn(trace)` once per Trace. A Trace is immutable and one plan() call
    plans it several times over (api._cycle), each time reading the same tables. The
    table is kept as a tuple and handed out as a new list (or the tuple itself with
    `shared=True`, for readers that never change it), so no caller can change what the
    next one reads. The entry goes when the trace does (a finalizer), so a later trace
    with the same id() never sees it."""
    @functools.wraps(fn)
    def cached(trace, shared: bool = False):
        key = id(trace)
        tables = _TABLES.get(key)
        if tables is None:
            tables = _TABLES[key] = {}
            weakref.finalize(trace, _TABLES.pop, key, None)
        table = tables.get(fn)
        if table is None:
            table = tables[fn] = tuple(fn(trace))
        return table if shared else list(table)
    return cached


@per_trace
def release_points(trace) -> list[int]:
    """Per array: index of the function after which its storage is released. Persistent
    arrays get n - 1 (they outlive the step; they are never FREEd)."""
    last = len(trace.functions) - 1
    out = []
    for a in trace.arrays:
        if a.kind == "persistent" or a.freed_after is None:
            out.append(max(last, a.last_use))
        else:
            out.append(max(a.freed_after, a.last_use))
    return out


def occupancy(trace, only=None, steady: bool = False) -> list[int]:
    """Bytes occupying the fast tier during each function when nothing is ever moved:
    each array from its creation (or the start, if it existed before) to its release.
    Equal to trace.live_bytes(actual=True) on traces whose freed_after >= last_use.
    `only(array)`, if given, picks the arrays counted. `steady`: as in the steps after
    this one, where what this one made and kept is there from the start: optimizer
    state made lazily, and the gradients it kept, which the next step frees at its
    `zero_grad()` (after its forward in the usual loop: not counted, a first step's
    figure fell 512 B short there). Where `zero_grad()` comes first they are counted
    though they die at once: the figure can then be higher than the steps need (26%
    for 30 layers of 100x100, every tensor under min_move_bytes: helper-126)."""
    if only is None and not steady:
        return _occupancy_all(trace)
    return _occupancy(trace, only, steady)


@per_trace
def _occupancy_all(trace):
    return _occupancy(trace, None)


def _occupancy(trace, only, steady: bool = False) -> list[int]:
    """Arrays' bytes per function; with only=None also the function's workspace."""
    n = len(trace.functions)
    delta = [0] * (n + 1)
    for a, rel in zip(trace.arrays, release_points(trace)):
        if only is not None and not only(a):
            continue
        start = 0 if a.existed_before or steady and a.kind == "persistent" else a.first_use
        delta[start] += a.nbytes
        delta[max(start, rel) + 1] -= a.nbytes
    curve, running = [], 0
    for i, fn in enumerate(trace.functions):
        running += delta[i]
        curve.append(running + (fn.workspace_bytes if only is None else 0))
    return curve


@per_trace
def needs(trace) -> list[int]:
    """Bytes that must be on the fast tier together while each function runs: its own
    distinct arrays, and every input not used yet (inputs are handed over resident and
    stay until their first use: the executor learns which storage an array is only when
    an op touches it, so it cannot move one before)."""
    n = len(trace.functions)
    out = [function_bytes(trace, i) for i in range(n)]
    pending = [0] * (n + 1)
    for a in trace.arrays:
        if a.kind == "input" and a.existed_before and a.first_use > 0:
            pending[0] += a.nbytes
            pending[a.first_use] -= a.nbytes
    running = 0
    for i in range(n):
        running += pending[i]
        out[i] += running
    return out


def min_feasible_budget(trace) -> int:
    """The smallest budget every runnable policy (adaptive, fixed, on-demand, adaptive-belady)
    can plan: waiting for all older swap-outs, and swapping out (or dropping) dead-but-held
    arrays, always leaves room for one function. Held arrays therefore add nothing here:
    only a function's own operands must be resident together."""
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
    workspace = (f", {format_bytes(fn.workspace_bytes)} of it the op's own workspace"
                 if fn.workspace_bytes else "")
    pending = need[worst] - function_bytes(trace, worst)
    if pending:
        # `needs`: inputs stay resident until their first use. Tensors the step only
        # reads that existed before it (the batch, or an optimizer's history such as
        # LBFGS's) are inputs.
        workspace += (f", {format_bytes(pending)} of it tensors that existed before the step "
                      "and that it only reads (the batch, state such as LBFGS's history, or "
                      "FSDP's all-gather buffers, made where no op shows them), "
                      "which stay in memory until their first use")
    raise InfeasibleBudget(
        f"a budget of {exact_bytes(budget)} cannot run function {worst} "
        f"({fn.op}, {fn.phase}): it needs {exact_bytes(need[worst])} on the "
        f"fast tier at once{workspace}. The smallest feasible budget for this trace is "
        f"{format_bytes(need[worst])}; raise the budget or lower the batch size.",
        function_index=worst, op=fn.op, phase=fn.phase, needed_bytes=need[worst],
        budget_bytes=budget, min_feasible_bytes=need[worst])


def plan_in_core(trace):
    """Everything fits (budget >= max(occupancy)): nothing moves. Arrays that existed
    before the step start resident; non-persistent arrays are freed at their release
    point (after the function where PyTorch drops them); persistent ones stay."""
    n = len(trace.functions)
    begin = [[] for _ in range(n)]
    end = [[] for _ in range(n)]
    start = []
    for a, rel in zip(trace.arrays, release_points(trace)):
        if a.existed_before:
            start.append(a.id)
        if a.kind != "persistent":
            end[rel].append(Action(FREE, a.id))
    return begin, end, start
