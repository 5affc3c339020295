"""torch.distributed compositions: FSDP is refused with a clear error before anything
runs (it resizes its parameters' storages itself, which crashed the process under
outcore); DDP composes, bitwise. One rank (world size 1, gloo) in this process."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import outcore


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))


def _step(model, opt, x):
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()


def test_fsdp2_is_refused_before_anything_runs(one_rank, tmp_path):
    from torch.distributed.fsdp import fully_shard
    model = _model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().full_tensor().clone() for p in model.parameters()]
    with outcore.OutOfCore(budget="1MiB", swap_dir=str(tmp_path)) as ooc:
        with pytest.raises(outcore.OutcoreError, match=r"FSDP.*does not compose with FSDP yet"):
            with ooc.iteration():
                _step(model, opt, torch.randn(64, 256))
        assert ooc.report().iterations == ()
    after = [p.detach().full_tensor() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    _step(model, opt, torch.randn(64, 256))          # FSDP alone still trains


def test_ddp_composes_bitwise(one_rank, tmp_path):
    from torch.nn.parallel import DistributedDataParallel as DDP
    x = torch.randn(64, 256)
    plain = DDP(_model())
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for _ in range(6):
        _step(plain, plain_opt, x)
    model = DDP(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with outcore.OutOfCore(budget="1MiB", swap_dir=str(tmp_path)) as ooc:
        for _ in range(6):
            with ooc.iteration():
                _step(model, opt, x)
        report = ooc.report()
    # DDP rebuilds its buckets in its second step, so the third deviates and is recorded
    # again; from then on the plan replays.
    assert report.iterations[-1].mode == "replay" and report.iterations[-1].bytes_read > 0, str(report)
    assert report.iterations[-1].deviation is None, str(report)
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)
