"""Steps whose shape comes at random (NOTE [Step shapes] rule 9): mixup or cutmix by a coin
toss before a small conv net's forward, under a budget of about two thirds of its in-core
peak. Plain PyTorch against outcore (and, with --also-src, outcore from another source
tree), each in a fresh process, the runs alternating; per run the seconds of the last
half of the iterations, the iterations recorded and deviated, and whether the final
parameters are bitwise plain PyTorch's.

    .venv/bin/python benchmarks/random_shapes.py --rounds 3 [--also-src /tmp/x/src]
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import time

from sidebyside import arguments, counts, side_by_side, summary

STEPS = 32


def child(mode: str, out: str) -> None:
    import random

    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1, stride=2), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    coin, g = random.Random(3), torch.Generator().manual_seed(1)
    data = [(torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
            for _ in range(STEPS)]
    ooc, times = None, []
    with tempfile.TemporaryDirectory() as swap:
        if mode != "plain":
            import outcore
            ooc = outcore.OutOfCore(28 * 2**20, swap_dir=swap)      # in-core peak: 42 MiB
        for x, y in data:
            start = time.perf_counter()
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                x = x.clone()
                if coin.random() < 0.5:             # mixup
                    x.mul_(0.7).add_(x.flip(0).mul_(0.3))
                else:                               # cutmix
                    x[:, :, 8:20, 8:20] = x.flip(0)[:, :, 8:20, 8:20]
                torch.nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
                opt.zero_grad()
            times.append(time.perf_counter() - start)
        result = {"mode": mode, "seconds": sum(times[STEPS // 2:])}
        if ooc is not None:
            result.update(counts(ooc))
            ooc.close()
    torch.save(net.state_dict(), out)
    print(json.dumps(result))


def main() -> None:
    a = arguments()
    if a.child:
        child(a.child, a.out)
        return
    runs = side_by_side(__file__, [], a.rounds, a.also_src)
    summary(runs, a.rounds, STEPS, ["records", "deviations", "switched", "over_budget"])


if __name__ == "__main__":
    main()
