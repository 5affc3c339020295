"""A `_foreach_*` op moves the version counters of the tensors it writes under OutOfCore
as it does without it (`aten.count_foreach_writes`): under any dispatch mode none moves,
and autograd's check of a tensor saved for backward and changed in place since, and NOTE
[Durable state] rule 17, read them."""
from __future__ import annotations

import pytest
import torch

import outcore


def _steps(ooc, iterations):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(3)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    shadow = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(16, 128)
    versions = []
    for _ in range(iterations):
        with ooc.iteration() if ooc is not None else torch.enable_grad():
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                torch._foreach_lerp_(shadow, list(model.parameters()), 0.1)
        versions.append([t._version for t in shadow])
    return versions


@pytest.mark.parametrize("budget", ["64MiB", "160KiB"])
def test_a_foreach_op_moves_versions_as_without_outcore(tmp_path, budget):
    """In the recording and in the replays after it, passive (a budget above the step's
    peak) or moving: each `_foreach_lerp_` moves each tensor's version once, as plain
    PyTorch does (before: not at all)."""
    expected = _steps(None, 5)
    with outcore.OutOfCore(budget, swap_dir=tmp_path) as ooc:
        assert _steps(ooc, 5) == expected
    assert expected[-1] == [5] * 6


def test_a_tensor_saved_for_backward_and_changed_by_a_foreach_op_is_an_error(tmp_path):
    """Autograd's check sees the change, as without outcore."""
    def step():
        x = torch.randn(4, requires_grad=True)
        w = [torch.ones(4), torch.ones(4)]
        y = (x * w[0]).sum()                    # saves w[0]
        torch._foreach_mul_(w, 2.0)
        y.backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        step()
    with outcore.OutOfCore("64MiB", swap_dir=tmp_path) as ooc:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            with ooc.iteration():
                step()
