"""Ops on scalars that change from step to step (NOTE [Small ops off the record] in
run/plans.py): logging, deep copies of metrics, `.item()`, counters, a loss divided once
more for a printout. Whatever of them a step runs, where it runs them, and whatever the
recorded step ran, every iteration after the recordings replays its plan to the end,
bitwise equal to plain PyTorch, under the budget. An op off the record that makes a large
storage still leaves the plan, and the budget holds."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import outcore

BUDGET = 1536 * 2**10        # parameters 2 MiB, Adam's moments 4 MiB: most of it moves
STEPS = 7
WHERE = ("before", "after forward", "after backward", "after step")
SMALL_OPS = ("log", "deepcopy", "item", "scalar", "count", "divide", "per-class")


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def small_op(kind, it, loss, book):
    """One op (or a few) on tensors of at most a few bytes, as loggers and loops run."""
    if kind == "log":
        book.setdefault("loss", []).append(loss.detach().clone())
    elif kind == "deepcopy":
        book["copies"] = copy.deepcopy({k: v[-1] for k, v in book.items() if isinstance(v, list)})
    elif kind == "item":
        book["items"] = book.get("items", 0.0) + loss.item()
    elif kind == "scalar":
        book["scalar"] = torch.tensor(float(it)) * 2
    elif kind == "count":
        book.setdefault("count", torch.zeros((), dtype=torch.int64)).add_(1)
    elif kind == "divide":
        book["divided"] = loss.detach() / 3
    elif kind == "per-class":               # a metric's counts per class: 80 bytes
        book.setdefault("per_class", torch.zeros(10, dtype=torch.int64)).add_(
            torch.bincount(torch.tensor([it % 10]), minlength=10))


def step(model, opt, it, ops, book):
    """A training step that runs `ops` ([(where, kind)]) at their places."""
    def at(where, loss=None):
        for w, kind in ops:
            if w == where:
                small_op(kind, it, loss if loss is not None else torch.ones(()), book)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(it))
    at("before")
    x = x / 4                   # a large op of the name of a small one ("divide")
    loss = model(x).square().mean()
    at("after forward", loss)
    (loss / 2).backward()
    at("after backward", loss)
    opt.step()
    opt.zero_grad()
    at("after step", loss)


def train(schedule, ooc=None):
    model, opt = make()
    book: dict = {}
    for it, ops in enumerate(schedule):
        with ooc.iteration() if ooc is not None else contextlib.nullcontext():
            step(model, opt, it, ops, book)
    return model, book


def same_book(a, b) -> bool:
    def flat(book):
        out = []
        for v in book.values():
            for x in (v if isinstance(v, list) else v.values() if isinstance(v, dict) else [v]):
                out.append(x)
        return out
    return all((torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y)
               for x, y in zip(flat(a), flat(b), strict=True))


def replays_clean(schedule, budget, tmp_path):
    plain, plain_book = train(schedule)
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path)) as ooc:
        ours, book = train(schedule, ooc)
        report = ooc.report()
    for a, b in zip(plain.parameters(), ours.parameters()):
        assert torch.equal(a, b)
    assert same_book(plain_book, book)
    later = report.iterations[2:]          # Adam makes its state in the first step
    assert [it.mode for it in later] == ["replay"] * len(later), str(report)
    assert [it.deviation for it in later] == [None] * len(later), str(report)
    assert all(it.peak_resident <= budget for it in report.iterations), str(report)
    return report


ops_of_a_step = st.lists(st.tuples(st.sampled_from(WHERE), st.sampled_from(SMALL_OPS)),
                         max_size=4)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schedule=st.lists(ops_of_a_step, min_size=STEPS, max_size=STEPS))
def test_small_ops_that_change_from_step_to_step_leave_the_plan_alone(schedule, tmp_path):
    report = replays_clean(schedule, BUDGET, tmp_path)
    assert report.in_core_peak > 2 * BUDGET and report.iterations[-1].bytes_read > 0


def test_what_loggers_do_on_every_other_step_replays(tmp_path):
    """The shape of a Lightning fit with ModelCheckpoint(every_n_train_steps=2) and
    self.log: the record has the deep copy, the step after it has not, and so on; a
    running sum divided for a printout now and then; counts per class now and then."""
    schedule = [[("after forward", "log"), ("after backward", "deepcopy")] if it % 2 == 0
                else [("after forward", "log"), ("after forward", "divide")] if it % 3 == 0
                else [("after forward", "log"), ("after backward", "per-class")] if it % 4 == 1
                else [("after forward", "log")] for it in range(9)]
    replays_clean(schedule, BUDGET, tmp_path)


@pytest.mark.parametrize("budget", [BUDGET, 64 * 2**20], ids=["moving", "passive"])
def test_a_small_op_of_the_name_of_the_next_large_one(budget, tmp_path):
    """A small `div` that comes and goes right before the batch's `div`: a step without
    it matches the batch's against the next function of its name that is not small; it
    deviated every other step, recorded again in between (helper-56)."""
    schedule = [[("before", "divide")] if it % 2 else [] for it in range(9)]
    replays_clean(schedule, budget, tmp_path)


def test_a_plan_that_moves_nothing_follows_past_small_ops_too(tmp_path):
    """A budget above the peak: the replay only follows the op names (passive)."""
    schedule = [[("after forward", "item"), ("after step", "count")], [("after step", "per-class")],
                [("before", "scalar")], [("after backward", "divide")], [], [("after forward", "log")]]
    replays_clean(schedule, 64 * 2**20, tmp_path)


@pytest.mark.parametrize("large", ["factory", "pointwise", "data-dependent"])
def test_an_op_off_the_record_that_makes_a_large_storage_leaves_the_plan(large, tmp_path):
    """A factory reads no tensor, but its meta kernel says what it makes: it leaves the
    plan before it runs, its room made first, and the budget holds. One whose meta
    kernel cannot say (an output sized by the data) leaves it after it ran (rule 5): the
    budget is passed by at most what it made, and counted from there. A pointwise op on
    small tensors is sized by its elements and their width (an outer product of two
    complex vectors of 512 bytes makes 16 KiB: counted at a byte an element, it ran as a
    small op; helper-58)."""
    made = {"pointwise": 16384}.get(large, 400_000)
    vector = torch.randn(32, dtype=torch.complex128)
    plain, plain_book = train([[]] * 6)
    with outcore.OutOfCore(BUDGET, swap_dir=str(tmp_path)) as ooc:
        model, opt = make()
        kept = []
        for it in range(6):
            with ooc.iteration():
                x = torch.randn(64, 256, generator=torch.Generator().manual_seed(it)) / 4
                loss = model(x).square().mean()
                if it == 4 and large == "factory":
                    kept.append(torch.full((made // 4,), 1.0))
                elif it == 4 and large == "pointwise":
                    kept.append(vector[:, None] * vector[None, :])
                elif it == 4:
                    kept.append(torch.repeat_interleave(torch.tensor([made // 8])))
                else:          # the record's small ops there: a `full` like the large one
                    kept.append((loss.detach() * 2, torch.full((), 3.0)))
                (loss / 2).backward()
                opt.step()
                opt.zero_grad()
        report = ooc.report()
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert kept[4].untyped_storage().nbytes() == made
    assert torch.equal(kept[4], torch.ones(made // 4) if large == "factory"
                       else torch.outer(vector, vector) if large == "pointwise"
                       else torch.zeros(made // 8, dtype=torch.int64))
    deviated = [(it.index, it.deviation) for it in report.iterations if it.deviation]
    assert [i for i, _ in deviated] == [5], str(report)
    if large != "data-dependent":
        op = {"factory": "aten.full.default", "pointwise": "aten.mul.Tensor"}[large]
        assert f"the step ran {op}" in deviated[0][1], deviated
        assert "the record does not have there" not in deviated[0][1], deviated   # before
        assert all(it.peak_resident <= BUDGET for it in report.iterations), str(report)
    else:
        assert "which the record does not have there, and it made [400000] bytes" in deviated[0][1]
        assert all(it.peak_resident <= BUDGET + made for it in report.iterations), str(report)


class _Convs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(c, 16, 3, padding=1) for c in (3, 16, 16))
        self.norms = torch.nn.ModuleList(torch.nn.BatchNorm2d(16) for _ in range(3))
        self.head = torch.nn.Linear(16 * 16 * 16, 10)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = torch.relu_(norm(conv(x)))
        return self.head(x.flatten(1))


RECOMPUTE_BUDGET = 640 * 2**10


def _convs_twins(act, steps, tmp_path, hooks=(), **options):
    """`_Convs` with SGD on one batch for `steps` iterations, plain and under
    OutOfCore(RECOMPUTE_BUDGET, recompute=True, **options), where the plan recomputes
    convolutions' outputs. `act(model, it, where)` runs in forward hooks of the
    submodules named in `hooks` (`where`: the name) and after forward ("after
    forward"); what it returns, if anything, is kept. Both runs end bitwise equal, what
    `act` returned too, and no iteration passes the budget. Returns the report."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)

    def train(ooc=None):
        model, kept, now = _Convs(), [], [0]
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

        def call(where):
            out = act(model, now[0], where)
            if out is not None:
                kept.append(out)
        for name in hooks:
            model.get_submodule(name).register_forward_hook(lambda *_, name=name: call(name))
        for it in range(steps):
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                now[0] = it
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                call("after forward")
                loss.backward()
                opt.step()
        return model, kept
    plain = train()
    with outcore.OutOfCore(RECOMPUTE_BUDGET, swap_dir=str(tmp_path), recompute=True,
                           **options) as ooc:
        ours = train(ooc)
        report = ooc.report()
    assert report.planned_recomputed > 0, str(report)
    for a, b in zip(plain[0].state_dict().values(), ours[0].state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(plain[1], ours[1], strict=True))
    assert all(it.peak_resident <= RECOMPUTE_BUDGET for it in report.iterations), str(report)
    return report


def _scale_bias(model, via, index=0) -> None:
    """A small write: a conv's bias (16 floats) halved, by an op or through `.data`."""
    if via == ".data":
        model.convs[index].bias.data.mul_(0.5)
    else:
        with torch.no_grad():
            model.convs[index].bias.mul_(0.5)


@pytest.mark.parametrize("min_move_bytes", [None, 0])
@pytest.mark.parametrize("via", ["op", ".data"])
@pytest.mark.parametrize("place", ["after forward", "convs.0"])
def test_a_small_write_off_the_record_in_a_plan_that_recomputes_spares_the_remakes(
        place, via, min_move_bytes, tmp_path):
    """Rule 8: the first conv's bias (16 floats, 64 bytes), an input of its output's
    remake, changed in place on some steps, where the plan recomputes that output: after
    forward (the output is discarded already) or in a hook of that conv (its call is
    kept, the output not discarded yet), by an op or through `.data` (no version bump).
    The remake runs on a copy of the bias taken before the write: the step keeps its
    plan, recomputes what it always does, bitwise equal to plain PyTorch, under the
    budget. (Before, each such step left the plan and dropped it: recorded, then
    deviated, in turn for ever, and the deviation remade every held array at once, 333
    KiB over the budget. A first version of this rule, which remade early and wrote out
    instead, let a `.data` write through into a remake: helper-59. The second copied
    the bias while the plan had it on the disk, min_move_bytes=0: a segmentation fault,
    helper-62.)"""
    def act(model, it, where):
        if where == place and it >= 4 and it % 2 == 0:
            _scale_bias(model, via)
    extra = {} if min_move_bytes is None else {"min_move_bytes": min_move_bytes}
    report = _convs_twins(act, 10, tmp_path, hooks=("convs.0",), **extra)
    assert [it.mode for it in report.iterations].count("record") == 2, str(report)
    assert not any(it.deviation for it in report.iterations), str(report)
    steady = report.iterations[2:]
    assert len({it.bytes_recomputed for it in steady}) == 1, str(report)
    if min_move_bytes is None:      # at 0 the plan has the bias on the disk: read back
        assert not any(it.unplanned_bytes for it in steady), str(report)


@pytest.mark.parametrize("what", ["norm weight", "conv weight", "conv bias"])
@pytest.mark.parametrize("place", ["after forward", "convs.2"])
def test_a_parameter_given_new_data_mid_step_leaves_the_remakes_on_the_old(
        place, what, tmp_path):
    """`param.data = other` between forward and backward (weight noise, a clamp written
    as an assignment) points the parameter at another storage without a version bump.
    Plain PyTorch's backward still reads what forward computed from the old values; a
    remake must too: the kept calls hold their arguments by aliases of the storages the
    op read (NOTE 1 of [Replaying a recompute]). (Before, the norm's remake read the
    new weight: silently wrong parameters after the step.)"""
    def act(model, it, where):
        if where != place or it % 2:
            return
        with torch.no_grad():
            if what == "norm weight":
                model.norms[0].weight.data = model.norms[0].weight.data * 2
            elif what == "conv weight":
                model.convs[1].weight.data = model.convs[1].weight.data * 0.5
            else:
                model.convs[0].bias.data = model.convs[0].bias.data + 0.1
    _convs_twins(act, 8, tmp_path, hooks=("convs.2",))


RECOMPUTE_WRITES = ("conv bias", "running mean", "counter")
RECOMPUTE_WHERE = ("first conv's hook", "second norm's hook", "after forward", "after backward")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schedule=st.lists(st.lists(st.tuples(st.sampled_from(RECOMPUTE_WHERE),
                                            st.sampled_from(RECOMPUTE_WRITES)).filter(
    lambda w: w != ("after forward", "running mean")), max_size=2), min_size=7, max_size=7))
