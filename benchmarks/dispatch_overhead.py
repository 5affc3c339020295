"""What following a step costs when nothing moves: plain PyTorch, the same step under a
no-op TorchDispatchMode, and under OutOfCore with a budget that fits, side by side in one
process (medians of 5 steps, twice).

    .venv/bin/python benchmarks/dispatch_overhead.py
"""
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import outcore
from outcore.workloads.digits import digit_batches
from outcore.workloads.resnet import resnet50


class Noop(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def main():
    torch.manual_seed(0)
    model = resnet50(num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    x, y = next(digit_batches(64, 64))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward(); opt.step(); opt.zero_grad()

    def under_noop():
        with Noop():
            step()

    ooc = outcore.OutOfCore(budget="8GiB")

    def under_outcore():
        with ooc.iteration():
            step()

    def median(f, n=5):
        times = []
        for _ in range(n):
            t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
        return statistics.median(times)

    for _ in range(3):
        under_outcore()          # record twice (lazy momentum), then replay
    for _ in range(2):
        plain, noop, ours = median(step), median(under_noop), median(under_outcore)
        print(f"plain {plain:.3f} s | no-op dispatch mode {noop:.3f} s ({noop / plain - 1:+.1%}) | "
              f"outcore, nothing moves {ours:.3f} s ({ours / plain - 1:+.1%})")
    ooc.close()


if __name__ == "__main__":
    main()
