"""A PackedSequence's `batch_sizes` is read by PyTorch in C++, by functions no dispatch
mode sees (NOTE [Read past the dispatcher] in outcore/aten.py): nn.GRU/LSTM on a
PackedSequence (`aten::gru.data`...), pad_packed_sequence, and pack_padded_sequence's
backward. Moved to the swap file, it was read as 0 bytes or after it was freed: raw
PyTorch errors ("start (8322) + length (94580716746736) exceeds dimension size", "The
tensor has a non-zero number of elements, but its data is not allocated yet"). It never
moves now, from the op that makes it, or from the first such function that reads one
made otherwise; the steps train bitwise equal to plain PyTorch within the budget."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import outcore

from ..trace.helpers import assert_bitwise_equal, state_of

B, T, E = 4, 16, 16
BUDGET = 48 * 2**10         # under half the step's in-core peak (100-120 KiB): arrays move
ITERATIONS = 3              # two recordings (SGD's momentum is made in the first), a replay


class Net(torch.nn.Module):
    def __init__(self, cell: str, how: str):
        super().__init__()
        self.how = how
        self.inp = torch.nn.Linear(E, E)
        rnn = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell]
        self.rnn = rnn(E, E, batch_first=True, bidirectional=True)
        self.out = torch.nn.Linear(2 * E, 1)

    def forward(self, x, lengths):
        p = pack_padded_sequence(self.inp(x), lengths, batch_first=True, enforce_sorted=False)
        if self.how == "pack":              # no RNN: only pack_padded_sequence's backward
            return p.data.square().mean()
        if self.how == "hand":              # batch_sizes made by another op than packing
            p = PackedSequence(p.data, p.batch_sizes.clone(), p.sorted_indices,
                               p.unsorted_indices)
        o, h = self.rnn(p)
        y, _ = pad_packed_sequence(o, batch_first=True)
        h = h[0] if isinstance(h, tuple) else h
        return self.out(y).square().mean() + h.square().mean()


def make(cell, how):
    torch.manual_seed(0)
    model = Net(cell, how)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def batches():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    return [(torch.randn(B, T, E, generator=g), lengths) for _ in range(ITERATIONS)]


def step(model, opt, x, lengths):
    loss = model(x, lengths)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


@pytest.mark.parametrize("cell,how,budget", [("gru", "pad", BUDGET), ("lstm", "hand", BUDGET),
                                             ("gru", "pack", 14 * 2**10)])
def test_packed_rnn_trains_bitwise_with_batch_sizes_pinned(tmp_path, cell, how, budget):
    data = batches()
    model, opt = make(cell, how)
    expected_losses = [step(model, opt, x, n) for x, n in data]
    expected = state_of(model, opt)
    model, opt = make(cell, how)
    with outcore.OutOfCore(f"{budget}B", min_move_bytes=0, swap_dir=str(tmp_path)) as ooc:
        losses = []
        for x, n in data:
            with ooc.iteration():
                losses.append(step(model, opt, x, n))
        report = ooc.report()
    assert_bitwise_equal(expected, state_of(model, opt))
    assert all(torch.equal(a, b) for a, b in zip(expected_losses, losses))
    modes = [it.mode for it in report.iterations]
    assert "replay" in modes, modes
    assert all(it.peak_resident <= budget for it in report.iterations), [
        it.peak_resident for it in report.iterations]
    assert sum(it.bytes_written for it in report.iterations) > 0     # the budget was tight


def test_batch_sizes_never_moves_and_the_budget_error_says_why(tmp_path):
    """Marked where pack_padded_sequence makes it, in any mode: the residency pins it,
    and InfeasibleBudget lists it with its reason."""
    from outcore import aten
    from outcore.run.on_demand import _never_moves
    from outcore.run.residency import movable
    with outcore.OutOfCore(f"{BUDGET}B", min_move_bytes=0, swap_dir=str(tmp_path)) as ooc:
        with ooc.iteration():
            p = pack_padded_sequence(torch.randn(B, T, E), torch.full((B,), T),
                                     batch_first=True)
            storage = p.batch_sizes.untyped_storage()
            assert aten.read_past(storage) and not movable(storage)
            entry = ooc._res.entry_of(storage)
            assert entry is not None and entry.pinned
            assert not aten.read_past(p.data.untyped_storage())
            assert _never_moves(ooc._res)["read"] == (1, T * 8)
