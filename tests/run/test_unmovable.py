"""Storages outcore must never resize (NOTE 7 of run/residency.py): a model in shared
memory (`share_memory()`, Hogwild-style), and parameters shared with numpy through
`.numpy()` between iterations. Both train bitwise equal to plain PyTorch with every
replay within the budget."""
from __future__ import annotations

import collections
import contextlib
import copy
import logging

import numpy as np
import pytest
import torch

import outcore

from ..trace.helpers import assert_bitwise_equal, state_of

WIDTH, DEPTH, BUDGET = 512, 4, 12 * 2**20     # parameters 4 MiB, Adam's moments 8 MiB


def make(shared: bool = False):
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    if shared:
        model.share_memory()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def step(model, opt, it):
    g = torch.Generator().manual_seed(it)
    x = torch.randn(64, WIDTH, generator=g)
    loss = (model(x) - x).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def plain_run(iterations, shared=False):
    model, opt = make(shared)
    losses = [step(model, opt, it) for it in range(iterations)]
    return state_of(model, opt), losses


def test_a_model_in_shared_memory_stays_put_and_trains_bitwise(tmp_path):
    """PyTorch calls a `share_memory_()` storage resizable, but resizing it to 0 and back
    crashed the process (a segmentation fault in the first iteration): it is pinned."""
    expected, expected_losses = plain_run(5, shared=True)
    model, opt = make(shared=True)
    with outcore.OutOfCore(BUDGET, swap_dir=str(tmp_path)) as ooc:
        losses = []
        for it in range(5):
            with ooc.iteration():
                losses.append(step(model, opt, it))
        entries = [ooc._res.entry_of(p.untyped_storage()) for p in model.parameters()]
        assert all(e is not None and e.pinned for e in entries)
        report = ooc.report()
    assert_bitwise_equal(state_of(model, opt), expected)
    assert all(torch.equal(a, b) for a, b in zip(losses, expected_losses))
    replays = [it for it in report.iterations if it.mode == "replay"]
    assert replays and all(it.peak_resident <= BUDGET for it in replays), report
    assert sum(it.bytes_read for it in replays) > 0          # the rest still moves


def _assert_left_the_plan_once(report, losses, expected_losses, why: str) -> None:
    """Losses bitwise; of 8 iterations the 5th left its plan (`why` in its deviation),
    the 6th recorded again and the last two replayed."""
    assert all(torch.equal(a, b) for a, b in zip(losses, expected_losses))
    modes = [it.mode for it in report.iterations]
    assert modes[3:5] == ["replay", "replay"] and modes[5:] == ["record", "replay", "replay"], modes
    assert why in report.iterations[4].deviation, report.iterations[4].deviation


def test_numpy_arrays_dropped_between_iterations_change_nothing(tmp_path):
    """A logger's `.numpy()` of every parameter between iterations (TensorBoard's
    histograms), each array dropped at once: PyTorch's own numpy() made every storage
    unresizable for good, so the next replay left the plan and, at a budget the
    parameters do not fit beside the step, the iterations after it failed. The arrays
    now leave the storages movable (NOTE [Sharing a storage outcore moves], rule 8):
    every iteration after the recordings replays its plan within the budget, and the
    arrays hold the values plain PyTorch's hold. At this budget the first weight is on
    the slow tier between iterations (mapped) and the others are resident."""
    budget = BUDGET + 2 * 2**20
    expected, expected_losses = plain_run(8)
    plain_model, plain_opt = make()
    model, opt = make()
    seen, plain_seen, losses = [], [], []
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path)) as ooc:
        for it in range(8):
            step(plain_model, plain_opt, it)
            with ooc.iteration():
                losses.append(step(model, opt, it))
            seen.append([p.detach().numpy().sum() for p in model.parameters()])
            plain_seen.append([p.detach().numpy().sum() for p in plain_model.parameters()])
        report = ooc.report()
    assert_bitwise_equal(state_of(model, opt), expected)
    assert all(torch.equal(a, b) for a, b in zip(losses, expected_losses))
    assert seen == plain_seen
    modes = [it.mode for it in report.iterations]
    assert modes == ["record", "record"] + ["replay"] * 6, modes
    assert all(it.deviation is None for it in report.iterations), report
    assert all(it.peak_resident <= budget for it in report.iterations), report
    assert all(it.bytes_read > 0 for it in report.iterations[2:])


