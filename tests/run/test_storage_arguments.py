"""An op that takes a storage itself, not a tensor over it (NOTE [Storage arguments] in
aten.py): `t.set_(p.untyped_storage(), offset, size, stride)` on a parameter outcore had
on the slow tier. The storage was no input anywhere (the recorder, on demand, a replay),
so nothing read it back first, and `set_` grew the 0-byte storage to fresh memory: the
parameter was garbage from there on, with no deviation and no warning."""
from __future__ import annotations

import pytest
import torch

import outcore
from outcore.states import FAST

BUDGET = 1536 * 2**10       # parameters 1.5 MiB, Adam's moments 3 MiB: most of it moves


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(6)])
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def view_of(p, how):
    """A tensor over `p`'s storage made by `set_` from the storage itself."""
    if how == "untyped, offset":
        return torch.empty(0).set_(p.untyped_storage(), p.storage_offset(), p.shape, p.stride())
    if how == "typed, offset":
        return torch.empty(0).set_(p._typed_storage(), p.storage_offset(), p.shape,
                                   p.stride())
    return torch.empty(0).set_(p.untyped_storage()).view(p.shape)      # the whole storage


def step(model, opt, it, how, leave=False):
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(it))
    if leave:           # an op the record does not have: the rest of the step runs on demand
        torch.ones(256, 256).sum()
    extra = view_of(model[0].weight, how).sum() * 1e-3
    (model(x).square().mean() + extra).backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("how", ["untyped, offset", "typed, offset", "whole"])
def test_set_from_a_storage_on_the_slow_tier_reads_it_back(tmp_path, how):
    plain, ours = make(), make()
    slow_at_start = []
    with outcore.OutOfCore(BUDGET, swap_dir=str(tmp_path)) as ooc:
        for it in range(6):
            leave = it == 4         # replays 2, 3 and 5 follow the plan; 4 leaves it first
            step(*plain, it, how, leave)
            with ooc.iteration():
                entry = ooc._res.entry_of(ours[0][0].weight.untyped_storage())
                slow_at_start.append(entry is not None and entry.state is not FAST)
                step(*ours, it, how, leave)
            for p, q in zip(plain[0].parameters(), ours[0].parameters()):
                assert torch.equal(p, q), (it, ooc.report())
        report = ooc.report()
    modes = [i.mode for i in report.iterations]
    assert modes[2:] == ["replay"] * 4, report
    assert [i.deviation is not None for i in report.iterations] == [False] * 4 + [True, False]
    assert all(i.peak_resident <= ooc.budget for i in report.iterations), report
    assert sum(slow_at_start) >= 3, slow_at_start       # the bug's case did come up


def test_set_from_a_storage_on_the_slow_tier_while_building(tmp_path):
    """`ooc.building()` runs every op on demand: a `set_` from a storage it wrote out."""
    torch.manual_seed(0)
    expected = [torch.randn(256, 256) for _ in range(8)]
    with outcore.OutOfCore("512KiB", swap_dir=str(tmp_path)) as ooc:
        with ooc.building():
            torch.manual_seed(0)
            made = [torch.randn(256, 256) for _ in range(8)]
            first = made[0]
            assert ooc._res.entry_of(first.untyped_storage()).state is not FAST
            again = torch.empty(0).set_(first.untyped_storage(), 0, first.shape, first.stride())
            total = again.sum()
        assert torch.equal(again, expected[0]) and torch.equal(total, expected[0].sum())
        assert all(torch.equal(a, b) for a, b in zip(made, expected))


def test_only_set_takes_a_storage():
    """NOTE [Storage arguments]: outcore counts the storage arguments of `STORAGE_OPS`
    only; an op of a later PyTorch that takes one must be among them."""
    from outcore.aten import STORAGE_OPS
    taking = {(s.name, s.overload_name) for s in torch._C._jit_get_all_schemas()
              if any("Storage" in str(a.type) for a in s.arguments)}
    assert taking == {(op._schema.name, op._schema.overload_name) for op in STORAGE_OPS}
    assert {name for name, _ in taking} == {"aten::set_", "aten::set"}
