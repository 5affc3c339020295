"""Fine-tuning with frozen weights (a frozen backbone, as under LoRA): parameters with
requires_grad=False are state like any other (`trace/recorder._classify`), so a budget
far below their size trains, bitwise equal to plain PyTorch. They were classed as
inputs, which stay resident until their first use: a budget below the frozen weights
was infeasible."""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch

import outcore

from ..trace.helpers import assert_bitwise_equal, state_of

WIDTH, DEPTH = 1024, 8          # 32 MiB of weights, the last layer's 4 MiB trained


def make():
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    for p in model[:-2].parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, opt


def step(model, opt, it):
    x = torch.randn(64, WIDTH, generator=torch.Generator().manual_seed(it))
    loss = (model(x) - x).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def test_frozen_weights_are_parameters_and_train_bitwise_far_below_their_size(tmp_path):
    plain, plain_opt = make()
    expected = [step(plain, plain_opt, it) for it in range(4)]
    model, opt = make()
    with outcore.record() as rec:
        step(model, opt, 0)
    model, opt = make()
    budget = 16 * 2**20                  # the frozen weights alone are 28 MiB
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path)) as ooc:
        losses = []
        for it in range(4):
            with ooc.iteration():
                losses.append(step(model, opt, it))
        report = ooc.report()
        trace = ooc.trace
    assert_bitwise_equal(state_of(model, opt), state_of(plain, plain_opt))
    assert all(torch.equal(a, b) for a, b in zip(losses, expected))
    weights = [a for a in trace.arrays if a.existed_before and a.nbytes == WIDTH * WIDTH * 4
               and (a.kind, a.category) == ("persistent", "parameter")]
    assert len(weights) == DEPTH, trace.arrays           # the 7 frozen ones and the last
    inputs = sum(a.nbytes for a in rec.trace.arrays if a.kind == "input")
    assert inputs == 0, inputs          # the batch is made in the step; no weight is an input
    replays = [it for it in report.iterations if it.mode == "replay"]
    assert replays and all(it.peak_resident <= budget for it in replays), report
    assert replays[-1].bytes_read >= 20 * 2**20                 # the frozen weights move


class Masked(torch.nn.Module):
    """A linear layer under a fixed mask registered as a buffer (as `torch.nn.utils.prune`
    adds them), or held as a frozen parameter."""

    def __init__(self, as_parameter):
        super().__init__()
        self.lin = torch.nn.Linear(512, 512)
        mask = (torch.rand(512, 512) > 0.5).float()
        if as_parameter:
            self.mask = torch.nn.Parameter(mask, requires_grad=False)
        else:
            self.register_buffer("mask", mask)

    def forward(self, x):
        return torch.tanh(torch.nn.functional.linear(x, self.lin.weight * self.mask,
                                                     self.lin.bias))


def _steps(model, opt, budget, tmp_path, batch, steps, before=None):
    """`steps` training steps on `batch(it)`, under an OutOfCore of `budget` (None: plain
    PyTorch), `before(it)` run ahead of each outside the block: (losses, report, trace,
    state), report and trace None without one."""
    ooc = outcore.OutOfCore(budget, swap_dir=str(tmp_path)) if budget else None
    losses = []
    with ooc or contextlib.nullcontext():
        for it in range(steps):
            if before is not None:
                before(it)
            x = batch(it)
            with ooc.iteration() if ooc else contextlib.nullcontext():
                loss = model(x).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
            losses.append(loss.detach())
        report, trace = (ooc.report(), ooc.trace) if ooc else (None, None)
    return losses, report, trace, state_of(model, opt)


def _seeded(rows, width):
    return lambda it: torch.randn(rows, width, generator=torch.Generator().manual_seed(it))