def test_small_writes_anywhere_keep_a_plan_that_recomputes(schedule, tmp_path):
    """Rule 8 as a property: small in-place writes off the record (a conv's bias and a
    norm's running mean, both arguments of recomputed arrays' producers, and a counter) at random places and
    steps, in a plan that recomputes. (The last norm's running mean is written only
    before that norm runs or after backward: autograd saves it, and plain PyTorch raises.) Every iteration after the two recordings replays
    its plan to the end, bitwise equal to plain PyTorch, under the budget."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    budget = 640 * 2**10

    def train(ooc=None):
        model = _Convs()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        counter, now = torch.zeros((), dtype=torch.int64), []

        def write(where):
            with torch.no_grad():
                for w, what in now:
                    if w != where:
                        continue
                    if what == "conv bias":
                        model.convs[0].bias.mul_(0.5)
                    elif what == "running mean":
                        model.norms[2].running_mean.mul_(0.5)
                    else:
                        counter.add_(1)
        model.convs[0].register_forward_hook(lambda *_: write(RECOMPUTE_WHERE[0]))
        model.norms[1].register_forward_hook(lambda *_: write(RECOMPUTE_WHERE[1]))
        for ops in schedule:
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                now[:] = ops
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                write("after forward")
                loss.backward()
                write("after backward")
                opt.step()
        return model, counter
    plain = train()
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path), recompute=True) as ooc:
        ours = train(ooc)
        report = ooc.report()
    assert report.planned_recomputed > 0, str(report)
    for a, b in zip(plain[0].state_dict().values(), ours[0].state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(plain[1], ours[1])
    later = report.iterations[2:]
    assert [it.mode for it in later] == ["replay"] * len(later), str(report)
    assert [it.deviation for it in later] == [None] * len(later), str(report)
    assert all(it.peak_resident <= budget for it in report.iterations), str(report)


def test_leaving_a_plan_that_recomputes_remakes_within_the_budget(tmp_path):
    """NOTE [Replaying a recompute] rule 4: a step that leaves its plan after forward
    remakes every array the plan held discarded before the op that left it runs. The
    plan had room for one at a time, before its use; each remake makes its room first
    (the least recently used written out). Before, they came back all at once: 973 KiB
    of managed tensors under a budget of 640 KiB."""
    def act(model, it, where):
        if where == "after forward" and it == 4:    # 1.7 KiB read: not small, leaves
            return model.convs[0].weight.detach().square().sum()
    report = _convs_twins(act, 6, tmp_path)
    assert [bool(it.deviation) for it in report.iterations] == [False] * 4 + [True, False], str(report)


def test_leaving_a_plan_of_chained_recomputes_makes_room_for_the_whole_chain(
        monkeypatch, tmp_path):
    """Chains (a batch norm recomputed from a convolution's output that is recomputed
    too, three deep): a small write off the record, then an op that leaves the plan, in
    the last norm's hook. Each remake brings back the discarded arrays its inputs are
    remade from; its room counts them all, not only its direct inputs (helper-59: 100
    KiB over the budget)."""
    from outcore.plan import recompute as planner
    real = planner.candidates
    monkeypatch.setattr(planner, "candidates", lambda *a, **k: real(*a, **{**k, "chains": True}))

    def act(model, it, where):
        if where == "norms.2" and it == 4:
            _scale_bias(model, "op", 1)
            return model.convs[0].weight.detach().square().sum()
    report = _convs_twins(act, 6, tmp_path, hooks=("norms.2",), min_move_bytes=0)
    assert report.iterations[4].deviation, str(report)


@pytest.mark.parametrize("via", ["op", ".data"])
def test_a_small_write_beside_temporaries_keeps_their_remakes_right(via, monkeypatch, tmp_path):
    """NOTE 5's temporaries (the same storage discarded and remade more than once) with
    the first conv's bias written in that conv's hook: every kept call runs again on
    the copy of the bias taken before the write. Before, an ordinary write sent each
    discard to the disk, 362 KiB over the budget, and a write through `.data` gave
    other parameters than plain PyTorch, silently (helper-59)."""
    import dataclasses
    from outcore.plan import recompute as planner
    real = planner.candidates
    monkeypatch.setattr(planner, "candidates", lambda *a, **k: [
        dataclasses.replace(c, temporary=True) for c in real(*a, **{**k, "chains": True})])

    def act(model, it, where):
        if where == "convs.0" and it == 4:
            _scale_bias(model, via)
    report = _convs_twins(act, 6, tmp_path, hooks=("convs.0",), min_move_bytes=0)
    assert not any(it.deviation for it in report.iterations), str(report)


def test_a_plan_that_recomputes_binds_no_small_array_anew(tmp_path):
    """Rule 7 is for arrays that never move, in plans that do not recompute. With
    min_move_bytes=0 a 1 KiB convolution output is recomputed; a logging `mul` of a
    user's 1 KiB tensor, run just before the record's `mul` of that output, was bound in
    its place, and the plan's discard of the output took the user's tensor's bytes: the
    remake wrote the convolution's output into it, silently (helper-58)."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)          # out 2x8x4x4: 1 KiB
            self.scale = torch.nn.Parameter(torch.tensor(1.5))
            self.head = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(),
                                            torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                            torch.nn.Linear(256, 10))

        def forward(self, x, log=None):
            y = self.conv(x)
            if log is not None:
                log()
            return self.head((y * self.scale).flatten(1))

    def train(ooc=None):
        net = Net()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        ema, decay, logged = torch.zeros(2, 8, 4, 4), torch.tensor(0.9), []
        for it in range(8):
            g = torch.Generator().manual_seed(it)
            x, t = torch.randn(2, 3, 4, 4, generator=g), torch.randint(0, 10, (2,), generator=g)
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                out = net(x, (lambda: logged.append(ema * decay)) if it >= 3 else None)
                torch.nn.functional.cross_entropy(out, t).backward()
                opt.step()
                opt.zero_grad()
                with torch.no_grad():
                    ema.add_(torch.ones(()))
        return net, ema, logged
    plain = train()
    with outcore.OutOfCore(600_000, swap_dir=str(tmp_path), recompute=True,
                           min_move_bytes=0) as ooc:
        ours = train(ooc)
        report = ooc.report()
    assert report.planned_recomputed > 0, str(report)
    assert torch.equal(plain[1], ours[1])
    assert all(torch.equal(a, b) for a, b in zip(plain[2], ours[2], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain[0].parameters(), ours[0].parameters()))


