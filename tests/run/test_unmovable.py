"""Storages outcore must never resize (NOTE 7 of run/residency.py): a model in shared
memory (`share_memory()`, Hogwild-style), and parameters shared with numpy through
`.numpy()` between iterations. Both train bitwise equal to plain PyTorch with every
replay within the budget."""
from __future__ import annotations

import contextlib
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


def test_numpy_between_iterations_leaves_the_plan_and_keeps_the_budget(tmp_path, caplog):
    """`.numpy()` makes a storage unresizable for good. The replay that finds a
    parameter so pinned leaves the plan (on-demand keeps the budget), the next iteration
    is recorded again with it counted resident, and the replays after it keep the budget
    (they went 24% over when the plan still counted on moving it)."""
    expected, expected_losses = plain_run(8)
    model, opt = make()
    losses = []
    with outcore.OutOfCore(BUDGET, swap_dir=str(tmp_path)) as ooc, \
            caplog.at_level(logging.WARNING, logger="outcore"):
        for it in range(8):
            if it == 4:
                for p in model.parameters():
                    p.detach().numpy().sum()          # the array itself is dropped at once
            with ooc.iteration():
                losses.append(step(model, opt, it))
        report = ooc.report()
    assert_bitwise_equal(state_of(model, opt), expected)
    _assert_left_the_plan_once(report, losses, expected_losses, ".numpy()")
    assert ".numpy()" in caplog.text
    for it in report.iterations:
        if it.mode == "replay":
            assert it.peak_resident <= BUDGET, report
    assert report.iterations[-1].bytes_read > 0


@pytest.mark.parametrize("how", ["from_numpy", "torch.load"])
def test_state_replaced_by_unmovable_storages_leaves_the_plan_and_keeps_the_budget(
        tmp_path, how):
    """Between iterations the parameters are replaced by `from_numpy` copies, or the
    optimizer's state by `torch.load`'s (storages that cannot be resized): the replay
    bound them where the plan moved the arrays and ran over the budget by them, with no
    deviation and no word (a new user's report: 10.1 MB against 6.3). Now it leaves the
    plan there, the next iteration is recorded with them pinned, and every iteration
    keeps the budget."""
    import io

    def replace(model, opt):
        if how == "from_numpy":
            with torch.no_grad():
                for p in model.parameters():
                    p.data = torch.from_numpy(p.detach().numpy().copy())
        else:
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            opt.load_state_dict(torch.load(buffer))

    def run(ooc=None):
        model, opt = make()
        losses = []
        for it in range(8):
            if it == 4:
                replace(model, opt)
            with ooc.iteration() if ooc else contextlib.nullcontext():
                losses.append(step(model, opt, it))
        return model, opt, losses

    model, opt, expected_losses = run()
    expected = state_of(model, opt)
    budget = 16 * 2**20
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path)) as ooc:
        model, opt, losses = run(ooc)
        report = ooc.report()
    assert_bitwise_equal(state_of(model, opt), expected)
    _assert_left_the_plan_once(report, losses, expected_losses, "can no longer move")
    assert report.in_core_peak > budget
    assert all(it.peak_resident <= budget for it in report.iterations), report


def test_unmovable_arrays_that_die_within_the_step_are_counted_by_the_plan(tmp_path):
    """Each step makes a batch it cannot move and drops it before the end (a DataLoader
    worker's batch arrives in shared memory). The plan counts such arrays resident as it
    does those alive at the end; it planned to move them, and the replays went over the
    budget by what they held."""
    def run(ooc=None):
        model, opt = make()
        for it in range(6):
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                rng = np.random.default_rng(it)
                x = torch.from_numpy(rng.standard_normal((256, WIDTH), dtype=np.float32))
                (model(x) - x).square().mean().backward()
                del x
                opt.step()
                opt.zero_grad()
        return state_of(model, opt)
    expected = run()
    with outcore.OutOfCore(BUDGET, swap_dir=str(tmp_path)) as ooc:
        got = run(ooc)
        report = ooc.report()
    assert_bitwise_equal(got, expected)
    replays = [it for it in report.iterations if it.mode == "replay"]
    assert len(replays) >= 3 and all(it.deviation is None for it in replays), report
    assert all(it.peak_resident <= BUDGET for it in replays), report


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


def test_sharing_is_pytorchs_own_once_the_outofcore_closes(tmp_path):
    before = {name: torch.UntypedStorage.__dict__[name]
              for name in ("_share_fd_cpu_", "_share_filename_cpu_")}
    with outcore.OutOfCore(BUDGET, swap_dir=str(tmp_path)) as ooc:
        assert torch.UntypedStorage.__dict__["_share_fd_cpu_"] is not before["_share_fd_cpu_"]
        model, opt = make()
        with ooc.iteration():
            step(model, opt, 0)
    assert {name: torch.UntypedStorage.__dict__[name] for name in before} == before
    assert torch.zeros(4).share_memory_().untyped_storage().is_shared()


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