@torch.library.custom_op("outcore_test::sin_through_numpy", mutates_args=())
def _sin_through_numpy(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.sin(x.numpy())).clone()


@_sin_through_numpy.register_fake
def _(x):
    return torch.empty_like(x)


_sin_through_numpy.register_autograd(
    lambda ctx, g: g * torch.cos(ctx.saved_tensors[0]),
    setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]))


class _SinModel(torch.nn.Sequential):
    def forward(self, x):
        for layer in self:
            x = _sin_through_numpy(layer(x))
        return x


@pytest.mark.parametrize("where", ["parameters under no_grad between iterations",
                                   "a custom op's input inside the step"])
def test_numpy_where_grad_mode_is_off_leaves_the_storages_movable(where, tmp_path):
    """PyTorch's numpy() takes a tensor that requires grad where grad mode is off (under
    `torch.no_grad()`, in an autograd Function's or a custom op's forward); outcore's
    handed such tensors to PyTorch's, which made their storages unresizable for good:
    a custom op computing through numpy (helper-141) made every other iteration deviate
    and the next record again, and the weights read under no_grad never moved again.
    Now every iteration after the recordings replays its plan, bitwise."""
    def build():
        torch.manual_seed(0)
        if where.startswith("a custom op"):
            model = _SinModel(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH)])
        else:
            model = make()[0]
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    def one(model, opt, it):
        if where.startswith("parameters"):
            return step(model, opt, it)
        x = torch.randn(256, WIDTH, generator=torch.Generator().manual_seed(it))
        loss = model(x).square().mean()        # activations of 512 KiB: the plan moves them
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    def run(model, opt, ooc=None):
        losses, seen = [], []
        for it in range(8):
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                losses.append(one(model, opt, it))
            if where.startswith("parameters") and it < 7:    # read before the next one
                with torch.no_grad():
                    seen.append([float(p.numpy().sum()) for p in model.parameters()])
        return losses, seen

    plain_model, plain_opt = build()
    expected_losses, expected_seen = run(plain_model, plain_opt)
    model, opt = build()
    budget = BUDGET - 4 * 2**20 if where.startswith("parameters") else 6 * 2**20
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path)) as ooc:
        losses, seen = run(model, opt, ooc)
        report = ooc.report()
    assert_bitwise_equal(state_of(model, opt), state_of(plain_model, plain_opt))
    assert all(torch.equal(a, b) for a, b in zip(losses, expected_losses))
    assert seen == expected_seen
    modes = [it.mode for it in report.iterations]
    assert modes == ["record", "record"] + ["replay"] * 6, report
    assert all(it.deviation is None for it in report.iterations), report
    assert all(it.peak_resident <= budget for it in report.iterations), report
    assert report.pinned_bytes < 2**20, report    # only the biases, small: no weight pinned


def test_numpy_arrays_kept_across_an_iteration_alias_the_trained_parameters(
        tmp_path, caplog):
    """Arrays of the parameters kept across an iteration see what the step wrote into
    them, as plain PyTorch's do (they pointed at the swap file's mapping, which the next
    iteration closed: stale values). While they live the parameters stay in RAM: the
    replay that finds them so leaves the plan within the budget; once they are dropped
    the parameters move again and the iterations after it replay."""
    expected, expected_losses = plain_run(8)
    plain_model, plain_opt = make()
    model, opt = make()
    losses = []
    with outcore.OutOfCore(BUDGET, swap_dir=str(tmp_path)) as ooc, \
            caplog.at_level(logging.WARNING, logger="outcore"):
        for it in range(8):
            if it == 4:
                kept = [p.detach().numpy() for p in model.parameters()]
                plain_kept = [p.detach().numpy() for p in plain_model.parameters()]
            step(plain_model, plain_opt, it)
            with ooc.iteration():
                losses.append(step(model, opt, it))
            if it == 4:
                assert all(np.array_equal(a, b) for a, b in zip(kept, plain_kept))
                assert all(np.array_equal(a, p.detach().numpy())
                           for a, p in zip(kept, model.parameters()))
                del kept, plain_kept
        report = ooc.report()
    assert_bitwise_equal(state_of(model, opt), expected)
    assert all(torch.equal(a, b) for a, b in zip(losses, expected_losses))
    assert ".numpy()" in report.iterations[4].deviation, report.iterations[4].deviation
    assert ".numpy()" in caplog.text
    assert all(it.peak_resident <= BUDGET for it in report.iterations), report
    assert [it.mode for it in report.iterations[6:]] == ["replay", "replay"], report
    assert all(it.deviation is None and it.bytes_read > 0 for it in report.iterations[6:])
    # The parameters move again (the plan moves them: iteration 5 left it for them).
    weights = [model[k].weight.untyped_storage() for k in range(0, 2 * DEPTH, 2)]
    assert not any(ooc._res.entry_of(w).pinned for w in weights)      # (biases are small)