def test_module_buffers_only_read_are_state_and_move_as_frozen_parameters(tmp_path):
    """helper-122: masks registered as buffers that the step only reads were inputs,
    resident from the step's start to their first use: eight 1 MiB masks made a budget
    of 6 MiB unplannable (every step ran op by op), where the same masks as frozen
    parameters replayed a plan. A buffer of a module the step calls is state now
    (`trace/recorder._classify`): both replay within the budget, the masks move, and
    both train bitwise as plain PyTorch."""
    def train(as_parameter, budget):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[Masked(as_parameter) for _ in range(8)])
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.randn(64, 512)
        ooc = outcore.OutOfCore(budget, swap_dir=str(tmp_path)) if budget else None
        with ooc or contextlib.nullcontext():
            for _ in range(4):
                with ooc.iteration() if ooc else contextlib.nullcontext():
                    model(x).square().mean().backward()
                    opt.step()
                    opt.zero_grad()
            report, trace = (ooc.report(), ooc.trace) if ooc else (None, None)
        return report, trace, state_of(model, opt)

    _, _, plain = train(False, None)
    budget = 6 * 2**20
    for as_parameter in (False, True):
        report, trace, state = train(as_parameter, budget)
        assert_bitwise_equal(state, plain)
        assert [it.mode for it in report.iterations][-1] == "replay", report
        assert all(it.peak_resident <= budget for it in report.iterations
                   if it.mode == "replay"), report
        assert report.iterations[-1].bytes_read >= 4 * 2**20, report   # masks move
        large = collections.Counter((a.kind, a.category) for a in trace.arrays
                                    if a.nbytes == 2**20 and a.existed_before)
        masks = ("persistent", "parameter" if as_parameter else "buffer")
        assert large == collections.Counter([("persistent", "parameter")] * 8 + [masks] * 8)
        assert not [a for a in trace.arrays if a.kind == "input" and a.nbytes >= 2**20]


