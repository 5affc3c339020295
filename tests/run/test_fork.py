"""A process forked while an iteration is open runs plain PyTorch (NOTE [Forked children]
in run/interrupts.py): a DataLoader whose workers start inside `ooc.iteration()`."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import outcore


class Doubled(Dataset):
    """Every item is made by a torch op, which runs in the worker."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, 256, generator=g)
        self.y = torch.randint(0, 10, (256,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] * 2, self.y[i]


def train(ooc):
    torch.manual_seed(0)
    layers = [m for _ in range(4) for m in (torch.nn.Linear(256, 256), torch.nn.ReLU())]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # timeout: a worker that hangs fails the test instead of hanging it (it did: the
    # worker waited for the parent's mover thread, which a fork does not copy).
    loader = DataLoader(Doubled(), batch_size=64, num_workers=2, timeout=60)
    losses = []
    for _ in range(3):
        batches = None
        for _ in range(len(loader)):
            with ooc.iteration() if ooc else contextlib.nullcontext():
                if batches is None:
                    batches = iter(loader)        # the workers fork inside the step
                x, y = next(batches)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
            losses.append(loss.detach())
    return model, losses


def test_dataloader_workers_forked_inside_an_iteration(tmp_path):
    plain, plain_losses = train(None)
    # The workers' prefetched batches are in shared memory (pinned): how many are alive
    # while the step is recorded depends on the workers' timing, and the smallest
    # feasible budget with them (1.00-1.01 MiB) was refused 2 runs in 10 at 1 MiB.
    with outcore.OutOfCore("1200KiB", swap_dir=tmp_path) as ooc:
        model, losses = train(ooc)
        assert any(it.mode == "replay" for it in ooc.report().iterations)
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, losses))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 model.state_dict().values()))


def _child_trains_under_its_own_outofcore(swap_dir) -> None:
    import io
    import os
    from outcore.run import ooc as ooc_module
    assert ooc_module.open_outofcore() is None         # the parent's is not this process's
    t = torch.arange(4.0)
    buffer = io.BytesIO()
    torch.save(t, buffer)                               # PyTorch's own, as without outcore
    assert t.numpy().tolist() == [0.0, 1.0, 2.0, 3.0]
    with outcore.OutOfCore("8MiB", swap_dir=swap_dir) as own:
        model = torch.nn.Linear(8, 8)
        for _ in range(3):
            with own.iteration():
                model(torch.ones(2, 8)).sum().backward()
    os._exit(0)


def test_a_child_forked_while_an_outofcore_is_open_runs_plain_pytorch_and_its_own(tmp_path):
    """A process forked while an OutOfCore is open (multiprocessing's fork, a worker)
    took the parent's for its own: a torch.save or numpy() there went through the
    parent's table, and an OutOfCore of its own was refused as "another ... is still open"."""
    import multiprocessing
    with outcore.OutOfCore("8MiB", swap_dir=tmp_path) as ooc:
        model = torch.nn.Linear(8, 8)
        with ooc.iteration():           # the parent's allocator governor claims the process
            model(torch.ones(2, 8)).sum().backward()
        child = multiprocessing.get_context("fork").Process(
            target=_child_trains_under_its_own_outofcore, args=(str(tmp_path),))
        child.start()
        child.join(120)
    assert child.exitcode == 0