def test_numpy_inside_the_step_of_an_activation_the_plan_moved(tmp_path):
    """`.numpy()` is no aten op: inside a replay it read an activation the plan had
    already dropped after its last op (garbage, bitwise wrong). Now the storage is made
    resident first and the array holds what plain PyTorch's holds, in every iteration."""
    def make_small():
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    def logged_step(model, opt, it, log):
        x = torch.randn(64, 256, generator=torch.Generator().manual_seed(it))
        opt.zero_grad()
        hidden = model[0](x)                                 # 64 KiB, saved for backward
        model[1:](hidden).square().mean().backward()
        log.append((hidden.detach().numpy().copy(), np.asarray(model[0].weight.detach()).sum()))
        opt.step()
    plain, ours = make_small(), make_small()
    plain_log, log = [], []
    with outcore.OutOfCore("1MiB", swap_dir=str(tmp_path)) as ooc:
        for it in range(5):
            logged_step(*plain, it, plain_log)
            with ooc.iteration():
                logged_step(*ours, it, log)
        report = ooc.report()
    assert [it.mode for it in report.iterations] == ["record"] + ["replay"] * 4, report
    assert all(it.peak_resident <= 2**20 for it in report.iterations), report
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(log, plain_log))
    assert_bitwise_equal(state_of(*ours), state_of(*plain))


# -- share_memory_() of a storage outcore moves (NOTE [Sharing a storage outcore moves]) --
def _moments(opt):
    return [s["exp_avg"] for s in opt.state.values()]


def test_sharing_state_the_step_holds_on_the_slow_tier_keeps_it_whole_and_shared(tmp_path):
    """Adam's moments shared inside the step, while the plan has some of them on the
    slow tier: their storages were empty, shared empty, and the next read resized a
    shared storage (a segmentation fault). Now they are read back first, shared with
    their values, stay shared, and training is bitwise plain PyTorch's."""
    def share_some(opt, it):
        if it == 3:
            for m in _moments(opt)[::2]:
                m.share_memory_()

    def run(ooc=None):
        model, opt = make()
        losses = []
        for it in range(7):
            with ooc.iteration() if ooc else contextlib.nullcontext():
                g = torch.Generator().manual_seed(it)
                x = torch.randn(64, WIDTH, generator=g)
                loss = (model(x) - x).square().mean()
                loss.backward()
                if ooc is not None and it == 3:      # the case: some of them are out now
                    states = [ooc._res.entry_of(m.untyped_storage()).state
                              for m in _moments(opt)[::2]]
                    assert any(s is not outcore.states.FAST for s in states), states
                share_some(opt, it)
                opt.step()
                opt.zero_grad()
                losses.append(loss.detach())
        return model, opt, losses

    model, opt, expected_losses = run()
    expected = state_of(model, opt)
    with outcore.OutOfCore(BUDGET, swap_dir=str(tmp_path)) as ooc:
        model, opt, losses = run(ooc)
        report = ooc.report()
    assert_bitwise_equal(state_of(model, opt), expected)
    assert torch.equal(torch.stack(losses), torch.stack(expected_losses))
    assert all(m.untyped_storage().is_shared() for m in _moments(opt)[::2])
    assert all(it.peak_resident <= BUDGET for it in report.iterations), \
        [it.peak_resident for it in report.iterations]


def test_sharing_state_mapped_between_iterations_keeps_it_shared(tmp_path):
    """Between iterations state left on the slow tier is mapped from the swap file.
    Shared as it was, its shared pages looked unwritten to the next iteration, which
    emptied the storage again: the sharing silently ended (values stayed right). Now it
    is read back, then shared, and stays shared through later iterations."""
    budget = 16 * 2**20
    expected, _ = plain_run(6)
    model, opt = make()
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path)) as ooc:
        for it in range(6):
            with ooc.iteration():
                step(model, opt, it)
            if it == 2:
                moments = _moments(opt)
                assert any(ooc._res.entry_of(m.untyped_storage()).state is outcore.states.MAPPED
                           for m in moments)
                for m in moments:
                    m.share_memory_()
        report = ooc.report()
    assert_bitwise_equal(state_of(model, opt), expected)
    assert all(m.untyped_storage().is_shared() for m in _moments(opt))
    assert all(it.peak_resident <= budget for it in report.iterations)


