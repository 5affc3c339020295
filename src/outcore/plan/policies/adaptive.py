"""`adaptive`: the paper's byte-limited window (default 1.5 x budget)."""
from __future__ import annotations

from .window import plan_window

DEFAULT_WINDOW_FACTOR = 1.5   # the paper's finding for ResNet-50


def plan_adaptive(trace, budget: int, *, window=None, keep_state=True):
    from ...units import parse_bytes
    limit = int(DEFAULT_WINDOW_FACTOR * budget) if window is None else parse_bytes(window)
    return (plan_window(trace, budget, window_bytes=limit, keep_state=keep_state),
            {"window": limit, "keep_state": keep_state})
