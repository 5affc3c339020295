"""What a step of many small ops costs under OutOfCore when the plan moves: a stack of
DEPTH Linear(WIDTH) + Tanh layers, batch 64, Adam (weights and activations of 64-256 KiB
at WIDTH 256: movable), plain PyTorch against OutOfCore at FRACTION of the step's in-core
peak, in one process (medians of 7 steps). Prints wall time and the main thread's CPU
time of each: the difference is outcore's own work per op (its Python on the step's
thread: matching each op to the plan, binding storages, issuing and finishing transfers),
beside the waits for the disk.

    .venv/bin/python benchmarks/per_op_cost.py [WIDTH DEPTH FRACTION]     # 256 100 0.4
"""
import statistics
import sys
import tempfile
import time

import torch

import outcore


def main(width: int = 256, depth: int = 100, fraction: float = 0.4) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(64, width)

    def step():
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()

    step()                                  # Adam's state made: the steady step
    with outcore.record() as rec:
        step()
    peak = rec.trace.peak(actual=True)[0]
    budget = max(int(fraction * peak), outcore.smallest_budget(rec.trace))

    def measure(fn, reps=7):
        wall, cpu = [], []
        for _ in range(reps):
            t, c = time.perf_counter(), time.thread_time()
            fn()
            wall.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
        return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3

    plain_wall, plain_cpu = measure(step)
    with tempfile.TemporaryDirectory() as d, outcore.OutOfCore(budget, swap_dir=d) as ooc:
        for _ in range(4):
            with ooc.iteration():
                step()

        def replayed():
            with ooc.iteration():
                step()
        wall, cpu = measure(replayed)
        last = ooc.report().iterations[-1]
    ops = len(rec.trace.functions)
    print(f"{ops} ops, in-core peak {peak / 2**20:.1f} MiB, budget {budget / 2**20:.1f} MiB "
          f"({last.mode}, {(last.bytes_read + last.bytes_written) / 2**20:.0f} MiB moved)")
    print(f"plain PyTorch: {plain_wall:.0f} ms wall, {plain_cpu:.0f} ms CPU")
    print(f"OutOfCore:     {wall:.0f} ms wall, {cpu:.0f} ms CPU on the step's thread "
          f"({(cpu - plain_cpu) / ops * 1e3:.0f} us per op more)")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(*(int(args[0]), int(args[1]), float(args[2])) if args else ())