@pytest.mark.parametrize("foreach", ["adam", "clip"])
def test_a_foreach_op_whose_first_tensor_is_small_is_followed(foreach, tmp_path):
    """Passive mode (a budget above the peak) follows a `_foreach_*` op by its per-tensor
    parts; with a first parameter of 864 bytes (a convolution stem) the op was judged by
    its whole and walked past its own first parts: one deviation, and every iteration
    tracked from then on (helper-58)."""
    def train(ooc=None):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 256),
                                  torch.nn.ReLU(), torch.nn.Linear(256, 10))
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, foreach=foreach == "adam")
        for it in range(6):
            g = torch.Generator().manual_seed(it)
            x, y = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                torch.nn.functional.cross_entropy(net(x), y).backward()
                if foreach == "clip":
                    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True)
                opt.step()
                opt.zero_grad()
        return net
    plain = train()
    with outcore.OutOfCore(256 * 2**20, swap_dir=str(tmp_path)) as ooc:
        ours = train(ooc)
        report = ooc.report()
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), ours.parameters()))
    later = report.iterations[2:]
    assert [it.deviation for it in later] == [None] * len(later), str(report)
    assert not any(it.tracked for it in later[1:]), str(report)


def test_a_small_nonzero_beside_a_large_one_of_its_signature_replays(tmp_path):
    """helper-156, mixture-of-experts routing: a rarely chosen expert's `nonzero` makes
    under 1 KiB, another expert's of a mask of the same shape makes more. What an op
    made is remembered per signature to make room on demand, and the replay judged the
    small one by it ("may make more"), so a step of that shape left its plan at every
    replay and was recorded again: RDRDRD... for good. It is judged by its own call now
    (its meta kernel cannot tell: the data decides, rule 5), and the plan settles."""
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.ReLU(),
                                    torch.nn.Linear(1024, 64))
        return model, torch.optim.SGD(model.parameters(), lr=0.01)

    def step(model, opt, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(256, 64, generator=g)
        common = torch.rand(256, 2, generator=g) < (0.4 if i < 3 else 0.3)    # ~3 KiB
        rare = torch.zeros(256, 2, dtype=torch.bool)                          # 128 B
        rare[torch.randint(0, 256, (8,), generator=g), 0] = True
        loss = 0
        for mask in (common, rare):
            tokens, _ = mask.nonzero(as_tuple=True)
            loss = loss + model(x[tokens]).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    plain, ours = make(), make()
    with outcore.OutOfCore("3MiB", swap_dir=str(tmp_path), min_move_bytes=0) as ooc:
        for i in range(12):
            step(*plain, i)
            with ooc.iteration():
                step(*ours, i)
        modes = [(it.mode, bool(it.deviation)) for it in ooc.report().iterations]
    assert all(mode == ("replay", False) for mode in modes[4:]), modes
    assert all(torch.equal(a, b) for a, b in zip(plain[0].parameters(), ours[0].parameters()))


def test_a_data_sized_op_off_the_record_makes_room_for_what_its_signature_made(tmp_path):
    """helper-158: judged by its own call everywhere (the first mend for the MoE case
    above), a `repeat_interleave` of a 1 KiB tensor that the record lacks at that point
    ran beside the plan and passed the budget by 1 MiB of the 4 MiB it made; earlier
    calls of its signature made that much, so it leaves the plan before it runs, its
    room made."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(6)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    counts = torch.full((128,), 4096, dtype=torch.int64)        # 1 KiB; makes 4 MiB
    budget = 6 * 2**20

    def step(i):
        x = torch.randn(512, 512, generator=torch.Generator().manual_seed(i))
        if i >= 4 and i % 2 == 0:
            x = x + torch.repeat_interleave(counts)[:1].float()     # off the record
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        return torch.repeat_interleave(counts).sum()                # always, at the end
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path), min_move_bytes=0) as ooc:
        for i in range(8):
            with ooc.iteration():
                step(i)
        iterations = ooc.report().iterations
    # The first call of all passes it by what it made: no meta kernel can tell (README).
    assert all(it.peak_resident <= budget for it in iterations[1:]), [
        (it.mode, it.peak_resident - budget) for it in iterations]
    assert iterations[4].deviation and "repeat_interleave" in iterations[4].deviation


def test_small_functions_passed_make_room_for_strangers_first(tmp_path):
    """helper-157, greedy decoding one token per iteration under no_grad: the last
    logits (a view the user keeps) live into the next iteration beside the plan, and the
    step leaves its plan at the embedding (its ids one token longer). The small
    functions passed before it ran their restores without making room for such
    strangers, as a function's own actions do: every such iteration passed the budget,
    by up to 2.5 MiB at 12 MiB."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=8000, n_positions=64, n_embd=256, n_layer=2,
                                     n_head=4)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 8000, (2, 32), generator=torch.Generator().manual_seed(7))
    plain_ids, budget = ids, 12 * 2**20
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path)) as ooc:
        for _ in range(4):
            with torch.no_grad():
                plain = model(plain_ids).logits[:, -1, :]
            plain_ids = torch.cat([plain_ids, plain.argmax(-1, keepdim=True)], 1)
            with torch.no_grad(), ooc.iteration():
                last = model(ids).logits[:, -1, :]
                ids = torch.cat([ids, last.argmax(-1, keepdim=True)], 1)
            assert torch.equal(last, plain)
        iterations = ooc.report().iterations
    assert any(it.deviation for it in iterations)
    assert all(it.peak_resident <= budget for it in iterations), [
        (it.mode, it.peak_resident) for it in iterations]