def test_sharing_from_another_thread_what_the_step_holds_out_is_refused(tmp_path):
    """Only the step's thread changes the table (Residency NOTE 2) and it may move a
    tracked storage at any moment: one shared from another thread (mid-step from the
    slow tier; between iterations while resident) is refused with a clear error and left
    as it was; training goes on bitwise."""
    import threading
    errors = []

    def share_from_thread(tensor):
        try:
            tensor.share_memory_()
        except outcore.OutcoreError as exc:
            errors.append(exc)
    expected, _ = plain_run(5)
    model, opt = make()
    with outcore.OutOfCore(BUDGET, swap_dir=str(tmp_path)) as ooc:
        for it in range(5):
            with ooc.iteration():
                if it == 3:
                    out = [m for m in _moments(opt)
                           if ooc._res.entry_of(m.untyped_storage()).state is not outcore.states.FAST]
                    assert out
                    thread = threading.Thread(target=lambda: share_from_thread(out[0]))
                    thread.start()
                    thread.join()
                step(model, opt, it)
        # Between iterations too, and a resident one too: the step's thread may move it.
        param = next(p for p in model.parameters()
                     if ooc._res.entry_of(p.untyped_storage()) is not None)
        out.append(param)
        thread = threading.Thread(target=lambda: share_from_thread(param))
        thread.start()
        thread.join()
    assert len(errors) == 2 and all("another thread" in str(e) for e in errors), errors
    assert not any(t.untyped_storage().is_shared() for t in out)
    assert_bitwise_equal(state_of(model, opt), expected)


@pytest.mark.parametrize("how", ["numpy", "share_memory_"])
def test_room_made_between_iterations_leaves_every_tensor_readable(tmp_path, how):
    """Reading one parameter back between iterations (for `.numpy()` or `share_memory_()`)
    made room by sending others to the slow tier, where they stayed unmapped with no
    bytes: the next read of one crashed the process, a torch.save (or ooc.save) of the
    model wrote a checkpoint that could not be loaded (helper-49). They are mapped again
    now, as an iteration leaves them."""
    import io
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(3)],
                                torch.nn.Linear(256, 10))
    plain = copy.deepcopy(model)
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    for m, ooc in ((plain, None), (model, outcore.OutOfCore("1MiB", swap_dir=str(tmp_path),
                                                            min_move_bytes=0))):
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        for _ in range(4):
            with ooc.iteration() if ooc else contextlib.nullcontext():
                torch.nn.functional.cross_entropy(m(x), y).backward()
                opt.step()
                opt.zero_grad()
    for p in list(model.parameters())[:3]:
        p.detach().numpy() if how == "numpy" else p.detach().share_memory_()
    assert all(p.untyped_storage().nbytes() == p.numel() * 4 for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()))
    assert all(torch.equal(loaded[k], v) for k, v in plain.state_dict().items())
    ooc.close()


def test_numpy_inside_a_replay_of_state_on_the_slow_tier_keeps_the_budget(tmp_path):
    """A statistic of Adam's moments taken with numpy during the forward pass, where the
    plan has them on the slow tier: each was read back and stayed resident beside the
    plan, every replay 47% over the budget without a deviation (helper-50). Now they
    linger beside the plan (`Replayer.linger`) and go where the budget needs their room;
    the values are plain PyTorch's."""
    def run(ooc):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
        x, y = torch.randn(64, 256), torch.randn(64, 256)
        seen = []
        for _ in range(6):
            with ooc.iteration() if ooc else contextlib.nullcontext():
                out = model(x)
                seen.append([float(np.asarray(v).sum()) for st in opt.state.values()
                             for v in st.values() if v.dim()])
                ((out - y) ** 2).mean().backward()
                opt.step()
                opt.zero_grad()
        return seen, model
    budget = 1536 * 2**10
    plain_seen, plain = run(None)
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path)) as ooc:
        seen, ours = run(ooc)
        report = ooc.report()
    assert seen == plain_seen
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), ours.parameters()))
    assert all(it.peak_resident <= budget for it in report.iterations), report
    assert all(it.deviation is None for it in report.iterations), report


