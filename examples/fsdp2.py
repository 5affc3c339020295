"""Sharded data-parallel training with every rank out of core: FSDP2 (`fully_shard`) under
torchrun, one OutOfCore per rank (its own budget, its own swap file).

    torchrun --standalone --nproc-per-node 2 examples/fsdp2.py [--budget 64MiB] [--steps 20] [--check]
        [--state-dir DIR]

--check trains the same steps without outcore first and says whether this rank's shard
of every parameter came out bitwise equal. --state-dir keeps each rank's shards after
every step in DIR/rank<r> (docs/state.md): the same command started again after a kill
or Ctrl-C resumes from the last completed step, bitwise. CPU tensors and gloo: on a machine
with GPUs this script still trains on the CPU (outcore's GPU tier, offload="host", has not
run under torchrun yet).
Ownership (docs/distributed.md): FSDP keeps the unsharded parameters of each layer it
gathers and frees them itself; outcore moves the sharded parameters, the optimizer
state, the activations. Buffers a collective used (the reduce-scattered gradients) stay
where they are, so give each rank room for one gathered layer and its gradient shards
beside the largest layer's activations.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

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


def train(steps: int, budget: str | None, batch: int,
          state_dir: str | None = None) -> list[torch.Tensor]:
    rank = dist.get_rank()
    torch.manual_seed(1234 + rank)           # dropout: the same stream with and without outcore
    model = build()
    for layer in model.layers:
        fully_shard(layer)                   # one all-gather per layer, freed after use
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    if budget is None:
        for x, y in batches(rank, steps, batch):
            step(x, y)
    else:
        with tempfile.TemporaryDirectory() as swap, outcore.OutOfCore(
                budget=budget, swap_dir=swap,
                state_dir=state_dir and f"{state_dir}/rank{rank}") as ooc:
            start = ooc.resume(model, opt) if state_dir else 0     # steps already done
            if rank == 0 and start:
                print(f"resumed after step {start - 1}", flush=True)
            for i, (x, y) in enumerate(batches(rank, steps, batch)):
                if i < start:
                    continue                 # the data of the steps done: drawn, not used
                with ooc.iteration():
                    loss = step(x, y)
                if rank == 0 and (i % 5 == 0 or i == steps - 1):
                    print(f"step {i:3d}  loss {loss:.4f}", flush=True)
            if rank == 0:
                print(ooc.report())
    return [p.to_local().detach().clone() for p in model.parameters()]     # this rank's shard


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--budget", default="64MiB",
                        help="fast-tier budget per rank (the in-core peak at batch 16 is ~300 MiB)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="sequences of 128 per rank")
    parser.add_argument("--check", action="store_true",
                        help="train without outcore first and compare bitwise")
    parser.add_argument("--state-dir", help="keep each rank's state there after every step, "
                        "and resume from it when started again")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    try:
        plain = train(args.steps, None, args.batch) if args.check else None
        ours = train(args.steps, args.budget, args.batch, args.state_dir)
        if plain is not None:
            same = all(torch.equal(a, b) for a, b in zip(plain, ours))
            print(f"rank {dist.get_rank()}: parameters bitwise equal to FSDP2 alone: {same}", flush=True)
            if not same:
                raise SystemExit(1)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
