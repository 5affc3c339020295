"""`fixed`: the window counted in functions (the baseline the paper improved on)."""
from __future__ import annotations

from ...errors import OutcoreError
from . import register
from .edges import END_KEEP_SHARE, end_keep_used
from .window import plan_window

DEFAULT_K = 4


@register("fixed", {"k"}, "a window of k functions (the baseline the paper improved on)")
def plan_fixed(trace, budget: int, *, k=DEFAULT_K, keep_state=True, start_state=None,
               end_within_start=False, end_keep_share=END_KEEP_SHARE):
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise OutcoreError(f"fixed policy: k must be a positive number of functions, got {k!r}")
    return (plan_window(trace, budget, window_functions=k, keep_state=keep_state,
                        start_state=start_state, end_within_start=end_within_start,
                        end_keep_share=end_keep_share),
            {"k": k, "keep_state": keep_state, **end_keep_used(end_keep_share)})