def test_numpy_from_another_thread_of_what_outcore_moves_is_refused(tmp_path):
    """As for sharing (NOTE [Sharing a storage outcore moves], rules 4 and 8): the
    step's thread may move the storage at any moment, so an array over it made on
    another thread could point at freed memory. Refused with a clear error; a tensor
    outcore does not track converts as PyTorch converts it."""
    import threading
    results = []

    def convert(tensor):
        try:
            results.append(tensor.numpy())
        except outcore.OutcoreError as exc:
            results.append(exc)
    model, opt = make()
    with outcore.OutOfCore(BUDGET, swap_dir=str(tmp_path)) as ooc:
        for it in range(3):
            with ooc.iteration():
                step(model, opt, it)
        weight = model[0].weight.detach()
        for tensor in (weight, torch.arange(4.0)):
            thread = threading.Thread(target=convert, args=(tensor,))
            thread.start()
            thread.join()
    assert isinstance(results[0], outcore.OutcoreError), results
    assert "another thread" in str(results[0]) and ".numpy()" in str(results[0])
    assert results[1].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_sharing_is_pytorchs_own_once_the_outofcore_closes(tmp_path):
    before = {name: torch.UntypedStorage.__dict__[name]
              for name in ("_share_fd_cpu_", "_share_filename_cpu_")}
    assert "numpy" not in torch.Tensor.__dict__         # torch._C.TensorBase's
    with outcore.OutOfCore(BUDGET, swap_dir=str(tmp_path)) as ooc:
        assert torch.UntypedStorage.__dict__["_share_fd_cpu_"] is not before["_share_fd_cpu_"]
        assert "numpy" in torch.Tensor.__dict__
        model, opt = make()
        with ooc.iteration():
            step(model, opt, 0)
    assert {name: torch.UntypedStorage.__dict__[name] for name in before} == before
    assert "numpy" not in torch.Tensor.__dict__
    assert torch.zeros(4).share_memory_().untyped_storage().is_shared()
    t = torch.zeros(4)
    t.numpy()
    assert not t.untyped_storage().resizable()          # PyTorch's own numpy() again


def _train_beside(ooc, plain, ours, iterations):
    """Step the (model, optimizer) `plain` as it is and `ours` under `ooc`."""
    for it in iterations:
        step(*plain, it)
        with ooc.iteration():
            step(*ours, it)


@pytest.mark.parametrize("interrupted", [False, True])
def test_state_shared_in_a_step_that_then_ends_keeps_later_replays_within_the_budget(
        tmp_path, interrupted):
    """One of Adam's moments, on the slow tier, shared mid-step (then, in one case, a
    KeyboardInterrupt ends the step). The shape of a step that left its plan just after
    an op left that op out, so the plan was kept; its replays bound the now pinned
    moment as carried state, skipped its moves and ran 1 MiB over the budget with no
    deviation (a reviewer's find). Now a replay that starts from pinned state its plan
    moves leaves the plan at once and the next iteration records."""
    model, opt = make()
    plain_model, plain_opt = make()
    with outcore.OutOfCore(BUDGET, swap_dir=str(tmp_path)) as ooc:
        _train_beside(ooc, (plain_model, plain_opt), (model, opt), range(3))
        for m, o, under in ((plain_model, plain_opt, False), (model, opt, True)):
            try:
                with ooc.iteration() if under else contextlib.nullcontext():
                    x = torch.randn(64, WIDTH, generator=torch.Generator().manual_seed(3))
                    (m(x) - x).square().mean().backward()
                    if under:
                        entry = ooc._res.entry_of(_moments(o)[0].untyped_storage())
                        assert entry.state is not outcore.states.FAST
                    _moments(o)[0].share_memory_()
                    if interrupted:
                        raise KeyboardInterrupt
                    o.step()
                    o.zero_grad()
            except KeyboardInterrupt:
                pass
        _train_beside(ooc, (plain_model, plain_opt), (model, opt), range(4, 9))
        report = ooc.report()
    assert_bitwise_equal(state_of(model, opt), state_of(plain_model, plain_opt))
    assert _moments(opt)[0].untyped_storage().is_shared()
    assert "record" in [it.mode for it in report.iterations[4:]]
    assert [it.mode for it in report.iterations[-2:]] == ["replay", "replay"]
    assert all(it.peak_resident <= BUDGET for it in report.iterations), \
        [it.peak_resident for it in report.iterations]