def test_a_small_float_tensor_divided_by_a_0_dim_int64_counter_replays(tmp_path):
    """AveragedModel's SWA update divides each parameter's difference by its 0-dim int64
    `n_averaged + 1`: a 256-float bias makes 1 KiB, small as recorded. Judged by its widest
    input dtype (int64) it looked 2 KiB and every replay left its plan there."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 256)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    n = torch.tensor(3, dtype=torch.long)
    avg = torch.zeros(256)
    with outcore.OutOfCore("4MiB", swap_dir=str(tmp_path)) as ooc:
        for _ in range(6):
            x = torch.randn(64, 512)
            with ooc.iteration():
                lin(x).square().mean().backward(); opt.step(); opt.zero_grad()
                with torch.no_grad():
                    avg.copy_(avg + (lin.bias - avg) / (n + 1))
        report = ooc.report()
    assert report.deviations == 0 and report.recordings == 1


def test_a_bool_mask_anded_with_a_0_dim_bool_replays(tmp_path):
    """helper-106: transformers' masking code ands a 0-dim bool with a (1, 1, L, L) bool
    mask, 1 KiB at L = 32: small as recorded. Counting a small pointwise op's integer or
    bool output at the default float's width (right for a true division only) made it
    4 KiB, and Qwen2-MoE's every replay left its plan there (7 recordings in 12)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 256))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(64, 256)
    with outcore.OutOfCore("2MiB", swap_dir=str(tmp_path)) as ooc:
        for _ in range(6):
            with ooc.iteration():
                pos = torch.arange(32)
                causal = pos[None, None, None, :] <= pos[None, None, :, None]
                mask = torch.ones((), dtype=torch.bool) & causal
                h = model(x).view(64, 8, 32)
                h.masked_fill(~mask[0, 0, :8, :], 0).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        report = ooc.report()
    assert report.deviations == 0 and report.recordings <= 2, str(report)


