"""Time per iteration for a model of thousands of small storages: an MLP of N layers
160 wide (each weight 100 KiB: moves; each bias 640 B, its Adam moments and step count:
never move), Adam, under a budget. The recordings make room op by op, and a walk of the
eviction order past thousands of pinned entries once made them take minutes.

    .venv/bin/python benchmarks/many_storages.py [--layers 1250] [--budget 100MiB] [--iterations 2]

Prints the seconds of each iteration (the first two record) and of one plain PyTorch
step; asserts nothing."""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

import outcore


def make(layers: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(layers)
                                  for m in (torch.nn.Linear(160, 160), torch.nn.Tanh())])
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def step(model, opt, x):
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=1250)
    parser.add_argument("--budget", default="100MiB")
    parser.add_argument("--iterations", type=int, default=2)
    args = parser.parse_args()
    x = torch.randn(16, 160)
    model, opt = make(args.layers)
    for _ in range(3):                         # plain PyTorch, its third step
        start = time.perf_counter()
        step(model, opt, x)
    print(f"plain PyTorch step: {time.perf_counter() - start:.2f} s")
    model, opt = make(args.layers)
    with tempfile.TemporaryDirectory() as swap, \
            outcore.OutOfCore(budget=args.budget, swap_dir=swap) as ooc:
        for i in range(args.iterations):
            start = time.perf_counter()
            with ooc.iteration():
                step(model, opt, x)
            it = ooc.report().iterations[-1]
            print(f"iteration {i + 1} ({it.mode}): {time.perf_counter() - start:.2f} s")
        print(f"{len(ooc.trace.functions)} functions, {2 * args.layers} parameters")


if __name__ == "__main__":
    main()