def test_a_read_left_waiting_by_an_interrupted_share_between_iterations_is_finished(
        tmp_path, monkeypatch):
    """Between iterations signals are not held: a Ctrl-C while share_memory_() waits for
    outcore to read the tensor back leaves it being read (IN), unshared. The next
    replay's start skipped it (it only moves resident state), so it stayed in memory
    beside the plan: 1 MiB over the budget for the whole step. Now the start finishes
    the read and moves it as planned."""
    from outcore.run.residency import Residency
    plain_model, plain_opt = make()
    model, opt = make()
    with outcore.OutOfCore(BUDGET, swap_dir=str(tmp_path)) as ooc:
        _train_beside(ooc, (plain_model, plain_opt), (model, opt), range(3))
        res = ooc._res
        moment = next(m for m in _moments(opt)
                      if res.entry_of(m.untyped_storage()).state is not outcore.states.FAST)
        real = Residency._wait

        def interrupted_once(self, entry, doing):
            monkeypatch.setattr(Residency, "_wait", real)
            if doing == "reading":
                raise KeyboardInterrupt          # as the signal would, while waiting
            return real(self, entry, doing)
        monkeypatch.setattr(Residency, "_wait", interrupted_once)
        with pytest.raises(KeyboardInterrupt):
            moment.share_memory_()
        assert res.entry_of(moment.untyped_storage()).state is outcore.states.IN
        assert not moment.untyped_storage().is_shared()
        _train_beside(ooc, (plain_model, plain_opt), (model, opt), range(3, 6))
        report = ooc.report()
    assert_bitwise_equal(state_of(model, opt), state_of(plain_model, plain_opt))
    assert all(it.peak_resident <= BUDGET for it in report.iterations), \
        [it.peak_resident for it in report.iterations]


class _CountingOrder(collections.OrderedDict):
    """Residency.lru that counts the entries its walks visit."""
    visited = 0

    def __iter__(self):
        for key in super().__iter__():
            type(self).visited += 1
            yield key

    def items(self):
        for key in super().__iter__():
            type(self).visited += 1
            yield key, self[key]


def test_making_room_walks_only_the_entries_it_evicts_not_every_pinned_one(tmp_path):
    """Thousands of small pinned storages (biases, Adam's moments of them and its step
    counts) used to sit in the least-recently-used order, and every op that needed room
    walked past them all, and copied the whole order: a 1,250-layer MLP with Adam took
    minutes to record. Pinned entries are out of the order now, and a walk stops at what
    covers the room."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(160, 160) for _ in range(150)]      # weights 100 KiB: move
    model = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.Tanh())])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-3)
    ooc = outcore.OutOfCore(budget=12 * 2**20, offload="disk", swap_dir=tmp_path)
    _CountingOrder.visited = 0
    ooc._res.lru = _CountingOrder()
    walks = 0
    evict = ooc._res.evict_lru

    def counted(target, keep):
        nonlocal walks
        walks += ooc._res.resident > target
        return evict(target, keep)
    ooc._res.evict_lru = counted
    x = torch.randn(16, 160)
    with ooc:
        for it in range(2):
            with ooc.iteration():
                loss = model(x).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
            twin(x).square().mean().backward()
            twin_opt.step()
            twin_opt.zero_grad()
            assert not [e for e in ooc._res.lru.values() if e.pinned]
        assert ooc._res.stats.bytes_written > 0
        pinned = sum(e.pinned for e in ooc._res.entries.values())
        assert pinned > 400                       # 150 biases, their 300 moments, 150 steps
        assert walks > 100
        # before: each walk visited the whole order, pinned entries first (about 700 a walk)
        assert _CountingOrder.visited / walks < 60, (_CountingOrder.visited, walks)
    assert_bitwise_equal(state_of(model, opt), state_of(twin, twin_opt))


def _equal_under_a_budget(step, model, opt, plain, plain_opt, budget, swap_dir) -> None:
    """Four steps of plain PyTorch and four under `budget`: the same losses and state,
    bytes moved, and every iteration within the budget."""
    expected = [step(plain, plain_opt) for _ in range(4)]
    with outcore.OutOfCore(budget, swap_dir=swap_dir) as ooc:
        losses = []
        for _ in range(4):
            with ooc.iteration():
                losses.append(step(model, opt))
        report = ooc.report()
    assert all(torch.equal(a, b) for a, b in zip(losses, expected))
    assert_bitwise_equal(state_of(model, opt), state_of(plain, plain_opt))
    assert sum(it.bytes_written for it in report.iterations) > 0, "the budget made it move"
    assert all(it.peak_resident <= budget for it in report.iterations), str(report)


def test_a_meta_tensor_made_in_the_step_is_never_counted_or_moved(tmp_path):
    """helper-103: a meta tensor made inside an iteration (a shape worked out on meta)
    was tracked as resident memory; when room was needed its "eviction" wrote from
    address 0 on the mover's thread, a segmentation fault. A meta storage holds no
    memory: outside every counter, never moved (Residency NOTE 6)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 256))
    plain = copy.deepcopy(model)

    def step(m, opt):
        probe = torch.empty(1024, 512, device="meta")      # 2 MiB "on meta"
        shape = (probe * 2).sum(0).shape                   # an op reading it
        loss = m(torch.ones(64, 256)).square().mean() + 0 * shape[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    opt, plain_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, plain))
    # Parameters 1 MiB and their gradients as much.
    _equal_under_a_budget(step, model, opt, plain, plain_opt, 1536 * 1024, tmp_path)


