"""`adaptive`: the paper's byte-limited window.

The paper found a window of 1.5 x budget best for ResNet-50 on its GPU; here the default
is no limit but the fast tier's room: prefetches go as early as there is free room, and
never evict anything still needed to get it. Simulated on CPU-disk traces of ResNet-18,
ResNet-50 and GPT-2 at half and a quarter of the peak, an unlimited window was the
fastest or close to it in every case, and read back no more bytes than a limited one
(benchmarks/window_sweep.py; the figures are in docs/planning.md, "How far ahead to look").
"""
from __future__ import annotations

from ...errors import OutcoreError
from . import register
from .edges import END_KEEP_SHARE, end_keep_used
from .window import OUTPUTS, WAIT_ORDERS, plan_window

PAPER_WINDOW_FACTOR = 1.5   # the paper's finding for ResNet-50: window=int(1.5 * budget)


def window_limit(window) -> int | None:
    """The window in bytes, or None for no limit but the budget."""
    from ...units import parse_bytes
    return None if window is None else parse_bytes(window)


@register("adaptive", {"window", "wait_order", "outputs"},
          "the paper's window, limited in bytes (default: by the budget only)")
def plan_adaptive(trace, budget: int, *, window=None, keep_state=True, start_state=None,
                  end_within_start=False, wait_order="farthest", outputs="early",
                  end_keep_share=END_KEEP_SHARE):
    limit = window_limit(window)
    if wait_order not in WAIT_ORDERS:
        raise OutcoreError(f"adaptive: wait_order must be one of {', '.join(WAIT_ORDERS)}, "
                           f"got {wait_order!r}")
    if outputs not in OUTPUTS:
        raise OutcoreError(f"adaptive: outputs must be one of {', '.join(OUTPUTS)}, "
                           f"got {outputs!r}")
    return (plan_window(trace, budget, window_bytes=limit, keep_state=keep_state,
                        start_state=start_state, end_within_start=end_within_start,
                        wait_order=wait_order, outputs=outputs,
                        end_keep_share=end_keep_share),
            {"window": limit, "keep_state": keep_state, **end_keep_used(end_keep_share),
             # named only when not the default, so that summaries stay as they were
             **({"wait_order": wait_order} if wait_order != "farthest" else {}),
             **({"outputs": outputs} if outputs != "early" else {})})
