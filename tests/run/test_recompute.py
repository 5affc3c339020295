"""Recompute in the executor: activations dropped after forward and made again before
backward train bitwise equal to plain PyTorch (NOTE [Replaying a recompute]).

The network has what recompute must handle or exclude: dropout (random: never
recomputed, and its input is), in-place ReLU after batch norm (repeated with it), batch
norm's running statistics (updated once), views (flatten, a channel split) of
recomputed arrays, and a chain (a batch norm reading a recomputed convolution)."""
from __future__ import annotations

import contextlib
import copy
import gc
import signal

import pytest
import torch
from torch import nn

import outcore
from outcore.errors import OutcoreError
from outcore.run import recompute as executor
from outcore.run.replay import Replayer
from outcore.run.residency import Residency
from outcore.states import DISCARDED

from ..trace.helpers import assert_bitwise_equal, state_of


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3, self.b3 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16 * 16 * 16, 10)

    def forward(self, x):
        x = torch.relu_(self.b1(self.c1(x)))
        x = self.drop(x)
        x = torch.relu_(self.b2(self.c2(x)))
        a, b = x.split(8, dim=1)                       # views of a recomputed array
        x = torch.cat([b, a], dim=1)
        x = torch.relu_(self.b3(self.c3(x)))
        return self.head(x.flatten(1))


class Work:
    def __init__(self, optimizer: str, channels_last: bool = False):
        torch.manual_seed(0)
        self.model = Net()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.optimizer = (torch.optim.Adam(self.model.parameters(), lr=1e-3) if optimizer == "adam"
                          else torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9))
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(8, 3, 16, 16, generator=g).contiguous(memory_format=fmt)
        self.model.to(memory_format=fmt)
        self.y = torch.randint(0, 10, (8,), generator=g)

    def step(self):
        self.optimizer.zero_grad()
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


BUDGET = "640KiB"       # about a third of the step's in-core peak


def train(w, ooc=None, iterations=4, seed=100):
    losses = []
    for it in range(iterations):
        torch.manual_seed(seed + it)             # dropout draws the same masks
        with ooc.iteration() if ooc is not None else contextlib.nullcontext():
            losses.append(w.step())
    return losses


@pytest.mark.parametrize("optimizer,channels_last", [("sgd", False), ("adam", False),
                                                    ("sgd", True)])
def test_recomputed_training_is_bitwise_plain(optimizer, channels_last):
    plain, managed = Work(optimizer, channels_last), Work(optimizer, channels_last)
    losses = train(plain)
    before = dict(executor.TAKES)
    with outcore.OutOfCore(BUDGET, recompute=True, min_move_bytes=0) as ooc:
        got = train(managed, ooc)
        report = ooc.report()
        ops = [f.op for f in ooc.trace.functions if f.repeats is not None]
    assert report.recomputed_arrays >= 4, ops
    assert any("batch_norm" in op for op in ops) and any("relu_" in op for op in ops)
    assert not any("bernoulli" in op or "dropout" in op for op in ops)
    replays = [it for it in report.iterations if it.mode == "replay"]
    assert replays and all(it.bytes_recomputed > 0 and not it.deviation for it in replays)
    # NOTE 3: every remake took its output's memory: no copy, no second buffer
    assert executor.TAKES["taken"] > before["taken"]
    assert executor.TAKES["copied"] == before["copied"]
    assert all(torch.equal(a, b) for a, b in zip(losses, got))
    assert_bitwise_equal(state_of(plain.model, plain.optimizer),
                         state_of(managed.model, managed.optimizer))


def test_without_swap_data_ptr_remakes_copy_and_train_bitwise(monkeypatch):
    """A PyTorch without `UntypedStorage._swap_data_ptr_` (2.11, the first GPU run: an
    AttributeError in backward) copies each remake's output into y's own memory."""
    monkeypatch.setattr(outcore.aten, "SWAPS_DATA_PTR", False)
    plain, managed = Work("sgd", False), Work("sgd", False)
    losses = train(plain)
    before = dict(executor.TAKES)
    with outcore.OutOfCore(BUDGET, recompute=True, min_move_bytes=0) as ooc:
        got = train(managed, ooc)
        assert ooc.report().recomputed_arrays >= 4
    assert executor.TAKES["taken"] == before["taken"]
    assert executor.TAKES["copied"] > before["copied"]
    assert all(torch.equal(a, b) for a, b in zip(losses, got))
    assert_bitwise_equal(state_of(plain.model, plain.optimizer),
                         state_of(managed.model, managed.optimizer))


