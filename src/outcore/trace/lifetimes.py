"""Lifetimes and the in-core live-bytes curve of a trace (pure functions)."""
from __future__ import annotations

from .model import Array, Trace


def live_interval(array: Array, n_functions: int, *, actual: bool = False) -> tuple[int, int]:
    """Inclusive range of function indices during which `array` occupies memory in-core.

    An array that existed before the step is live from the start; one the step creates,
    from its creation. Persistent arrays stay to the end. Others end at their last use,
    or, with actual=True, where the storage really died while recording."""
    start = 0 if array.existed_before else array.first_use
    if array.kind == "persistent":
        end = n_functions - 1
    elif actual:
        end = n_functions - 1 if array.freed_after is None else array.freed_after
    else:
        end = array.last_use
    return start, max(start, end)


def live_bytes(trace: Trace, *, actual: bool = False) -> list[int]:
    """Bytes live during each function of `trace` when nothing is ever moved."""
    n = len(trace.functions)
    delta = [0] * (n + 1)
    for arr in trace.arrays:
        start, end = live_interval(arr, n, actual=actual)
        delta[start] += arr.nbytes
        delta[end + 1] -= arr.nbytes
    curve, running = [], 0
    for i, fn in enumerate(trace.functions):
        running += delta[i]
        curve.append(running + fn.workspace_bytes)      # NOTE [Workspace], feasibility.py
    return curve


def function_bytes(trace: Trace, index: int) -> int:
    """Bytes that must be on the fast tier together while function `index` runs: its
    operands and its workspace."""
    seen = set()
    total = trace.functions[index].workspace_bytes
    for acc in trace.functions[index].accesses:
        if acc.array not in seen:
            seen.add(acc.array)
            total += trace.arrays[acc.array].nbytes
    return total
