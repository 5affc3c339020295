"""One rank of tests/distributed/test_two_ranks.py, run under torchrun (gloo, 2 ranks).

For each composition (DDP, FSDP2, a 2-stage pipeline) and optimizer (SGD with momentum,
Adam): train STEPS steps without outcore, then the same from the same seed under an
OutOfCore whose budget is BUDGET_SHARE of this rank's in-core peak (recorded from the
plain run), and write what the test compares to OUT/<case>.rank<r>.json: whether every
parameter and every loss is bitwise equal, the report's figures, or the error (then the
rank exits at once, so that its peer, waiting in a collective, is ended by torchrun).

    torchrun --standalone --nproc-per-node 2 tests/distributed/worker.py OUT [CASE...]
"""
from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist

import outcore

STEPS = 6
# Of this rank's in-core peak. DDP's buckets, FSDP's unsharded parameters and the
# pipeline's send and receive buffers never move (run/compose.py), so those need more.
BUDGET_SHARE = {"ddp": 0.45, "fsdp2": 0.6, "pipeline": 0.6, "ddpconv": 0.45, "fsdp2conv": 0.6,
                "accumddp": 0.45}
# The accumulating case steps every second iteration, with DDP's no_sync() in between:
# outcore learns a plan per step shape (NOTE [Step shapes] in run/plans.py) and the last
# iterations replay; it ends on a stepping iteration, whose plan has the allreduces.
STEPS_OF = {"accumddp": 14}
WIDTH, DEPTH, BATCH = 256, 4, 1024
# The conv cases run a small CNN (convolution, batch norm, in-place ReLU) under
# OutOfCore(recompute=True): recompute's repeats inside DDP's backward (asserted), and
# under FSDP2 recompute rule 8, which keeps every producer touching FSDP's parameters
# out (a CNN there recomputes nothing: docs/planning.md, "Recompute").
CASES = ([f"{c}-{o}" for c in ("ddp", "fsdp2", "pipeline") for o in ("sgd", "adam")]
         + ["ddpconv-sgd", "fsdp2conv-adam", "accumddp-adam"])
IMAGE = (BATCH * WIDTH // (4 * 32 * 32), 4, 32, 32)     # a batch reshaped as images


def blocks(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU())
                                 for _ in range(DEPTH)])


def cnn(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(*[nn.Sequential(nn.Conv2d(4 if i == 0 else 16, 16, 3, padding=1),
                                         nn.BatchNorm2d(16), nn.ReLU(inplace=True))
                           for i in range(3)], nn.Conv2d(16, 4, 3, padding=1))


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g)


def make_optimizer(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)
    return torch.optim.Adam(params, lr=1e-3)


def loss_fn(out, target):
    return torch.nn.functional.mse_loss(out, target)


# -- the three compositions: each returns (model, step(i) -> loss or None) --------------
def data_parallel(model, opt_name, shape=None):
    """The step every data-parallel rank runs: its own batch, the whole model."""
    opt = make_optimizer(opt_name, model.parameters())

    def step(i):
        x, y = batch(dist.get_rank(), i)
        if shape is not None:
            x, y = x.view(shape), y.view(shape)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss
    return model, step


def ddp(opt_name):
    from torch.nn.parallel import DistributedDataParallel as DDP
    return data_parallel(DDP(blocks()), opt_name)


def fsdp2(opt_name):
    from torch.distributed.fsdp import fully_shard
    model = blocks()
    for block in model:
        fully_shard(block)
    fully_shard(model)
    return data_parallel(model, opt_name)


def pipeline(opt_name):
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
    rank = dist.get_rank()
    full = blocks()
    half = DEPTH // 2
    stage_module = full[:half] if rank == 0 else full[half:]
    stage = PipelineStage(stage_module, rank, 2, torch.device("cpu"))
    schedule = ScheduleGPipe(stage, n_microbatches=4, loss_fn=loss_fn)
    opt = make_optimizer(opt_name, stage_module.parameters())

    def step(i):
        x, y = batch(0, i)             # one batch flows through both stages
        if rank == 0:
            schedule.step(x)
            loss = None
        else:
            losses = []
            schedule.step(target=y, losses=losses)
            loss = torch.stack(losses).sum()
        opt.step()
        opt.zero_grad()
        return loss
    return stage_module, step


def ddpconv(opt_name):
    from torch.nn.parallel import DistributedDataParallel as DDP
    return data_parallel(DDP(cnn()), opt_name, IMAGE)


def fsdp2conv(opt_name):
    from torch.distributed.fsdp import fully_shard
    model = cnn()
    for block in model[:3]:
        fully_shard(block)
    fully_shard(model)
    return data_parallel(model, opt_name, IMAGE)