def test_recompute_false_recomputes_nothing():
    w = Work("sgd")
    with outcore.OutOfCore(BUDGET, recompute=False, min_move_bytes=0) as ooc:
        train(w, ooc, iterations=3)
        assert ooc.report().recomputed_arrays == 0
        assert all(it.bytes_recomputed == 0 for it in ooc.report().iterations)


def test_bad_recompute_value_is_refused():
    for bad in ("yes", 1, None):
        with pytest.raises(OutcoreError, match="recompute must be"):
            outcore.OutOfCore(BUDGET, recompute=bad)


def _discarded(ooc):
    return [e for e in ooc._res.entries.values() if e.state is DISCARDED and e.ref() is not None]


def test_an_interrupt_in_backward_leaves_nothing_discarded():
    """Ctrl-C after the discards, before the repeats: the iteration ends with every
    activation whole again (NOTE 4), and training goes on bitwise equal to plain."""
    plain, managed = Work("adam"), Work("adam")
    with outcore.OutOfCore(BUDGET, recompute=True, min_move_bytes=0) as ooc:
        train(managed, ooc, iterations=3)
        train(plain, iterations=3)
        seen = {}

        def hook(grad):
            seen["discarded"] = len(_discarded(ooc))
            signal.raise_signal(signal.SIGINT)
        handle = managed.model.head.weight.register_hook(hook)
        with pytest.raises(KeyboardInterrupt):
            torch.manual_seed(7)
            with ooc.iteration():
                managed.step()
        handle.remove()
        assert seen["discarded"] > 0, "the interrupt landed before anything was discarded"
        assert not _discarded(ooc)
        assert ooc.report().iterations[-1].bytes_recomputed > 0     # remade at the end

        def plain_hook(grad):                    # the same step, interrupted the same way
            raise KeyboardInterrupt
        handle = plain.model.head.weight.register_hook(plain_hook)
        with pytest.raises(KeyboardInterrupt):
            torch.manual_seed(7)
            plain.step()
        handle.remove()
        train(plain, seed=200)
        train(managed, ooc, seed=200)
    assert_bitwise_equal(state_of(plain.model, plain.optimizer),
                         state_of(managed.model, managed.optimizer))


def test_a_step_that_changes_remakes_before_it_leaves_the_plan():
    """A step that runs an op the recording did not have, in backward, after the
    discards: the replayer remakes what it discarded before that op runs, goes on
    on-demand, and the result is still plain PyTorch's."""
    plain, managed = Work("sgd"), Work("sgd")

    def extra(grad):
        return grad * 1.0                        # a new op in backward
    left = []
    deviate = Replayer._deviate

    def spy(self, *args):
        out = deviate(self, *args)
        left.append(len(_discarded(ooc)))
        return out
    with outcore.OutOfCore(BUDGET, recompute=True, min_move_bytes=0) as ooc:
        train(managed, ooc, iterations=3)
        train(plain, iterations=3)
        discarded = {}

        def count(grad):
            discarded.setdefault("n", len(_discarded(ooc)))
        managed.model.head.weight.register_hook(count)
        for w in (plain, managed):
            w.model.head.weight.register_hook(extra)
        train(plain, iterations=2, seed=300)
        Replayer._deviate = spy
        try:
            train(managed, ooc, iterations=2, seed=300)
        finally:
            Replayer._deviate = deviate
        assert ooc.report().iterations[3].deviation
        assert discarded["n"] > 0 and left and left[0] == 0    # remade as it left the plan
        assert not _discarded(ooc)
    assert_bitwise_equal(state_of(plain.model, plain.optimizer),
                         state_of(managed.model, managed.optimizer))


def _kept_mm(x, w):
    out = torch.ops.aten.mm.default(x, w)
    call = executor.capture(torch.ops.aten.mm.default, (x, w), {}, producer=True)
    executor.ran(call)
    assert executor.captured(call, out, out.untyped_storage())
    return out, call


def test_a_remake_refuses_an_input_changed_after_the_op_even_before_the_discard():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    out, call = _kept_mm(x, w)
    x.add_(1)                                 # after the op, before the discard
    remake = executor.Remake(_NoResidency(), [call], "a test activation", out.untyped_storage())
    out.untyped_storage().resize_(0)           # discarded
    with pytest.raises(OutcoreError, match="changed in place"):
        remake(out.untyped_storage(), 4 * 8 * 4)
    assert out.untyped_storage().nbytes() == 0            # nothing computed


def test_a_remake_writes_the_same_bytes_without_moving_the_version():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    out, call = _kept_mm(x, w)
    expected = out.clone()
    remake = executor.Remake(_NoResidency(), [call], "a test activation", out.untyped_storage())
    out.zero_()
    version = out._version
    out.untyped_storage().resize_(0)           # discarded
    remake(out.untyped_storage(), expected.nbytes)
    assert torch.equal(out, expected) and out._version == version