class _Positional(torch.nn.Module):
    """A table registered as a buffer on a child that is never called: the parent slices
    it (the tutorial transformer's positional encoding, read through `self.pe[:n]`)."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Module()
        self.table.register_buffer("pe", torch.randn(4096, 256))    # 4 MiB
        self.lin = torch.nn.Linear(256, 256)

    def forward(self, x):
        return self.lin(x + self.table.pe[: x.shape[0]])


@pytest.mark.parametrize("old_held", [False, True])
def test_a_buffer_read_through_its_parent_is_state_and_a_buffer_replaced_is_read_anew(
        tmp_path, old_held):
    """The parent reads a child's buffer without calling the child: it is state too
    (`Recording._note_module` takes a module's submodules' buffers). Between steps the
    user replaces the buffer by a new tensor (`module.pe = new`, as a cache rebuilt for a
    longer sequence): the steps after it read the new one, bitwise as plain PyTorch, and
    it stays state, also where the old one is still held elsewhere (DDP keeps a list of
    the module's buffers; helper-128: it became an input, resident for good)."""
    held = []
    def train(budget):
        torch.manual_seed(0)
        model = _Positional()

        def replace(it):
            if it == 3:
                if old_held:
                    held.append(model.table.pe)
                model.table.pe = torch.randn(4096, 256,
                                             generator=torch.Generator().manual_seed(3))
        return _steps(model, torch.optim.Adam(model.parameters(), lr=1e-3), budget,
                      tmp_path, _seeded(2048, 256), 6, before=replace)

    plain_losses, _, _, plain = train(None)
    budget = 10 * 2**20                     # the step's peak is 12.75 MiB
    losses, report, trace, state = train(budget)
    replays = [it for it in report.iterations if it.mode == "replay"]
    assert len(replays) >= 3 and all(it.peak_resident <= budget for it in replays), report
    assert report.iterations[-1].bytes_read >= 4 * 2**20, report    # the table is read back
    assert report.iterations[-1].mode == "replay" and report.deviations <= 1, report
    assert_bitwise_equal(state, plain)
    assert all(torch.equal(a, b) for a, b in zip(losses, plain_losses))
    table = [a for a in trace.arrays if a.nbytes == 4 * 2**20]
    assert [(a.kind, a.category) for a in table] == [("persistent", "buffer")], trace.arrays
    batch = [a for a in trace.arrays if a.nbytes == 2048 * 256 * 4 and a.existed_before]
    assert [(a.kind, a.category) for a in batch] == [("input", "input")], trace.arrays


class _TwoTables(torch.nn.Module):
    """Reads one of two registered tables, in turn, step by step (helper-127)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(6)])
        self.register_buffer("even", torch.randn(512, 512))
        self.register_buffer("odd", torch.randn(512, 512))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x + (self.even if self.calls % 2 else self.odd))


def test_buffers_taking_turns_become_inputs_and_every_step_replays(tmp_path):
    """A buffer the step only reads, where the next step reads another tensor that is
    still alive (two tables in turn; a batch put in a buffer, the last one kept), takes
    turns: as state every other step left its plan and re-ran op by op (helper-127).
    The second replay that finds another one there marks it (`Replayer._note_replaced`;
    the first may be a buffer replaced once, below) and the next recording takes it for
    an input: from then on every step replays, bitwise."""
    def train(budget):
        torch.manual_seed(0)
        model = _TwoTables()
        return _steps(model, torch.optim.SGD(model.parameters(), lr=0.01), budget, tmp_path,
                      _seeded(512, 512), 10)

    plain_losses, _, _, plain = train(None)
    budget = 5 * 2**20
    losses, report, _, state = train(budget)
    assert_bitwise_equal(state, plain)
    assert all(torch.equal(a, b) for a, b in zip(losses, plain_losses))
    modes = [it.mode for it in report.iterations]
    assert modes[5:] == ["replay"] * 5 and report.deviations <= 2, modes
    assert all(it.peak_resident <= budget for it in report.iterations
               if it.mode == "replay"), report


def test_numpy_arrays_of_buffers_kept_across_steps_hold_the_budget(tmp_path):
    """`.numpy()` of every mask taken after the first step and kept: the masks cannot
    move while those arrays live. The replay after it read in what its plan starts with
    beside them before finding that out, and passed the budget (helper-127: 15.0 MiB
    under 12, as with frozen parameters); now it leaves its plan before reading any,
    and every step holds the budget, bitwise."""
    def train(budget):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[Masked(False) for _ in range(8)])
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        ooc = outcore.OutOfCore(budget, swap_dir=str(tmp_path)) if budget else None
        views = []
        with ooc or contextlib.nullcontext():
            for it in range(5):
                x = torch.randn(64, 512, generator=torch.Generator().manual_seed(it))
                with ooc.iteration() if ooc else contextlib.nullcontext():
                    model(x).square().mean().backward()
                    opt.step()
                    opt.zero_grad()
                if it == 0:
                    views = [m.mask.numpy() for m in model]
            report = ooc.report() if ooc else None
        assert all((v == m.mask.numpy()).all() for v, m in zip(views, model))
        return report, state_of(model, opt)

    _, plain = train(None)
    budget = 12 * 2**20
    report, state = train(budget)
    assert_bitwise_equal(state, plain)
    peaks = [it.peak_resident for it in report.iterations]
    assert max(peaks) <= budget, peaks
    assert [it.mode for it in report.iterations][-1] == "replay", report


def test_a_buffer_replaced_once_with_two_plans_and_the_old_one_held_settles(tmp_path):
    """Gradient accumulation over 2 steps (two plans), masks replaced once at step 7 with
    the old ones still held (as DDP holds them): the plan a step began with found
    another mask where it had one, took up the other plan (rule 9), which held the old
    one too, and left it; the first plan was never dropped and every other step left
    it, for good (helper-129). Each plan that finds state replaced is dropped now, its
    next step recorded: the loop settles, the masks stay state, bitwise."""
    def train(budget):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[Masked(False) for _ in range(8)])
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        held = []
        ooc = outcore.OutOfCore(budget, swap_dir=str(tmp_path)) if budget else None
        with ooc or contextlib.nullcontext():
            for it in range(24):
                if it == 7:
                    for m in model:
                        held.append(m.mask)
                        m.mask = m.mask.clone()
                x = torch.randn(64, 512, generator=torch.Generator().manual_seed(it))
                with ooc.iteration() if ooc else contextlib.nullcontext():
                    model(x).square().mean().backward()
                    if it % 2 == 1:
                        opt.step()
                        opt.zero_grad()
            report, trace = (ooc.report(), ooc.trace) if ooc else (None, None)
        return report, trace, state_of(model, opt)

    _, _, plain = train(None)
    budget = 6 * 2**20
    report, trace, state = train(budget)
    assert_bitwise_equal(state, plain)
    modes = [it.mode for it in report.iterations]
    assert modes[-10:] == ["replay"] * 10, modes
    assert not any(it.deviation for it in report.iterations[-10:]), modes
    assert all(it.peak_resident <= budget for it in report.iterations), report
    masks = {(a.kind, a.category) for a in trace.arrays
             if a.nbytes == 2**20 and a.existed_before and a.category != "parameter"
             and a.category != "gradient"}
    assert masks == {("persistent", "buffer")}, masks


def test_tasks_with_heads_of_their_own_picked_at_random_are_not_taken_for_replacements(
        tmp_path):
    """A shared backbone and two heads of different sizes, the task picked at random: a
    step of task b, replaying task a's only plan, reads b's head where the plan had a's,
    which still lives. That is another kind of step, not state the user replaced: a
    first version of the stale-plan rule dropped a's plan each time (helper-131: 9
    recordings in 30 steps against 3 before it, settling at step 17 instead of 6)."""
    import random

    def train(budget):
        torch.manual_seed(0)
        backbone = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Tanh(),
                                       torch.nn.Linear(512, 512), torch.nn.Tanh())
        heads = {"a": torch.nn.Linear(512, 384), "b": torch.nn.Linear(512, 640)}
        params = [*backbone.parameters(), *heads["a"].parameters(), *heads["b"].parameters()]
        opt = torch.optim.Adam(params, lr=1e-3)
        coin = random.Random(1)
        ooc = outcore.OutOfCore(budget, swap_dir=str(tmp_path)) if budget else None
        with ooc or contextlib.nullcontext():
            for it in range(30):
                x = torch.randn(64, 256, generator=torch.Generator().manual_seed(it))
                with ooc.iteration() if ooc else contextlib.nullcontext():
                    heads[coin.choice("ab")](backbone(x)).square().mean().backward()
                    opt.step()
                    opt.zero_grad()
            report = ooc.report() if ooc else None
        return report, [p.detach().clone() for p in params]

    _, plain = train(None)
    budget = 10_066_658                     # 0.6 of the in-core peak
    report, trained = train(budget)
    assert all(torch.equal(a, b) for a, b in zip(plain, trained))
    modes = [it.mode for it in report.iterations]
    assert modes.count("record") <= 4, modes
    assert "record" not in modes[10:], modes


def test_two_buffers_that_swap_roles_every_step_settle(tmp_path):
    """Double buffering: two buffers the step only reads, both each step, their roles
    swapped after it (`a, b = b, a`). Each takes turns with the other: inputs from the
    next recording on, and every later step replays (helper-127's rule). The mend for
    stochastic depth excused every read of state the plan binds elsewhere, buffers too,
    and this loop recorded again every other step, for ever (helper-174)."""
    class PingPong(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
            self.register_buffer("a", torch.randn(256, 256))
            self.register_buffer("b", torch.randn(256, 256))

        def forward(self, x):
            y = self.net((x + self.a) * self.b)
            self.a, self.b = self.b, self.a
            return y

    def train(ooc=None):
        torch.manual_seed(0)
        model = PingPong()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for it in range(14):
            x = torch.randn(256, 256, generator=torch.Generator().manual_seed(it))
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
        return model
    plain = train()
    with outcore.OutOfCore(1_300_000, swap_dir=str(tmp_path)) as ooc:
        ours = train(ooc)
        report = ooc.report()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 ours.state_dict().values()))
    assert all(it.mode == "replay" and it.deviation is None
               for it in report.iterations[-4:]), report
