"""Data-parallel training with every rank out of core: DistributedDataParallel under
torchrun, one OutOfCore per rank (its own budget, its own swap file).

    torchrun --standalone --nproc-per-node 2 examples/ddp.py [--budget 64MiB] [--steps 20] [--check]
        [--accumulate N]

--check trains the same steps without outcore first and says whether every parameter
came out bitwise equal. CPU tensors and gloo: on a machine with GPUs this script still trains on the CPU (outcore's
GPU tier, offload="host", has not run under torchrun yet). Budgets: DDP's gradient
buckets never move (a collective may still use them: docs/distributed.md), so give each
rank at least their size beside the largest layer's activations; `gradient_as_bucket_view
=True` makes the gradients those buckets and halves that. --accumulate N calls
optimizer.step() every N-th iteration, under no_sync() in between (no allreduce): outcore
keeps a plan per shape of step and, once it has seen each, replays every iteration
(docs/executor.md, "Steps of several shapes").
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import outcore


def build(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)                  # the same initial weights on every rank
    layer = torch.nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024,
                                             dropout=0.1, batch_first=True)
    return torch.nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)


def batches(rank: int, steps: int, batch: int):
    g = torch.Generator().manual_seed(rank)  # each rank its own shard of the data
    for _ in range(steps):
        yield torch.randn(batch, 128, 256, generator=g), torch.randn(batch, 128, 256, generator=g)


def train(steps: int, budget: str | None, batch: int, accumulate: int = 1) -> list[torch.Tensor]:
    rank = dist.get_rank()
    torch.manual_seed(1234 + rank)           # dropout: the same stream with and without outcore
    model = DDP(build(), gradient_as_bucket_view=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(i, x, y):
        stepping = i % accumulate == accumulate - 1
        with contextlib.nullcontext() if stepping else model.no_sync():
            loss = torch.nn.functional.mse_loss(model(x), y) / accumulate
            loss.backward()
        if stepping:
            opt.step()
            opt.zero_grad()
        return loss.item()

    if budget is None:
        for i, (x, y) in enumerate(batches(rank, steps, batch)):
            step(i, x, y)
    else:
        with tempfile.TemporaryDirectory() as swap, \
                outcore.OutOfCore(budget=budget, swap_dir=swap) as ooc:
            for i, (x, y) in enumerate(batches(rank, steps, batch)):
                with ooc.iteration():
                    loss = step(i, x, y)
                if rank == 0 and (i % 5 == 0 or i == steps - 1):
                    print(f"step {i:3d}  loss {loss:.4f}", flush=True)
            if rank == 0:
                print(ooc.report())
    return [p.detach().clone() for p in model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--budget", default="64MiB",
                        help="fast-tier budget per rank (the in-core peak at batch 16 is ~300 MiB)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="sequences of 128 per rank")
    parser.add_argument("--accumulate", type=int, default=1,
                        help="optimizer.step() every this many iterations (no_sync() between)")
    parser.add_argument("--check", action="store_true",
                        help="train without outcore first and compare bitwise")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    try:
        if args.accumulate < 1:
            parser.error(f"--accumulate must be 1 or more, not {args.accumulate}")
        plain = train(args.steps, None, args.batch, args.accumulate) if args.check else None
        ours = train(args.steps, args.budget, args.batch, args.accumulate)
        if plain is not None:
            same = all(torch.equal(a, b) for a, b in zip(plain, ours))
            print(f"rank {dist.get_rank()}: parameters bitwise equal to DDP alone: {same}", flush=True)
            if not same:
                raise SystemExit(1)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