def test_a_remake_takes_over_the_outputs_memory_instead_of_copying_it():
    # NOTE 3: y's empty storage takes the repeat's output memory (the plan counts y's
    # bytes once); an output in another geometry is copied into memory of y's own.
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    y = torch.empty(4, 8)
    storage = y.untyped_storage()
    storage.resize_(0)
    made = torch.ops.aten.mm.default(x, w)
    address = made.data_ptr()
    out = (made,)               # the op's result holds the output, as in a remake
    del made
    executor._take(storage, y.nbytes, out, 0, ((4, 8), (8, 1), 0))
    assert storage.data_ptr() == address and out[0].untyped_storage().nbytes() == 0
    assert torch.equal(y, torch.ops.aten.mm.default(x, w))
    for held in (torch.ops.aten.mm.default(x, w).t().contiguous().t(),   # column-major
                 torch.ops.aten.mm.default(x, w)):                       # held by the test too
        storage.resize_(0)
        executor._take(storage, y.nbytes, (held,), 0, ((4, 8), (8, 1), 0))
        assert storage.data_ptr() != held.data_ptr() and held.untyped_storage().nbytes() == y.nbytes
        assert torch.equal(y, held)


def test_a_dispatch_mode_of_the_users_keeps_the_repeats_outputs_whole():
    # A mode entered outside the iteration sees the repeats' ops (they run below
    # outcore's mode) and may keep their outputs: their memory is copied, not taken,
    # else the tensors it keeps are left without memory (a segmentation fault on use).
    from torch.utils._python_dispatch import TorchDispatchMode

    class Keep(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.kept = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.convolution.default:
                self.kept.append(out)
            return out
    plain, managed = Work("sgd"), Work("sgd")
    train(plain, iterations=4)
    before = dict(executor.TAKES)
    with outcore.OutOfCore(BUDGET, recompute=True, min_move_bytes=0) as ooc:
        train(managed, ooc, iterations=3)
        with Keep() as mode:
            train(managed, ooc, iterations=1, seed=103)
        assert ooc.report().iterations[-1].bytes_recomputed > 0
    assert executor.TAKES["copied"] > before["copied"]
    assert mode.kept and all(t.untyped_storage().nbytes() >= t.nbytes and torch.isfinite(t).all()
                             for t in mode.kept)
    assert_bitwise_equal(state_of(plain.model, plain.optimizer),
                         state_of(managed.model, managed.optimizer))


def test_a_remake_runs_without_autocast_even_when_called_under_it():
    # A remake may run where autocast is on (at the end of an iteration inside the
    # user's autocast region, or through Residency.ready): the kept call's arguments are
    # already what autocast made of them, so running it again must not cast them again.
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    out, call = _kept_mm(x, w)
    expected = out.clone()
    remake = executor.Remake(_NoResidency(), [call], "a test activation", out.untyped_storage())
    out.untyped_storage().resize_(0)           # discarded
    with torch.autocast("cpu", dtype=torch.bfloat16):
        remake(out.untyped_storage(), expected.nbytes)
    assert torch.equal(out, expected)


def test_a_failed_remake_leaves_no_tensor_without_memory(monkeypatch):
    """A remake that fails in the replayed backward (here: injected): the iteration raises
    that error, and no storage is left DISCARDED (NOTE 4); the model's state is whole and
    later iterations train on."""
    w = Work("sgd")
    with outcore.OutOfCore(BUDGET, recompute=True, min_move_bytes=0) as ooc:
        train(w, ooc, iterations=3)

        def broken(self, storage, nbytes):
            storage.resize_(nbytes)            # failed after taking memory: the caller empties it
            raise RuntimeError("injected")
        monkeypatch.setattr(executor.Remake, "__call__", broken)
        with pytest.raises(RuntimeError, match="injected"):
            with ooc.iteration():
                w.step()
        monkeypatch.undo()
        assert not [e for e in ooc._res.entries.values() if e.state is DISCARDED]
        for e in ooc._res.entries.values():
            storage = e.ref()
            if storage is not None and not e.foreign:
                assert storage.nbytes() == e.nbytes or e.state.name in ("SLOW", "MAPPED")
        for t in w.model.state_dict().values():
            assert torch.isfinite(t.float()).all()
        train(w, ooc, iterations=2, seed=500)
        assert ooc.report().iterations[-1].bytes_recomputed > 0


class _NoResidency:
    """Tracks nothing: every storage is unknown to it."""

    def entry_of(self, storage):
        return None


class AutocastWork(Work):
    def step(self):
        self.optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def test_recompute_under_autocast_is_bitwise_plain():
    plain, managed = AutocastWork("adam"), AutocastWork("adam")
    losses = train(plain)
    with outcore.OutOfCore(BUDGET, recompute=True, min_move_bytes=0) as ooc:
        got = train(managed, ooc)
        report = ooc.report()
    assert report.recomputed_arrays >= 2
    assert all(it.bytes_recomputed > 0 for it in report.iterations if it.mode == "replay")
    assert all(torch.equal(a, b) for a, b in zip(losses, got))
    assert_bitwise_equal(state_of(plain.model, plain.optimizer),
                         state_of(managed.model, managed.optimizer))


def test_the_picture_and_the_timeline_show_the_recomputes(tmp_path):
    w = Work("sgd")
    with outcore.OutOfCore(BUDGET, recompute=True, min_move_bytes=0) as ooc:
        train(w, ooc, iterations=3)
        ooc.plot(tmp_path / "m.svg")
        ooc.timeline(tmp_path / "t.json")
        made = ooc.report().recomputed_arrays
    assert f"recompute: {made} arrays made again" in (tmp_path / "m.svg").read_text()
    assert "recompute:aten.native_batch_norm.default" in (tmp_path / "t.json").read_text()


# Points where a Ctrl-C may land in recompute's part of the executor (NOTE [Interrupts]).
POINTS = [(Residency, "discard", 2), (Residency, "remake", 1), (Residency, "remake", 4),
          (Replayer, "_drop", 3), (Replayer, "_repeat", 2), (Replayer, "_remake_held", 1),
          (executor.Remake, "__call__", 3)]


@pytest.mark.parametrize("owner,name,n", POINTS, ids=[f"{o.__name__}.{m}#{n}" for o, m, n in POINTS])
def test_sigint_inside_recompute_loses_nothing(monkeypatch, owner, name, n):
    """SIGINT at the n-th call of a recompute step: the iteration ends with
    KeyboardInterrupt, nothing is left discarded or empty, the counters are exact, and
    training continued from that state is bitwise equal to plain PyTorch continued
    from it."""
    w = Work("adam")
    with outcore.OutOfCore(BUDGET, recompute=True, min_move_bytes=0) as ooc:
        train(w, ooc, iterations=3)
        original, calls = getattr(owner, name), {"n": 0}

        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                signal.raise_signal(signal.SIGINT)
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)
        with pytest.raises(KeyboardInterrupt):
            train(w, ooc, iterations=4, seed=600)
        monkeypatch.undo()
        assert calls["n"] >= n
        res = ooc._res
        assert not _discarded(ooc)
        gc.collect()
        counted = res.recount()               # retires storages that died meanwhile first
        assert (res.resident, res.offloaded) == counted
        for t in list(w.model.state_dict().values()) + [p.grad for p in w.model.parameters()
                                                        if p.grad is not None]:
            assert t.untyped_storage().nbytes() >= (t.storage_offset() + t.numel()) * t.element_size()
        twin = Work("adam")
        twin.model.load_state_dict(copy.deepcopy(w.model.state_dict()))
        twin.optimizer.load_state_dict(copy.deepcopy(w.optimizer.state_dict()))  # not shared
        for p, q in zip(twin.model.parameters(), w.model.parameters()):
            p.grad = None if q.grad is None else q.grad.detach().clone()
        train(twin, iterations=2, seed=700)
        train(w, ooc, iterations=2, seed=700)
    assert_bitwise_equal(state_of(twin.model, twin.optimizer), state_of(w.model, w.optimizer))


