"""What outcore costs per op where the plan moves nothing (a passive replay: the budget
is above the step's peak), against plain PyTorch and a TorchDispatchMode that does
nothing (the floor any dispatch mode pays), side by side in one process, 1 thread, 30
rounds in turn, medians of the last 25.

    .venv/bin/python benchmarks/passive_cost.py

A 40-block MLP (Linear, LayerNorm, GELU; width 64, batch 16), SGD with momentum: about
1,200 small functions a step, so that the per-op cost dominates. Each variant trains
its own copy of the model.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import outcore

ROUNDS, WARM = 30, 5


class Nothing(TorchDispatchMode):
    """A dispatch mode that runs each op as it is."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def make(x):
    """One copy of the model and its optimizer, stepped once; its step function."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(40) for m in (
        torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.GELU())])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    step()
    return step


def main() -> None:
    torch.set_num_threads(1)
    x = torch.randn(16, 64)
    steps = {"plain": make(x), "nothing mode": make(x), "outcore passive": make(x)}
    with outcore.record() as rec:
        make(x)()
    ooc = outcore.OutOfCore(2 * rec.trace.peak()[0] + (1 << 20))
    blocks = {"plain": None, "nothing mode": Nothing, "outcore passive": ooc.iteration}
    times: dict = {k: [] for k in steps}
    for _ in range(ROUNDS):
        for k, step in steps.items():
            start = time.perf_counter()
            if blocks[k] is None:
                step()
            else:
                with blocks[k]():
                    step()
            times[k].append(time.perf_counter() - start)
    modes = [it.mode for it in ooc.report().iterations]
    n = len(ooc.trace.functions)
    ooc.close()
    print(f"{n} functions; outcore's iterations: {modes.count('record')} recorded, "
          f"{modes.count('replay')} replayed")
    base = statistics.median(times["plain"][WARM:])
    for k, v in times.items():
        m = statistics.median(v[WARM:])
        print(f"{k:16s} {m * 1e3:7.2f} ms  +{(m - base) / n * 1e6:6.1f} us per function")


if __name__ == "__main__":
    main()
