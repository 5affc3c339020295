"""One rank of test_two_ranks.py's resume tests, under torchrun (gloo, 2 ranks). Each
rank trains in its own state directories, rank 0 further than rank 1 (what a stop
between the two ranks' commits leaves), then resumes there with a new OutOfCore and
trains to iteration 4; OUT/resume.rank<r>.json says what resume() did in each case:

  one-apart: rank 0 kept 3 iterations, rank 1 2: both resume from 2 (rank 0 from the
    state it kept one commit before) and end bitwise equal to 4 plain iterations;
  two-apart: rank 0 kept 4, rank 1 2: refused on both, nothing loaded;
  fsdp: an FSDP2 model with Adam kept 2 iterations on both ranks (each its own shards,
    NOTE [Durable state] rule 9), resumes and ends bitwise equal to 4 plain FSDP2
    iterations;
  zero: a ZeroRedundancyOptimizer (AdamW) kept 2 iterations on both ranks (each its own
    part, rule 15), resumes and ends bitwise equal to 4 plain iterations with it;
  zero-other: each rank resumed from the other's directory (another part of the
    parameters) is refused, nothing loaded.

    torchrun --standalone --nproc-per-node 2 tests/distributed/resume_worker.py OUT
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import outcore


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Linear(256, 128))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def make_fsdp():
    from torch.distributed.fsdp import fully_shard
    model, _ = make()
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def make_zero(model=None):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    model = model or make()[0]
    return model, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW,
                                          lr=1e-3)


def same_zero(a, b) -> bool:
    """Parameters and this rank's ZeRO state of (model, optimizer) pairs a and b."""
    (ma, oa), (mb, ob) = a, b
    pairs = list(zip(ma.parameters(), mb.parameters()))
    for p, q in pairs:
        sa, sb = oa.optim.state.get(p, {}), ob.optim.state.get(q, {})
        if sa.keys() != sb.keys():
            return False
        pairs = pairs + [(sa[k], sb[k]) for k in sa]
    return bool(oa.optim.state) and all(torch.equal(x, y) for x, y in pairs)


def local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def same(a, b) -> bool:
    """Parameters and optimizer state of (model, optimizer) pairs a and b, bitwise."""
    (ma, oa), (mb, ob) = a, b
    pairs = list(zip(ma.parameters(), mb.parameters()))
    for sa, sb in zip(oa.state.values(), ob.state.values()):
        pairs += [(sa[k], sb[k]) for k in sa]
    return all(torch.equal(local(x), local(y)) for x, y in pairs)


def step(model, opt):
    model(torch.ones(8, 128)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def train(model, opt, state_dir, iterations, budget="256KiB") -> int:
    with outcore.OutOfCore(budget, state_dir=state_dir, min_move_bytes=0) as ooc:
        start = ooc.resume(model, opt)
        for _ in range(start, iterations):
            with ooc.iteration():
                step(model, opt)
    return start


def kept_and_resumed(build, alike, state_dir) -> dict:
    """2 iterations of build()'s pair kept in `state_dir`, resumed into a new pair and
    trained to 4: where it resumed, and whether it ends `alike` 4 plain iterations."""
    plain = build()
    for _ in range(4):
        step(*plain)
    train(*build(), state_dir, 2, budget="1MiB")
    resumed = build()
    return {"start": train(*resumed, state_dir, 4, budget="1MiB"),
            "plain": alike(plain, resumed)}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    plain, plain_opt = make()
    for _ in range(4):
        step(plain, plain_opt)
    result = {}
    for case, ahead in (("one-apart", 3), ("two-apart", 4)):
        state_dir = os.path.join(out, case, f"rank{rank}")
        model, opt = make()
        train(model, opt, state_dir, ahead if rank == 0 else 2)    # no collective: apart
        before = [p.detach().clone() for p in model.parameters()]
        got = {}
        try:
            got["start"] = train(model, opt, state_dir, 4)
            got["plain"] = all(torch.equal(a, b) for a, b in zip(plain.parameters(),
                                                                 model.parameters()))
        except outcore.OutcoreError as err:
            got["error"] = str(err)
            got["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        got["files"] = sorted(os.listdir(state_dir))
        result[case] = got
    for case, build, alike in (("fsdp", make_fsdp, same), ("zero", make_zero, same_zero)):
        result[case] = kept_and_resumed(build, alike, os.path.join(out, case, f"rank{rank}"))
    train(*make_zero(), os.path.join(out, "zero-other", f"rank{rank}"), 1, budget="1MiB")
    dist.barrier()
    model, opt = make_zero()        # each rank given the other's directory: another part
    before = [p.detach().clone() for p in model.parameters()]
    try:
        train(model, opt, os.path.join(out, "zero-other", f"rank{1 - rank}"), 2, budget="1MiB")
        result["zero-other"] = {"error": None}
    except outcore.OutcoreError as err:
        result["zero-other"] = {"error": str(err), "unchanged": all(
            torch.equal(a, b) for a, b in zip(before, model.parameters()))}
    with open(os.path.join(out, f"resume.rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