class Chain(nn.Module):
    """conv -> batch norm -> ReLU, three times: each convolution after the first reads a
    recomputed array (rule 3's chains)."""
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList()
        for cin in (3, 16, 16):
            self.layers.append(nn.ModuleList([nn.Conv2d(cin, 16, 3, padding=1), nn.BatchNorm2d(16)]))
        self.head = nn.Linear(16 * 16 * 16, 10)

    def forward(self, x):
        for conv, bn in self.layers:
            x = torch.relu_(bn(conv(x)))
        return self.head(x.flatten(1))


def chain_twins(optimizer: str):
    """Two Works on the same Chain network and optimizer: one plain, one managed."""
    plain, managed = Work(optimizer), Work(optimizer)
    for w in (plain, managed):
        torch.manual_seed(0)
        w.model = Chain()
        w.optimizer = (torch.optim.Adam(w.model.parameters(), lr=1e-3) if optimizer == "adam"
                       else torch.optim.SGD(w.model.parameters(), lr=0.05, momentum=0.9))
    return plain, managed


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_chained_recomputes_train_bitwise_plain(optimizer, monkeypatch):
    """A convolution whose input is itself recomputed (`candidates(chains=True)`, which
    recompute="auto" plans beside the plan without chains): the repeats run in forward
    order where the first is needed, each on the copy the one before made, and training
    is bitwise plain PyTorch's."""
    from outcore.plan import recompute as planner
    real = planner.candidates
    monkeypatch.setattr(planner, "candidates", lambda *a, **k: real(*a, **{**k, "chains": True}))
    plain, managed = chain_twins(optimizer)
    losses = train(plain)
    with outcore.OutOfCore(BUDGET, recompute=True, min_move_bytes=0) as ooc:
        got = train(managed, ooc)
        trace, report = ooc.trace, ooc.report()
    made = {a for _, a in planner.remade(trace)}
    chained = [fn for fn in trace.functions if fn.repeats is not None and "convolution" in fn.op
               and any(acc.array in made for acc in fn.accesses if acc.kind == "read")]
    assert chained, "no convolution repeat read a recomputed array"
    assert all(it.bytes_recomputed > 0 and not it.deviation
               for it in report.iterations if it.mode == "replay")
    assert all(torch.equal(a, b) for a, b in zip(losses, got))
    assert_bitwise_equal(state_of(plain.model, plain.optimizer),
                         state_of(managed.model, managed.optimizer))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_temporaries_train_bitwise_plain(optimizer, monkeypatch):
    """NOTE 5: every chained input is a temporary where an earlier repeat needs it
    (`Recompute.temporary`): the same storage is discarded and remade more than once in an
    iteration, and training is bitwise plain PyTorch's."""
    import dataclasses
    from outcore.plan import recompute as planner
    real = planner.candidates
    monkeypatch.setattr(planner, "candidates", lambda *a, **k: [
        dataclasses.replace(c, temporary=True) for c in real(*a, **{**k, "chains": True})])
    plain, managed = chain_twins(optimizer)
    losses = train(plain)
    with outcore.OutOfCore(BUDGET, recompute=True, min_move_bytes=0) as ooc:
        got = train(managed, ooc)
        trace, report = ooc.trace, ooc.report()
    made = [fn.repeats for fn in trace.functions if fn.repeats is not None
            and any(acc.kind == "create" for acc in fn.accesses)]
    assert len(made) > len(set(made)), "no array was made again twice"
    assert all(it.bytes_recomputed > 0 and not it.deviation
               for it in report.iterations if it.mode == "replay")
    assert all(torch.equal(a, b) for a, b in zip(losses, got))
    assert_bitwise_equal(state_of(plain.model, plain.optimizer),
                         state_of(managed.model, managed.optimizer))


