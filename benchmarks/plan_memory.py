"""Host memory one kept plan holds (NOTE [Step shapes] in run/plans.py, rule 6): the
trace, its schedule and its function keys, for the 20,002-function synthetic trace of
benchmarks/plan_speed.py, planned at half its peak.

    .venv/bin/python benchmarks/plan_memory.py
"""
from __future__ import annotations

import gc
import os
import sys
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plan_speed import synthetic  # noqa: E402

from outcore.plan import plan  # noqa: E402
from outcore.run.plans import function_keys  # noqa: E402


def main() -> None:
    budget = synthetic(20_000).peak()[0] // 2
    gc.collect()
    tracemalloc.start()
    trace = synthetic(20_000)
    made = tracemalloc.get_traced_memory()[0]
    schedule = plan(trace, budget)
    planned = tracemalloc.get_traced_memory()[0]
    keys = function_keys(trace)
    keyed = tracemalloc.get_traced_memory()[0]
    print(f"trace {made / 2**20:.1f} MiB, schedule {(planned - made) / 2**20:.1f} MiB, "
          f"keys {(keyed - planned) / 2**20:.1f} MiB, functions {len(trace.functions)}")
    del schedule, keys


if __name__ == "__main__":
    main()
