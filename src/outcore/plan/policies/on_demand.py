"""`on-demand`: no prefetch (what save_on_cpu and vDNN do).

Each function swaps in what it lacks right before it runs; after it, every array it
used leaves the fast tier unless the very next function uses it again (swapped out if it
changed, dropped if its slow copy is current, freed if dead). Each swap-out is waited for
before the next function starts (vDNN synchronizes its offloads layer by layer), so a
swap-out is never cancelled. This is the window scheduler with a one-function window."""
from __future__ import annotations

from . import register
from .edges import END_KEEP_SHARE, end_keep_used
from .window import plan_window


@register("on-demand", (), "no prefetch; every swap-out waited for at once (save_on_cpu, vDNN)")
def plan_on_demand(trace, budget: int, *, keep_state=True, start_state=None,
                   end_within_start=False, end_keep_share=END_KEEP_SHARE):
    return (plan_window(trace, budget, window_functions=1, eager_wait=True, keep_state=keep_state,
                        start_state=start_state, end_within_start=end_within_start,
                        end_keep_share=end_keep_share),
            {"keep_state": keep_state, **end_keep_used(end_keep_share)})