def test_an_interrupt_before_chained_repeats_remakes_them_in_order(monkeypatch):
    """Ctrl-C at the end of forward, after a chain's discards and before its repeats:
    the end of the iteration remakes every discarded array, each convolution after the
    array it reads (made ready first), and training goes on bitwise equal to plain."""
    from outcore.plan import recompute as planner
    real = planner.candidates
    monkeypatch.setattr(planner, "candidates", lambda *a, **k: real(*a, **{**k, "chains": True}))
    plain, managed = Work("sgd"), Work("sgd")
    for w in (plain, managed):
        torch.manual_seed(0)
        w.model = Chain()
        w.optimizer = torch.optim.SGD(w.model.parameters(), lr=0.05, momentum=0.9)
    with outcore.OutOfCore(BUDGET, recompute=True, min_move_bytes=0) as ooc:
        train(managed, ooc, iterations=3)
        train(plain, iterations=3)
        seen = []

        def interrupt(module, args):
            seen.append(len(_discarded(ooc)))
            raise KeyboardInterrupt
        for w, managed_step in ((managed, True), (plain, False)):
            handle = w.model.head.register_forward_pre_hook(interrupt)
            with pytest.raises(KeyboardInterrupt):
                torch.manual_seed(7)
                with ooc.iteration() if managed_step else contextlib.nullcontext():
                    w.step()
            handle.remove()
        assert seen[0] >= 2, "the interrupt landed before a chain was discarded"
        assert not _discarded(ooc)
        assert ooc.report().iterations[-1].bytes_recomputed > 0     # remade at the end
        train(plain, seed=200)
        train(managed, ooc, seed=200)
    assert_bitwise_equal(state_of(plain.model, plain.optimizer),
                         state_of(managed.model, managed.optimizer))