def test_forward_mode_ad_under_a_budget_trains_bitwise(tmp_path):
    """helper-103: forward-mode AD makes efficient ZeroTensors as the parameters'
    tangents: their storage has a size but no memory. outcore tracked and evicted them,
    and every iteration raised PyTorch's "Attempted to access the data pointer on an
    invalid python storage" (not an OutcoreError), nothing trained. A ZeroTensor has no
    storage outcore tracks (`aten.storage_of`)."""
    import torch.autograd.forward_ad as fwAD

    def make_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Tanh(),
                                   torch.nn.Linear(512, 512), torch.nn.Tanh(),
                                   torch.nn.Linear(512, 10))
    gen = torch.Generator().manual_seed(1)
    x, v = torch.randn(128, 256, generator=gen), torch.randn(128, 256, generator=gen)
    y = torch.randint(0, 10, (128,), generator=gen)

    def step(m, opt):
        with fwAD.dual_level():
            prim, tan = fwAD.unpack_dual(m(fwAD.make_dual(x, v)))
        loss = torch.nn.functional.cross_entropy(prim, y) + 0.01 * tan.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    plain, model = make_model(), make_model()
    plain_opt, opt = (torch.optim.Adam(m.parameters(), lr=1e-3) for m in (plain, model))
    # The in-core peak: about 9.6 MiB.
    _equal_under_a_budget(step, model, opt, plain, plain_opt, 4 * 2**20, tmp_path)


def _linear_and_sgd():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _nested(build, x):
    """`build(x)` (a torch.nested constructor), its "prototype stage" warning silenced."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build(x)


def _nested_training(n):
    """(make, train, data): a linear layer on strided nested tensors of `n` parts."""
    make = _linear_and_sgd

    def train(model, opt, parts):
        nested = _nested(torch.nested.nested_tensor, parts)
        loss = model(torch.relu(model(nested))).to_padded_tensor(0.0).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()
    gen = torch.Generator().manual_seed(1)
    data = [[torch.randn(1 + i % 5, 16, generator=gen) for i in range(n)] for _ in range(3)]
    return make, train, data


@pytest.mark.parametrize("n,budget", [(4, "64MiB"), (64, "64KiB")])
def test_a_strided_nested_tensor_in_the_step_trains_bitwise(tmp_path, n, budget):
    """helper-117: a strided nested tensor (`torch.nested.nested_tensor`, PyTorch's
    prototype layout) raised "NestedTensorImpl doesn't support sizes" from outcore's
    room for the op's outputs at any budget (`on_demand._signature` asked its shape). Its
    room is now its inputs' bytes, as for sparse tensors. At a budget where storages
    move (64 parts, 64 KiB, min_move_bytes=0), its nested sizes, which its kernels read
    past the dispatcher, were moved too, and the next op read them as 0 bytes ("data is
    not allocated yet"): they never move now (NOTE [Read past the dispatcher])."""
    make, train, data = _nested_training(n)
    plain = make()
    expected = [train(*plain, parts) for parts in data]
    ours = make()
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path), min_move_bytes=0) as ooc:
        got = []
        for parts in data:
            with ooc.iteration():
                got.append(train(*ours, parts))
        moved = [it.bytes_written for it in ooc.report().iterations]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert all(torch.equal(p, q) for p, q in zip(plain[0].parameters(), ours[0].parameters()))
    assert (min(moved) > 0) == (n == 64), moved


