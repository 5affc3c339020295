"""Run by test_two_ranks.py under torchrun (2 ranks, gloo): FSDP2 at a budget its gathered
parameters alone pass, then again at the smallest budget the InfeasibleBudget named.
Writes OUT/budget.rank<r>.json: [{"budget", "smallest" (None where it trained), and where
it did not, "names_ranks": whether the error said what the other ranks see}, ...]; and
OUT/first.rank<r>.json: what two steps recorded with outcore.record() say of themselves."""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import outcore


def sharded():
    """The model, each block and the whole sharded, and this rank's batch generator."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU()) for _ in range(4)],
        torch.nn.Linear(512, 8))
    for block in list(model)[:4]:
        fully_shard(block)
    fully_shard(model)
    return model, torch.Generator().manual_seed(dist.get_rank())


def attempt(budget: int) -> tuple[int | None, bool]:
    model, g = sharded()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with outcore.OutOfCore(budget=budget) as ooc:
        try:
            for _ in range(4):
                x, y = torch.randn(128, 512, generator=g), torch.randn(128, 8, generator=g)
                with ooc.iteration():
                    torch.nn.functional.mse_loss(model(x), y).backward()
                    opt.step()
                    opt.zero_grad()
        except outcore.InfeasibleBudget as err:
            said = str(err)
            return err.min_feasible_bytes, (f"rank {dist.get_rank()} of 2: the others are not "
                                            "told" in said and "start the job again" in said)
    return None, False


def first_steps() -> list[dict]:
    """Two steps recorded with outcore.record() after fully_shard: what each trace's
    info says of the step (FSDP2 sets itself up in the first), and what smallest_budget
    logged for it."""
    import logging
    model, g = sharded()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("outcore").addHandler(handler)
    steps = []
    try:
        for _ in range(2):
            x, y = torch.randn(128, 512, generator=g), torch.randn(128, 8, generator=g)
            with outcore.record() as rec:
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                opt.zero_grad()
            del said[:]
            outcore.smallest_budget(rec.trace)
            steps.append({"unsteady": rec.trace.info.get("unsteady"), "said": list(said)})
    finally:
        logging.getLogger("outcore").removeHandler(handler)
    return steps


def main() -> int:
    dist.init_process_group("gloo")
    with open(os.path.join(sys.argv[1], f"first.rank{dist.get_rank()}.json"), "w") as f:
        json.dump(first_steps(), f)
    attempts, budget = [], 6 * 2**20
    for _ in range(3):
        smallest, names_ranks = attempt(budget)
        attempts.append({"budget": budget, "smallest": smallest})
        if smallest is None:
            break
        attempts[-1]["names_ranks"] = names_ranks
        budget = smallest
    with open(os.path.join(sys.argv[1], f"budget.rank{dist.get_rank()}.json"), "w") as f:
        json.dump(attempts, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