_ATEN = torch.ops.aten
_POINTWISE = [(_ATEN.add.Tensor, 2, {}), (_ATEN.mul.Tensor, 2, {}), (_ATEN.div.Tensor, 2, {}),
              (_ATEN.div.Tensor_mode, 2, {"rounding_mode": "floor"}), (_ATEN.sigmoid.default, 1, {}),
              (_ATEN.exp.default, 1, {}), (_ATEN.eq.Tensor, 2, {}), (_ATEN.bitwise_and.Tensor, 2, {}),
              (_ATEN.maximum.default, 2, {}), (_ATEN.pow.Tensor_Tensor, 2, {}), (_ATEN.abs.default, 1, {})]
_DTYPES = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16,
           torch.float32, torch.float64]


@settings(max_examples=300, deadline=None)
@given(op=st.sampled_from(_POINTWISE),
       operands=st.lists(st.one_of(st.tuples(st.sampled_from(_DTYPES), st.booleans()),
                                   st.sampled_from([True, 2, 0.5])), min_size=2, max_size=2))
def test_a_small_pointwise_ops_output_is_sized_as_pytorch_makes_it(op, operands):
    """`replay._pointwise_width` (rule 1's size of a small pointwise op off the record) is
    the element size PyTorch's own output has, for every op, dtype, 0-dim tensor and
    Python scalar: `mask * 0.5` and `sigmoid` of an int tensor make floats, comparisons
    and ands of bools make bools, a float divided by a 0-dim int64 stays float. (Sized by
    hand-kept promotion rules before, the first two were counted at 1 and 8 bytes.)"""
    from outcore.run.replay import _pointwise_width
    func, arity, kwargs = op
    args = [torch.ones(() if item[1] else (3,), dtype=item[0]) if isinstance(item, tuple)
            else item for item in operands[:arity]]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    try:
        out = func(*args, **kwargs)
    except (RuntimeError, TypeError):
        return                                  # PyTorch refuses these operands itself
    assert _pointwise_width(func, args, kwargs, tensors) == out.element_size(), (func, args)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0, 1, 2, 3, 5]), max_size=4), max_size=4))