def test_a_nested_tensor_built_from_metadata_the_step_made_keeps_it(tmp_path):
    """helper-119: `torch.nested.as_nested_tensor(x)` of a 3-D tensor makes the sizes,
    strides and offsets by ops outcore sees, then `_nested_view_from_buffer` hands them
    to the nested tensor, whose kernels read them in C++. Tracked as the step's own
    arrays, they were moved out where the budget needed room, and a later op read them
    as 0 bytes ("data is not allocated yet")."""
    make = _linear_and_sgd

    def train(model, opt, x):
        nested = _nested(torch.nested.as_nested_tensor, x * 1.0)
        others = [torch.randn(4096) for _ in range(8)]     # arrays that need room too
        h = torch.relu(model(nested)) + 0.0 * sum(o.sum() for o in others)
        loss = model(h).to_padded_tensor(0.0).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(64, 5, 16, generator=gen) for _ in range(4)]
    plain = make()
    torch.manual_seed(2)
    expected = [train(*plain, x) for x in data]
    ours = make()
    torch.manual_seed(2)
    budget = 160 * 1024
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path), min_move_bytes=0) as ooc:
        got = []
        for x in data:
            with ooc.iteration():
                got.append(train(*ours, x))
        its = ooc.report().iterations
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert all(torch.equal(p, q) for p, q in zip(plain[0].parameters(), ours[0].parameters()))
    assert all(it.bytes_written > 0 and it.peak_resident <= budget for it in its), [
        (it.bytes_written, it.peak_resident) for it in its]


def test_a_strided_nested_tensor_under_too_small_a_budget_is_named_in_the_error(tmp_path):
    """helper-117's nested step under a budget no schedule fits: the budget error's own
    advice asked the nested tensor's shape (`read_in_part`) and raised PyTorch's
    "NestedTensorImpl doesn't support sizes" instead of InfeasibleBudget."""
    make, train, data = _nested_training(64)
    ours = make()
    before = [p.detach().clone() for p in ours[0].parameters()]
    with outcore.OutOfCore("24KiB", swap_dir=str(tmp_path), min_move_bytes=0) as ooc:
        with pytest.raises(outcore.InfeasibleBudget, match="raise the budget"):
            with ooc.iteration():
                train(*ours, data[0])
    assert all(torch.equal(p, q) for p, q in zip(before, ours[0].parameters()))


@pytest.mark.parametrize("method", [False, True])
def test_tensor_split_by_a_tensor_of_indices_reads_them_back_first(tmp_path, method):
    """helper-117: `torch.tensor_split(x, indices)` with a 1-D tensor reads the indices
    in C++ before any op (no dispatch mode sees it): indices made in the step and moved
    to the swap file gave "data is not allocated yet". outcore reads them back first
    (NOTE [Sharing a storage outcore moves] rule 17). `min_move_bytes=0` lets 520 B of
    indices move at a 25 KiB budget; by default that takes 8192 of them."""
    n = 64

    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 16)
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    def train(model, opt, x, sizes):
        indices = torch.cumsum(sizes, 0)[:-1]             # made in the step: it may move
        h = model(torch.relu(model(model(x))))
        parts = h.tensor_split(indices) if method else torch.tensor_split(h, indices)
        loss = sum(p.square().mean() * (i + 1) for i, p in enumerate(parts[:8])) + parts[-1].sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()
    gen = torch.Generator().manual_seed(1)
    sizes = torch.full((n + 1,), 2)
    data = [torch.randn(2 * (n + 1), 16, generator=gen) for _ in range(3)]
    plain = make()
    expected = [train(*plain, x, sizes) for x in data]
    ours = make()
    with outcore.OutOfCore("25KiB", min_move_bytes=0, swap_dir=str(tmp_path)) as ooc:
        got = []
        for x in data:
            with ooc.iteration():
                got.append(train(*ours, x, sizes))
        report = ooc.report()
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert all(it.bytes_written > 0 for it in report.iterations), str(report)
