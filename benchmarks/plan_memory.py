"""Host memory one kept plan holds (NOTE [Step shapes] in run/plans.py, rule 6): the
trace, its schedule and its function keys, for the 20,002-function synthetic trace of
benchmarks/plan_speed.py, planned at half its peak.

    .venv/bin/python benchmarks/plan_memory.py
"""
import sys, tracemalloc, gc
sys.path.insert(0, __import__("os").path.dirname(__file__))
from plan_speed import synthetic
from outcore.plan import plan
from outcore.run.plans import function_keys
tr = synthetic(20_000)
budget = tr.peak()[0] // 2
gc.collect()
tracemalloc.start()
t = synthetic(20_000)
a = tracemalloc.get_traced_memory()[0]
s = plan(t, budget)
b = tracemalloc.get_traced_memory()[0]
k = function_keys(t)
c = tracemalloc.get_traced_memory()[0]
print(f"trace {a/2**20:.1f} MiB, schedule {(b-a)/2**20:.1f} MiB, keys {(c-b)/2**20:.1f} MiB, functions {len(t.functions)}")