def test_the_broadcast_a_replay_computes_is_torchs(shapes):
    """`aten.broadcast_shape`, at every small pointwise op a replay passes (rule 1), is
    `torch.broadcast_shapes` in plain Python (torch's went through its reference
    implementation: ~14 us a call against ~2), None where torch raises."""
    from outcore.aten import broadcast_shape
    try:
        expected = tuple(torch.broadcast_shapes(*map(tuple, shapes)))
    except RuntimeError:
        expected = None
    assert broadcast_shape(map(tuple, shapes)) == expected


def test_small_ops_off_the_record_that_keep_their_outputs_stay_within_the_budget(tmp_path):
    """helper-209 (a transformers time-series model, min_move_bytes=0: AdamW's first
    step, per parameter, ran some sixty small ops at one index of a replay, 2 KiB over
    the budget): with storages that small movable, what small ops off the record make
    and keep was counted nowhere beside the plan and never written out, and room for
    the next was not made while the index stayed. Here 24 outputs of 1 KiB each, kept
    till the step's end, took every replay 24 KiB over a 64 KiB budget. Now they are
    written out where the budget needs their room, and the step is plain PyTorch's."""
    def run(ooc):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
        small = [torch.nn.Parameter(torch.randn(256)) for _ in range(24)]
        opt = torch.optim.SGD(list(model.parameters()) + small, lr=0.01)
        x = torch.randn(32, 64)
        kept_sums = []
        for i in range(5):
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                loss = model(x).square().mean() + sum(p.square().sum() for p in small) * 1e-3
                loss.backward()
                kept = [p.detach().mul(2) for p in small] if i >= 2 else []   # off the record
                opt.step()
                opt.zero_grad()
                kept_sums.append(sum(float(k.sum()) for k in kept))
        return [*model.parameters(), *small], kept_sums
    plain, plain_sums = run(None)
    budget = 64 * 2**10
    with outcore.OutOfCore(f"{budget}B", min_move_bytes=0, swap_dir=tmp_path) as ooc:
        ours, sums = run(ooc)
        report = ooc.report()
    assert [it.mode for it in report.iterations][2:] == ["replay"] * 3
    assert max(it.peak_resident for it in report.iterations) <= budget
    assert sums == plain_sums and all(torch.equal(a, b) for a, b in zip(plain, ours))


