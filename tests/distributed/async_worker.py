"""Run by test_two_ranks.py under torchrun (2 ranks, gloo): local SGD whose averaging
overlaps the next step (NOTE [Collectives in flight] rule 6 in run/compose.py). Every
second step the parameters' all_reduce is started between iterations (`async_op=True`,
on the parameters and on `p.data`) and waited on inside the next iteration; the same
loop runs without outcore first. Before, the next iteration moved the parameters under
gloo's thread and the process aborted ("writev ... Bad address"). Writes
OUT/async.rank<r>.json: {case: {"equal": bool, "modes": [...], "error": str or None}}."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist

import outcore

WIDTH, DEPTH, BATCH, STEPS = 256, 4, 512, 8
BUDGET = 3_500_000                   # the parameters and Adam's state are 4.2 MB


def train(use_outcore: bool, on_data: bool) -> tuple[list, list]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH),
                                                      torch.nn.ReLU()) for _ in range(DEPTH)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pending, modes = [], []

    def step(i):
        with torch.no_grad():
            while pending:                      # the averaging started before this step
                p, work = pending.pop(0)
                work.wait()
                p.div_(2)
        g = torch.Generator().manual_seed(1000 * i + dist.get_rank())
        x, y = torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    with (outcore.OutOfCore(BUDGET, swap_dir=tempfile.gettempdir()) if use_outcore
          else contextlib.nullcontext()) as ooc:
        for i in range(STEPS):
            with ooc.iteration() if use_outcore else contextlib.nullcontext():
                step(i)
            if i % 2 == 1:                      # between iterations: start the averaging
                with torch.no_grad():
                    for p in model.parameters():
                        pending.append((p, dist.all_reduce(p.data if on_data else p,
                                                           async_op=True)))
        if use_outcore:
            with ooc.iteration():
                step(STEPS)
            modes = [it.mode for it in ooc.report().iterations]
        else:
            step(STEPS)
    return [p.detach().clone() for p in model.parameters()], modes


def main() -> int:
    dist.init_process_group("gloo")
    result = {}
    for case, on_data in (("param", False), ("data", True)):
        try:
            plain, _ = train(False, on_data)
            managed, modes = train(True, on_data)
            result[case] = {"equal": all(torch.equal(a, b) for a, b in zip(plain, managed)),
                            "modes": modes, "error": None}
        except Exception as exc:                # noqa: BLE001 - reported to the test
            result[case] = {"equal": False, "modes": [], "error": traceback.format_exc()}
        dist.barrier()
    with open(os.path.join(sys.argv[1], f"async.rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
