"""Run by test_two_ranks.py under torchrun (2 ranks, gloo): a DDP model trained under
OutOfCore with a second DDP module alive that never trains (none, a leftover never
called, a teacher called under no_grad). Writes OUT/idle.rank<r>.json: {case: the
iterations recorded of 8}."""
from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import outcore


def recordings(case: str) -> int:
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)]))
    other = DDP(torch.nn.Linear(256, 256)) if case != "none" else None
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(dist.get_rank())
    with outcore.OutOfCore(budget="3MiB", swap_dir=tempfile.mkdtemp(), min_move_bytes=0) as ooc:
        for _ in range(8):
            x = torch.randn(32, 256, generator=g)
            with ooc.iteration():
                if case == "teacher":
                    with torch.no_grad():
                        x = other(x)
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
        return [it.mode for it in ooc.report().iterations].count("record")


def main() -> int:
    dist.init_process_group("gloo")
    counts = {case: recordings(case) for case in ("none", "leftover", "teacher")}
    with open(os.path.join(sys.argv[1], f"idle.rank{dist.get_rank()}.json"), "w") as f:
        json.dump(counts, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
