"""torch.distributed.checkpoint (DCP) on a model and optimizer under outcore, in one
process (docs/integrations.md, "torch.distributed.checkpoint"; helper-196 tried it on
DDP and FSDP2 ranks too): saved between iterations, loaded back into the live model
(rewinding two steps) and trained on, bitwise equal to the same plain run; a full state
dict loaded from `torch.load` is made movable again."""
import contextlib

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

import outcore
from outcore.integrations import make_movable

# DCP in one process, on purpose: no process group.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.LayerNorm(512),
                               torch.nn.GELU(), torch.nn.Linear(512, 512), torch.nn.ReLU(),
                               torch.nn.Linear(512, 256))


def _train(ooc, model, opt, steps):
    losses = []
    for i in steps:
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(64, 256, generator=g), torch.randn(64, 256, generator=g)
        with ooc.iteration() if ooc is not None else contextlib.nullcontext():
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(loss.detach())
    return losses


def _state(model, opt):
    return [*model.state_dict().values(),
            *[t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]]


def _rewound(ooc, path):
    """Five steps, a DCP save after the third, then the saved state loaded into the live
    model and optimizer and two more steps: 3 + 2 + 2 steps of training."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = _train(ooc, model, opt, range(3))
    sd_model, sd_opt = get_state_dict(model, opt)
    dcp.save({"model": sd_model, "opt": sd_opt}, checkpoint_id=str(path))
    losses += _train(ooc, model, opt, range(3, 5))
    sd_model, sd_opt = get_state_dict(model, opt)
    state = {"model": sd_model, "opt": sd_opt}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["opt"])
    losses += _train(ooc, model, opt, range(3, 5))
    return [*losses, *_state(model, opt)]


def test_dcp_save_and_load_into_the_live_model_train_bitwise(tmp_path):
    plain = _rewound(None, tmp_path / "plain")
    with outcore.OutOfCore("3MiB", swap_dir=str(tmp_path), min_move_bytes=0) as ooc:
        got = _rewound(ooc, tmp_path / "ooc")
        report = ooc.report()
    assert len(got) == len(plain) and all(torch.equal(a, b) for a, b in zip(plain, got))
    assert any(it.bytes_written for it in report.iterations), "the state moved"
    assert all(it.peak_resident <= report.budget for it in report.iterations)
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == []     # no swap file left


def test_a_full_state_dict_from_torch_load_is_made_movable(tmp_path):
    """`set_state_dict(full_state_dict=True)` from a dict `torch.load` made leaves the
    optimizer's state in tensors PyTorch cannot resize (InfeasibleBudget at the next
    iteration, naming them); `make_movable` after it lets the plan move them again."""
    def run(ooc):
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = _train(ooc, model, opt, range(2))
        full = StateDictOptions(full_state_dict=True)
        # A file per run: the plain run's state maps its own (overwritten, it changed).
        path = tmp_path / ("plain.pt" if ooc is None else "ooc.pt")
        torch.save(get_state_dict(model, opt, options=full), path)
        sd_model, sd_opt = torch.load(path, mmap=True, weights_only=True)
        set_state_dict(model, opt, model_state_dict=sd_model, optim_state_dict=sd_opt,
                       options=full)
        if ooc is not None:
            make_movable(opt, ooc)
        losses += _train(ooc, model, opt, range(2, 5))
        return [*losses, *_state(model, opt)]
    plain = run(None)
    with outcore.OutOfCore("3MiB", swap_dir=str(tmp_path), min_move_bytes=0) as ooc:
        got = run(ooc)
        report = ooc.report()
    assert all(torch.equal(a, b) for a, b in zip(plain, got))
    assert all(it.peak_resident <= report.budget for it in report.iterations)
