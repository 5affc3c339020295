"""Run by test_two_ranks.py under torchrun (2 ranks, gloo): DDP models with comm hooks
under OutOfCore. A hook whose Future callback writes the bucket on gloo's thread (fp16
compression, Python's or DDP's builtin) is refused at the first iteration, nothing
changed; DDP's default allreduce hook composes. Writes OUT/hook.rank<r>.json:
{hook: {"error": message or None, "unchanged": bool}}."""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import outcore


def attempt(hook: str) -> dict:
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, 128)), bucket_cap_mb=0.1)
    if hook.startswith("builtin-"):
        model._register_builtin_comm_hook(getattr(dist.BuiltinCommHookType, hook[8:]))
    else:
        model.register_comm_hook(None, getattr(default_hooks, hook))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    error = None
    with outcore.OutOfCore("1MiB", min_move_bytes=0) as ooc:
        try:
            for _ in range(2):
                with ooc.iteration():
                    model(torch.randn(64, 128)).square().mean().backward()
                    opt.step()
                    opt.zero_grad()
        except outcore.OutcoreError as exc:
            error = str(exc)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    del model, opt
    dist.barrier()
    return {"error": error, "unchanged": unchanged}


def main() -> int:
    dist.init_process_group("gloo")
    result = {hook: attempt(hook) for hook in ("fp16_compress_hook", "builtin-FP16_COMPRESS",
                                               "allreduce_hook", "builtin-ALLREDUCE")}
    with open(os.path.join(sys.argv[1], f"hook.rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