def accumddp(opt_name, every: int = 2):
    """DDP with gradient accumulation across iterations: no_sync() for the micro-batches
    that do not step (no allreduce), optimizer.step() every `every` iterations."""
    import contextlib
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(blocks())
    opt = make_optimizer(opt_name, model.parameters())

    def step(i):
        x, y = batch(dist.get_rank(), i)
        stepping = i % every == every - 1
        with contextlib.nullcontext() if stepping else model.no_sync():
            loss = loss_fn(model(x), y) / every
            loss.backward()
        if stepping:
            opt.step()
            opt.zero_grad()
        return loss
    return model, step


BUILD = {"ddp": ddp, "fsdp2": fsdp2, "pipeline": pipeline, "ddpconv": ddpconv,
         "fsdp2conv": fsdp2conv, "accumddp": accumddp}


def parameters(model):
    out = []
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p      # FSDP2: this rank's shard
        out.append(local.detach().clone())
    return out


def run_case(case: str) -> dict:
    kind, opt_name = case.split("-")
    model, step = BUILD[kind](opt_name)
    plain_losses, steps = [], STEPS_OF.get(kind, STEPS)
    for i in range(steps):
        if i == 1:
            with outcore.record() as rec:        # records, changes nothing
                loss = step(i)
            peak = rec.trace.peak(actual=True)[0]
        else:
            loss = step(i)
        plain_losses.append(None if loss is None else loss.detach().clone())
    plain = parameters(model)
    del model, step, rec, loss
    gc.collect()        # FSDP's hooks make cycles: the plain model is gone before ours starts
    dist.barrier()

    model, step = BUILD[kind](opt_name)
    budget = int(BUDGET_SHARE[kind] * peak)
    losses = []
    with tempfile.TemporaryDirectory() as swap, \
            outcore.OutOfCore(budget=budget, swap_dir=swap,
                              recompute=True if kind.endswith("conv") else "auto") as ooc:
        for i in range(steps):
            with ooc.iteration():
                loss = step(i)
            losses.append(None if loss is None else loss.detach().clone())
        report = ooc.report()
        ours = parameters(model)
        joint = _simulate_together(ooc.trace, ooc.schedule)
    return {
        "params_equal": len(plain) == len(ours) and all(torch.equal(a, b) for a, b in zip(plain, ours)),
        "losses_equal": all((a is None and b is None) or torch.equal(a, b)
                            for a, b in zip(plain_losses, losses)),
        "in_core_peak": peak,
        "budget": budget,
        "modes": [it.mode for it in report.iterations],
        "bytes_read": [it.bytes_read for it in report.iterations],
        "peak_resident": [it.peak_resident for it in report.iterations],
        "deviations": [it.deviation for it in report.iterations],
        "pinned_bytes": report.pinned_bytes,
        "recomputed_arrays": report.recomputed_arrays,
        "bytes_recomputed": [it.bytes_recomputed for it in report.iterations],
        **joint,
    }


def _simulate_together(trace, schedule) -> dict:
    """Both ranks' traces and schedules, simulated together (simulate_ranks): what the
    test checks of how their collectives and sends paired up."""
    from outcore.simulate import simulate_ranks
    from outcore.simulate.comm import collective_kind
    both = [None] * dist.get_world_size()
    dist.all_gather_object(both, (trace, schedule))
    sims = simulate_ranks([t for t, _ in both], [s for _, s in both], "cpu-disk",
                          link="loopback-gloo")
    rank = dist.get_rank()
    return {
        "peers": [f.peer for f in trace.functions if collective_kind(f.op) == "p2p"],
        # Start of each collective (not p2p) on every rank, in issue order.
        "collective_starts": [[c.start_s for c, k in zip(sim.collectives, _kinds(t)) if k != "p2p"]
                              for (t, _), sim in zip(both, sims)],
        "joint_step_s": sims[rank].step_time_s,
        "compute_s": sum(sims[rank].compute_s),
    }


def _kinds(trace):
    from outcore.simulate.comm import collective_kind
    return [k for k in (collective_kind(f.op) for f in trace.functions) if k is not None]


def main() -> int:
    out_dir, cases = sys.argv[1], sys.argv[2:] or CASES
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        for case in cases:
            try:
                result = run_case(case)
            except Exception as exc:        # reported to the test, which shows it
                result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            with open(os.path.join(out_dir, f"{case}.rank{rank}.json"), "w") as f:
                json.dump(result, f)
            if "error" in result:
                os._exit(1)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
