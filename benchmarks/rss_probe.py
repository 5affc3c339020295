"""Where the resident set peaks under a budget: per iteration, the highest RSS a
sampling thread saw (every 0.5 ms), the process's VmHWM so far, and the memory
governor's trims and limit. The step is tests/run/test_memory.py's (ResNet-50, 1
channel, 64x64 digits, SGD with momentum).

    .venv/bin/python benchmarks/rss_probe.py [--batch 224] [--budget 422MiB] [--iterations 5]

The default budget is a quarter of the step's managed peak at batch 224 (1689 MiB, as
test_memory prints it; measuring it here would set the VmHWM this probe reports).
"""
from __future__ import annotations

import argparse
import threading
import time

import torch

import outcore
from outcore.memory.malloc import resident_bytes
from outcore.workloads.digits import digit_batches
from outcore.workloads.resnet import resnet50

MiB = 2**20


def hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=224)
    parser.add_argument("--budget", default="422MiB")
    parser.add_argument("--iterations", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resnet50(num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    x, y = next(digit_batches(args.batch, 64))

    def step():
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    budget = outcore.parse_bytes(args.budget)
    seen = [0]

    def sample():
        while True:
            seen[0] = max(seen[0], resident_bytes())
            time.sleep(0.0005)
    threading.Thread(target=sample, daemon=True).start()
    print(f"budget {budget / MiB:.0f} MiB; RSS before the first iteration {resident_bytes() / MiB:.0f} MiB")
    with outcore.OutOfCore(budget=budget) as ooc:
        for _ in range(args.iterations):
            seen[0] = 0
            with ooc.iteration():
                step()
            it = ooc.report().iterations[-1]
            gov = ooc._governor
            print(f"iteration {it.index} ({it.mode}): RSS up to {seen[0] / MiB:.0f} MiB, VmHWM {hwm() / MiB:.0f} MiB, "
                  f"{it.trims} trims, limit {(gov.limit or 0) / MiB:.0f} MiB, slack {gov.slack / MiB:.0f} MiB")
    print(f"after close(): VmHWM {hwm() / MiB:.0f} MiB")


if __name__ == "__main__":
    main()