def test_a_small_models_lazy_optimizer_state_is_recorded_twice_where_small_storages_move(
        tmp_path):
    """helper-209: with min_move_bytes=0, a small model's AdamW state (its sum under 64
    KiB) was not taken for lazily made state; the second iteration replayed the first's
    plan, deviated at the optimizer and ran on demand, and a third was recorded. Where
    storages that small move, the state's sum counts from min_move_bytes (at least a
    small op's 1 KiB, so that a framework's 4-byte loss kept in step() is no state)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 48),
                                torch.nn.ReLU(), torch.nn.Linear(48, 4))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(16, 32)
    with outcore.OutOfCore("28912B", min_move_bytes=0, swap_dir=tmp_path) as ooc:
        for _ in range(4):
            with ooc.iteration():
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
        modes = [it.mode for it in ooc.report().iterations]
    assert modes == ["record", "record", "replay", "replay"], modes




def _recorded_twice_and_bitwise(build, x, tmp_path):
    """Four steps of `build()`'s (model, optimizer) on `x`, plain and under a 2 MiB
    OutOfCore: the first two recorded, the rest replayed, and the same parameters."""
    plain, ours = build(), build()
    for _ in range(4):
        plain[0](x).square().mean().backward()
        plain[1].step()
        plain[1].zero_grad()
    with outcore.OutOfCore("2MiB", swap_dir=tmp_path) as ooc:
        for _ in range(4):
            with ooc.iteration():
                ours[0](x).square().mean().backward()
                ours[1].step()
                ours[1].zero_grad()
        modes = [it.mode for it in ooc.report().iterations]
    assert modes == ["record", "record", "replay", "replay"], modes
    assert all(torch.equal(a, b) for a, b in zip(plain[0].parameters(), ours[0].parameters()))

def test_an_optimizers_small_lazy_state_is_recorded_twice(tmp_path):
    """transformers' Adafactor makes its factored moments at its first step, 8 KiB in
    all here, under the sum that counts as lazily made state: the second iteration
    replayed the first's plan, deviated at the optimizer (it expected the first step's
    `zeros`) and a third was recorded. State an optimizer keeps for a parameter that had
    none (`Recorder.made_optimizer_state`) has the next iteration recorded, whatever
    its size; and bitwise as plain PyTorch."""
    from transformers.optimization import Adafactor

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                    torch.nn.Linear(512, 256))
        return model, Adafactor(model.parameters(), lr=None, relative_step=True,
                                warmup_init=True)
    x = torch.randn(64, 256)
    _recorded_twice_and_bitwise(build, x, tmp_path)


@pytest.mark.parametrize("order", ["after", "before"])
def test_state_an_optimizer_subclass_keeps_around_its_parents_step_is_seen(tmp_path, order):
    """helper-222: an SGD subclass whose step() keeps an EMA in `self.state[p]` around
    `super().step()` runs the step hooks twice once SGD.step is hooked itself (any plain
    SGD made first): the inner step's end took the snapshot of parameters without
    state, and the state was missed (record, replay that deviated, record). The
    outermost step's end decides: record, record, replay; bitwise."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)    # hooks SGD.step

    class EmaSGD(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure=None):
            if order == "before":
                self._keep()
            super().step(closure)
            if order == "after":
                self._keep()

        def _keep(self):
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state[p]
                    if "ema" not in state:
                        state["ema"] = p.detach().clone()
                    else:
                        state["ema"].lerp_(p, 0.1)

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 32))
        return model, EmaSGD(model.parameters(), lr=0.01)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(5))
    _recorded_twice_and_bitwise(build, x, tmp_path)


def test_a_passive_replay_runs_small_ops_off_the_record_as_they_are(tmp_path):
    """helper-211: at a budget the plan moves nothing under (a passive replay, which
    makes nothing ready), small ops off the record with min_move_bytes=0 (gradients
    scaled by hand from the third step) had their outputs written out to make room, and
    the optimizer's next op read an empty storage: a segmentation fault."""
    def run(ooc, n=5):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for i in range(n):
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(i))
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                model(x).square().mean().backward()
                if i >= 2:
                    for p in model.parameters():
                        p.grad = p.grad.mul(0.5)
                opt.step()
                opt.zero_grad()
        return list(model.parameters())
    plain = run(None)
    with outcore.OutOfCore("1MiB", min_move_bytes=0, swap_dir=tmp_path) as ooc:
        run(ooc, 2)
        peak = max(it.peak_resident for it in ooc.report().iterations)
    with outcore.OutOfCore(f"{peak}B", min_move_bytes=0, swap_dir=tmp_path) as ooc:
        ours = run(ooc)
        modes = [it.mode for it in ooc.report().iterations]
    assert modes[2:] == ["replay"] * 3, modes
    assert all(torch.equal(a, b) for a, b in zip(plain, ours))
