"""One rank of test_two_ranks.py's resume test, under torchrun (gloo, 2 ranks): each rank
trains in its own state directory, rank 0 one iteration more than rank 1 (what a stop
between the two ranks' commits leaves), then resumes there with a new OutOfCore, and
writes what resume() did to OUT/resume.rank<r>.json.

    torchrun --standalone --nproc-per-node 2 tests/distributed/resume_worker.py OUT
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import outcore


def train(model, opt, state_dir, iterations):
    with outcore.OutOfCore("256KiB", state_dir=state_dir, min_move_bytes=0) as ooc:
        start = ooc.resume(model, opt)
        for _ in range(start, iterations):
            with ooc.iteration():
                model(torch.ones(8, 128)).square().mean().backward()
                opt.step()
                opt.zero_grad()


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    state_dir = os.path.join(out, f"rank{rank}")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Linear(256, 128))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, opt, state_dir, 3 if rank == 0 else 2)        # no collective: ranks apart
    before = [p.detach().clone() for p in model.parameters()]
    result = {}
    try:
        train(model, opt, state_dir, 4)
        result["resumed"] = True
    except outcore.OutcoreError as err:
        result["error"] = str(err)
    result["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with open(os.path.join(out, f"resume.rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
