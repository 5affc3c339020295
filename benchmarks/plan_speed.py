"""How long planning takes on a 20,000-function trace (issue 3: under 10 s per plan).

    .venv/bin/python benchmarks/plan_speed.py [--functions 20000] [--passes]

The trace is synthetic and shaped like a training step of a deep plain network: forward
(read weight and previous activation, create activation), backward (gradient of the
input and of the weight, reading the saved activation), then one optimizer update per
weight (read gradient, write weight and momentum). The budget is a third of the in-core
peak, so every policy has real work to do. As in a real step, weight gradients stay held
(by `param.grad`) after the optimizer reads them until the end of the step, and the input
batch is held by the caller (freed_after None): see docs/planning.md#held-arrays.
Reports seconds per policy, and the full collection run right after each plan (planning
pauses the collector, so what it allocated is walked afterwards); asserts nothing."""
from __future__ import annotations

import argparse
import gc
import time

from outcore.plan import POLICIES, check, lower_bound, plan
from outcore.trace.model import Access, Array, Function, Trace


def synthetic(n_functions: int) -> Trace:
    layers = max(1, n_functions // 4)      # forward 1 + backward 2 + optimizer 1 per layer
    fns, arrays, uses = [], [], []

    def new(nbytes, kind, before, category):
        arrays.append([nbytes, kind, before, category])
        uses.append([])
        return len(arrays) - 1

    def fn(op, phase, accesses):
        i = len(fns)
        for a, _ in accesses:
            uses[a].append(i)
        fns.append(Function(i, op, phase, tuple(Access(a, k) for a, k in accesses),
                            duration_s=1e-3, flops=10**9, bytes_touched=10**7))

    weights = [new(1 << 20, "persistent", True, "parameter") for _ in range(layers)]
    moments = [new(1 << 20, "persistent", True, "optimizer_state") for _ in range(layers)]
    x = new(4 << 20, "input", True, "input")
    acts = [x]
    for i in range(layers):
        y = new(4 << 20, "transient", False, "activation")
        fn("linear", "forward", [(weights[i], "read"), (acts[-1], "read"), (y, "create")])
        acts.append(y)
    grad = new(4 << 20, "transient", False, "temporary")
    fn("loss_backward", "backward", [(acts[-1], "read"), (grad, "create")])
    grads_w = [None] * layers
    for i in reversed(range(layers)):
        gw = new(1 << 20, "transient", False, "gradient")
        fn("grad_weight", "backward", [(grad, "read"), (acts[i], "read"), (gw, "create")])
        gx = new(4 << 20, "transient", False, "temporary")
        fn("grad_input", "backward", [(grad, "read"), (weights[i], "read"), (gx, "create")])
        grads_w[i], grad = gw, gx
    for i in range(layers):
        fn("sgd", "optimizer", [(grads_w[i], "read"), (moments[i], "write"), (weights[i], "write")])
    fn("sink", "backward", [(grad, "read")])
    out = []
    last = len(fns) - 1
    for ident, ((nbytes, kind, before, category), u) in enumerate(zip(arrays, uses)):
        if kind in ("persistent", "input"):
            freed = None
        elif category == "gradient":
            freed = last            # held by param.grad until zero_grad
        else:
            freed = u[-1]
        out.append(Array(ident, nbytes, "float32", "cpu", kind, category, (u[0], 0), u[0], u[-1],
                         freed, before))
    return Trace(tuple(fns), tuple(out), "cpu", "measured")


def passes(trace, budget) -> None:
    """One pass of the window planner (`plan_window`, what plan() runs up to four times per
    call) and the replay of its plan, without the collector, best of three."""
    from outcore.plan.check import replay
    from outcore.plan.policies.window import plan_window
    was = gc.isenabled()
    gc.disable()
    try:
        for outputs in ("early", "late"):
            took, replayed = [], []
            for _ in range(3):
                start = time.perf_counter()
                wp = plan_window(trace, budget, outputs=outputs)
                took.append(time.perf_counter() - start)
                start = time.perf_counter()
                replay(trace, wp.begin, wp.end, wp.start, budget)
                replayed.append(time.perf_counter() - start)
            print(f"  one pass, outputs {outputs:<5}       {min(took):6.2f} s  "
                  f"(its replay {min(replayed):.2f} s; best of three, collector off)")
    finally:
        if was:
            gc.enable()
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--functions", type=int, default=20000)
    parser.add_argument("--passes", action="store_true",
                        help="also time one pass of the window planner alone (outputs early and "
                             "late, the collector off, best of three) and check.replay of its plan")
    args = parser.parse_args()
    start = time.perf_counter()
    trace = synthetic(args.functions)
    peak = trace.peak(actual=True)[0]       # held arrays included
    budget = peak // 3
    print(f"{len(trace.functions)} functions, {len(trace.arrays)} arrays, in-core peak "
          f"{peak / 2**30:.2f} GiB (held arrays included), budget {budget / 2**30:.2f} GiB "
          f"(built in {time.perf_counter() - start:.2f} s)")
    gc.collect()
    start = time.perf_counter()
    gc.collect()             # what a full collection costs with the trace alone, for comparison
    print(f"  a full collection with the trace alone: {time.perf_counter() - start:.2f} s")
    # every policy by name, and adaptive reserving outputs late (one of auto's configurations
    # on shorter traces: docs/planning.md, "Reserving outputs late")
    for policy, options in [(p, {}) for p in POLICIES] + [("adaptive", {"outputs": "late"})]:
        start = time.perf_counter()
        s = plan(trace, budget, policy, **options)
        took = time.perf_counter() - start
        start = time.perf_counter()
        gc.collect()         # what plan() left for the collector (NOTE [Planning and the collector])
        collected = time.perf_counter() - start
        start = time.perf_counter()
        check(trace, s)
        checked = time.perf_counter() - start
        held = sum(trace.arrays[a.array].nbytes for i, step in enumerate(s.end) for a in step
                   if a.kind == "SWAP_OUT" and trace.arrays[a.array].kind != "persistent"
                   and trace.arrays[a.array].last_use <= i)
        label = policy + (", outputs late" if options else "")
        print(f"  plan {label:<22} {took:6.2f} s  (then a full collection {collected:.2f} s; "
              f"check {checked:.2f} s; moves "
              f"{s.bytes_moved / 2**30:.2f} GiB, of which held arrays written {held / 2**30:.2f} GiB)")
    if args.passes:
        passes(trace, budget)
    start = time.perf_counter()
    bound = lower_bound(trace, budget)
    print(f"  lower bound                 {time.perf_counter() - start:6.2f} s  "
          f"({bound.bytes_moved / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
