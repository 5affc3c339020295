"""Bad inputs, tried on purpose: each gets a clear error and loses nothing."""
import contextlib
import errno
import io
import os
import signal
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from torch.optim.optimizer import _global_optimizer_pre_hooks

import outcore
from outcore.trace.recorder import OptimizerSteps

from .. import zygote
from ..trace.helpers import assert_bitwise_equal, state_of
from .twins import assert_same_training, budgets, build, steady_trace, train_twins


def _trained(state: dict) -> dict:
    """Parameters and optimizer state, without BatchNorm's running statistics."""
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


@pytest.fixture(scope="module")
def resnet_trace():
    return steady_trace("resnet18-tiny", "sgd")


def test_budget_below_minimum_fails_before_training(resnet_trace):
    w = build("resnet18-tiny", "sgd")
    before = state_of(w.model, w.optimizer)
    ooc = outcore.OutOfCore(budget=160 * 1024, min_move_bytes=0)
    with pytest.raises(outcore.InfeasibleBudget) as err:
        with ooc.iteration():
            w.step()
    message = str(err.value)
    assert "function" in message and "smallest feasible budget" in message and "forward" in message
    assert err.value.min_feasible_bytes > 160 * 1024
    # Nothing trained: parameters and optimizer state are untouched. (The forward pass up
    # to the failing op updated BatchNorm statistics, as an out-of-memory error would.)
    assert_bitwise_equal(_trained(before), _trained(state_of(w.model, w.optimizer)))
    for p in w.model.parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
    ooc.close()


@pytest.mark.parametrize("where", ["missing", "a file"])
def test_unusable_swap_directory(tmp_path, where):
    path = tmp_path / "nope"
    if where == "a file":
        path.write_text("x")
    with pytest.raises(outcore.OutcoreError, match="swap"):
        outcore.OutOfCore(budget="1GiB", swap_dir=str(path))


def test_bad_arguments_are_clear():
    with pytest.raises(outcore.OutcoreError, match="byte quantity"):
        outcore.OutOfCore(budget="lots")
    with pytest.raises(outcore.OutcoreError, match="positive"):
        outcore.OutOfCore(budget=0)
    with pytest.raises(outcore.OutcoreError, match="policy"):
        outcore.OutOfCore(budget="1GiB", policy="magic")
    with pytest.raises(outcore.OutcoreError, match="CUDA"):
        outcore.OutOfCore(budget="1GiB", offload="host")
    ooc = outcore.OutOfCore(budget="1GiB")
    with ooc.iteration():
        with pytest.raises(outcore.OutcoreError, match="nest"):
            with ooc.iteration():
                pass
    for outer, inner in (("building", "iteration"), ("iteration", "building")):
        with getattr(ooc, outer)():
            with pytest.raises(outcore.OutcoreError,
                               match=rf"ooc.{inner}\(\) cannot start inside an open "
                                     rf"ooc.{outer}\(\) block"):
                with getattr(ooc, inner)():
                    pass
    with ooc.iteration():                   # another thread's block: not "nesting"
        from concurrent.futures import ThreadPoolExecutor

        def start():
            with ooc.iteration():
                pass
        with ThreadPoolExecutor(1) as pool:
            with pytest.raises(outcore.OutcoreError, match="another thread's ooc.iteration"):
                pool.submit(start).result()
    ooc.close()
    with pytest.raises(outcore.OutcoreError, match="closed"):
        with ooc.iteration():
            pass


def test_swap_file_never_visible_and_nothing_left(tmp_path, resnet_trace):
    budget = budgets(resnet_trace)["half"]
    w = build("resnet18-tiny", "sgd")
    with outcore.OutOfCore(budget=budget, swap_dir=str(tmp_path), min_move_bytes=0) as ooc:
        for _ in range(3):
            with ooc.iteration():
                w.step()
                assert list(tmp_path.iterdir()) == []       # unlinked at creation
        assert ooc.report().iterations[-1].bytes_written > 0
    assert list(tmp_path.iterdir()) == []


def _fail_writes(monkeypatch, errno_value):
    from outcore.run.movers import disk

    def broken_pwrite(fd, data, offset):
        raise OSError(errno_value, os.strerror(errno_value))
    monkeypatch.setattr(disk.os, "pwrite", broken_pwrite)


def test_disk_full_while_growing_swap_loses_nothing(monkeypatch, resnet_trace):
    from outcore.run.movers import disk
    budget = budgets(resnet_trace)["half"]
    w = build("resnet18-tiny", "sgd")
    before = state_of(w.model, w.optimizer)

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(disk.os, "posix_fallocate", full)
    ooc = outcore.OutOfCore(budget=budget, min_move_bytes=0)
    with pytest.raises(outcore.OutcoreError, match="exhausted.*Nothing was lost"):
        with ooc.iteration():
            w.step()
    monkeypatch.undo()
    # Every tensor is readable and the forward's only side effect (BatchNorm statistics)
    # happened exactly as in a plain run that failed at the same point.
    for t in state_of(w.model, w.optimizer).values():
        assert torch.isfinite(t.float()).all()
    assert_bitwise_equal(_trained(before), _trained(state_of(w.model, w.optimizer)))
    ooc.close()


@pytest.mark.parametrize("fault", ["grow ENOSPC", "write ENOSPC", "write EIO"])
@pytest.mark.parametrize("failing", ["recording", "replay"])
def test_a_failed_write_inside_the_optimizer_completes_the_step(monkeypatch, tmp_path, fault,
                                                                failing):
    """The disk fills, or a write fails, while optimizer.step() runs: the tensors that
    cannot go out stay in memory, over the budget, the step completes, and the error
    comes at its end with a note saying so (Residency NOTE 10). Raised at once, it left
    some parameters updated and the rest not, and Adam's lazily made state half made: a
    KeyError at every later step (helper-133). One raised in forward comes at once, with
    no note. A full disk is `SwapSpaceExhausted` whether the file failed to grow or a
    write found no room; another write error is `OutcoreError`."""
    from outcore.run.movers import disk
    from outcore.errors import SwapSpaceExhausted

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(6)])
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(model, opt):
        model(torch.ones(8, 512)).sum().backward()
        opt.step()
        opt.zero_grad()
    plain, plain_opt = make()
    model, opt = make()
    inside, armed = [], []
    opt.register_step_pre_hook(lambda *_: inside.append(True))
    where, name = fault.split()
    code = getattr(errno, name)
    real = disk.os.posix_fallocate if where == "grow" else disk.os.pwrite

    def failing(*args):
        if inside and armed:
            raise OSError(code, os.strerror(code))
        return real(*args)
    opt.register_step_post_hook(lambda *_: inside.clear())
    monkeypatch.setattr(disk.os, "posix_fallocate" if where == "grow" else "pwrite", failing)
    kind, match = ((SwapSpaceExhausted, "exhausted.*Nothing was lost") if fault == "grow ENOSPC"
                   else (SwapSpaceExhausted, "No space left.*nothing was lost") if name == "ENOSPC"
                   else (outcore.OutcoreError, "Input/output error.*nothing was lost"))
    with outcore.OutOfCore("4MiB", swap_dir=str(tmp_path), min_move_bytes=0) as ooc:
        if failing == "replay":
            for _ in range(3):
                step(plain, plain_opt)
                with ooc.iteration():
                    step(model, opt)
            assert ooc.report().iterations[-1].mode == "replay"
        armed.append(True)
        with pytest.raises(kind, match=match) as err:
            with ooc.iteration():
                step(model, opt)
        step(plain, plain_opt)
        notes = getattr(err.value, "__notes__", [])
        assert sum("inside optimizer.step(): the tensors" in n for n in notes) == 1, notes
        assert not any("took this step and the others did not" in n for n in notes), notes
        assert ooc.report().iterations[-1].peak_resident > ooc.budget     # kept in memory
        # The report says why, not the causes of an over-budget step in general (helper-203).
        row = ooc.report().iterations[-1]
        assert "write(s) to the slow tier failed in it" in row.over_why, row.over_why
        assert "write(s) to the slow tier failed in it" in str(ooc.report())
        inside.append(True)                  # fail in forward: at once, no note
        with pytest.raises(kind, match=match) as err:
            with ooc.iteration():
                step(model, opt)
        assert not any("optimizer" in n for n in getattr(err.value, "__notes__", []))
        opt.zero_grad()
        armed.clear()
        for _ in range(2):                   # room again: trains on, bitwise
            step(plain, plain_opt)
            with ooc.iteration():
                step(model, opt)
    assert_bitwise_equal(state_of(plain, plain_opt), state_of(model, opt))


def test_a_failed_read_inside_the_optimizer_says_the_step_is_half_done(monkeypatch, tmp_path):
    """A read that fails for good inside optimizer.step() (the state it needs is only on
    the slow tier): nothing can stand in for those bytes, so the error comes at once and,
    as after any exception there, some parameters took the step and others not; the
    error carries a note saying so (Residency NOTE 10 keeps only failed writes)."""
    from outcore.run.movers import disk
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(6)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    inside = []
    opt.register_step_pre_hook(lambda *_: inside.append(True))
    opt.register_step_post_hook(lambda *_: inside.clear())
    real = disk.os.preadv

    def failing(*args):
        if inside and armed:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(*args)
    armed = []
    monkeypatch.setattr(disk.os, "preadv", failing)
    with outcore.OutOfCore("4MiB", swap_dir=str(tmp_path), min_move_bytes=0) as ooc:
        for _ in range(3):
            with ooc.iteration():
                model(torch.ones(8, 512)).sum().backward()
                opt.step()
                opt.zero_grad()
        armed.append(True)
        with pytest.warns(RuntimeWarning, match="trying again"):
            with pytest.raises(outcore.OutcoreError, match="Input/output error") as err:
                with ooc.iteration():
                    model(torch.ones(8, 512)).sum().backward()
                    opt.step()
        notes = getattr(err.value, "__notes__", [])
        assert sum("took this step and the others did not" in n for n in notes) == 1, notes
        monkeypatch.undo()


@pytest.mark.parametrize("raised", [KeyboardInterrupt, RuntimeError])
def test_a_ctrl_c_inside_the_optimizer_says_the_step_may_be_half_done(tmp_path, raised):
    """helper-148: a Ctrl-C inside optimizer.step() left some parameters stepped and
    the others not (as without outcore) and nothing said so: the note came only on
    outcore's own errors. In the recording iteration and in a replay; none for one in
    forward, nor for the user's own exceptions (helper-149: the hooks cannot tell a
    closure or a hook of the user's from the update)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    halt = []

    def halfway():            # SGD calls its closure inside step(): the first parameter
        # has "taken the step", the rest not
        if halt:
            with torch.no_grad():
                model[0].weight.add_(1.0)
            raise raised("stop")
    with outcore.OutOfCore("1MiB", swap_dir=str(tmp_path), min_move_bytes=0) as ooc:
        for iteration in range(4):
            halt[:] = [True] if iteration in (0, 2) else []
            with pytest.raises(raised) if halt else contextlib.nullcontext() as err:
                with ooc.iteration():
                    model(torch.ones(8, 256)).sum().backward()
                    opt.step(halfway) if halt else opt.step()
                    opt.zero_grad()
            if halt:
                notes = getattr(err.value, "__notes__", [])
                assert sum("inside optimizer.step(): some parameters may have taken" in n
                           for n in notes) == (raised is KeyboardInterrupt), (iteration, notes)
            opt.zero_grad()
        with pytest.raises(raised) as err:
            with ooc.iteration():
                raise raised("in forward")
        assert not any("optimizer" in n for n in getattr(err.value, "__notes__", []))


def test_a_step_that_raised_and_was_caught_has_ended(tmp_path):
    """A step() that raises never reaches its post-hook: caught inside the iteration, it
    counted as running to the iteration's end, and a Ctrl-C in the next forward was
    noted as landing inside optimizer.step() (helper-149). In the recording iteration
    and after it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def failing():
        raise RuntimeError("the closure failed")
    with outcore.OutOfCore("1MiB", swap_dir=str(tmp_path), min_move_bytes=0) as ooc:
        for iteration in range(3):
            with pytest.raises(KeyboardInterrupt) as err:
                with ooc.iteration():
                    model(torch.ones(8, 256)).sum().backward()
                    with pytest.raises(RuntimeError, match="closure failed"):
                        opt.step(failing)
                    model(torch.ones(8, 256))
                    raise KeyboardInterrupt
            notes = getattr(err.value, "__notes__", [])
            assert not any("optimizer.step()" in n for n in notes), (iteration, notes)
            opt.zero_grad()


def test_optimizer_steps_end_with_their_frame():
    """`OptimizerSteps`: a step is open while the frame that called its pre-hook runs,
    nested steps too, and on another thread; one whose frame raised is over."""
    steps = OptimizerSteps()

    def step(inner=None, fail=False):
        steps.begin()
        seen = steps.open()
        if inner is not None:
            inner()
        if fail:
            raise RuntimeError("step failed")
        steps.end()
        return seen
    assert step() == [False] and steps.open() == []
    assert step(inner=lambda: step()) == [False] and not steps
    with pytest.raises(RuntimeError):
        step(fail=True)
    assert steps.open() == []
    held, seen = threading.Event(), []
    worker = threading.Thread(target=step, args=(held.wait,))
    worker.start()
    deadline = time.monotonic() + 30
    while not steps._steps and time.monotonic() < deadline:
        time.sleep(0.001)
    seen.append(steps.open())
    held.set()
    worker.join()
    assert seen == [[False]] and steps.open() == []


def test_an_optimizer_step_refused_before_it_begins_gets_no_half_step_note(tmp_path):
    """The budget cannot hold one parameter's step beside its gradient: the recording
    refuses it before the optimizer writes anything, and the error, which says nothing
    was trained, carries no note saying some parameters took the step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512, bias=False)          # 1 MiB weight, 1 MiB gradient
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    with outcore.OutOfCore("1536KiB", swap_dir=str(tmp_path)) as ooc:
        with pytest.raises(outcore.InfeasibleBudget, match="Nothing was trained") as err:
            with ooc.iteration():
                model(torch.randn(4, 512)).sum().backward()
                opt.step()
    assert not any("took this step" in n for n in getattr(err.value, "__notes__", []))
    assert torch.equal(before, model.weight)


def test_io_error_during_write_keeps_the_tensor(monkeypatch, resnet_trace):
    budget = budgets(resnet_trace)["half"]
    w = build("resnet18-tiny", "sgd")
    before = state_of(w.model, w.optimizer)
    ooc = outcore.OutOfCore(budget=budget, min_move_bytes=0)
    _fail_writes(monkeypatch, 5)
    with pytest.raises(outcore.OutcoreError, match="nothing was lost"):
        with ooc.iteration():
            w.step()
    monkeypatch.undo()
    assert_bitwise_equal(_trained(before), _trained(state_of(w.model, w.optimizer)))
    ooc.close()


def test_a_file_size_limit_is_named_and_loses_nothing(tmp_path):
    """A file-size limit makes the kernel refuse to grow the swap file (EFBIG): the error
    names that limit (freeing disk space would not help), and nothing is lost."""
    child = textwrap.dedent(f"""
        import resource, signal, torch, outcore
        from outcore import workloads
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        w = workloads.build("mlp", batch=8, optimizer="sgd")
        ref = [p.detach().clone() for p in w.model.parameters()]
        ooc = outcore.OutOfCore(budget="9MiB", swap_dir={str(tmp_path)!r}, min_move_bytes=0)
        try:
            with ooc.iteration():
                w.step()
        except outcore.OutcoreError as e:
            print("ERROR", e)
        same = all(torch.equal(a, b) for a, b in zip(ref, w.model.parameters()))
        print("PARAMS_INTACT", same)
    """)
    out = zygote.run(["-c", child], timeout=120)
    assert "ERROR" in out.stdout and "RLIMIT_FSIZE" in out.stdout, out.stdout + out.stderr
    assert "exhausted" not in out.stdout and "Free disk space" not in out.stdout
    assert "PARAMS_INTACT True" in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_file_size_limit_lowered_mid_run_is_named_and_loses_nothing(tmp_path):
    """The limit lowered after the swap file grew: a write inside the file fails (EFBIG,
    no growth asked for), and that error names the limit too (helper-177: "File too large"
    alone). The parameters are those of the steps before or of the step that failed,
    whole, and the next step trains once the limit is raised."""
    child = textwrap.dedent(f"""
        import resource, signal, torch, outcore
        from outcore import workloads
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        plain = workloads.build("mlp", batch=8, optimizer="sgd")
        states = []
        for _ in range(5):
            states.append([p.detach().clone() for p in plain.model.parameters()])
            plain.step()
        w = workloads.build("mlp", batch=8, optimizer="sgd")
        ooc = outcore.OutOfCore(budget="9MiB", swap_dir={str(tmp_path)!r}, min_move_bytes=0)
        for _ in range(3):
            with ooc.iteration():
                w.step()
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            with ooc.iteration():
                w.step()
        except outcore.OutcoreError as e:
            print("ERROR", e)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        now = [p.detach().clone() for p in w.model.parameters()]
        print("PARAMS_WHOLE", any(all(torch.equal(a, b) for a, b in zip(s, now))
                                  for s in states[3:5]))
        with ooc.iteration():
            w.step()
        print("FINITE", all(bool(p.isfinite().all()) for p in w.model.parameters()))
        ooc.close()
    """)
    out = zygote.run(["-c", child], timeout=120)
    assert "ERROR" in out.stdout and "RLIMIT_FSIZE" in out.stdout, out.stdout + out.stderr
    assert "PARAMS_WHOLE True" in out.stdout and "FINITE True" in out.stdout, out.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("offload", ["disk", "host"])
def test_interrupted_iteration_recovers(resnet_trace, monkeypatch, offload):
    """An exception in the middle of a step; offload="host" on the emulated link
    (tests/run/test_host_tier.py)."""
    if offload == "host":
        from outcore.run.movers import host
        monkeypatch.setattr(host, "default_link", host.EmulatedLink)
    budget = budgets(resnet_trace)["half"]

    class Interrupt(Exception):
        pass

    def step(w, interrupt):
        loss = w.loss()
        if interrupt:
            raise Interrupt()
        loss.backward()
        w.optimizer.step()
        w.optimizer.zero_grad()
        return loss

    plain, managed = build("resnet18-tiny", "sgd"), build("resnet18-tiny", "sgd")
    with outcore.OutOfCore(budget=budget, offload=offload, min_move_bytes=0) as ooc:
        for it in range(5):
            interrupt = it == 3
            for w, managed_run in ((plain, False), (managed, True)):
                try:
                    if managed_run:
                        with ooc.iteration():
                            step(w, interrupt)
                    else:
                        step(w, interrupt)
                except Interrupt:
                    pass
            # Between iterations everything is plain, readable PyTorch.
            for p in managed.model.parameters():
                assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
        report = ooc.report()
    assert_bitwise_equal(state_of(plain.model, plain.optimizer), state_of(managed.model, managed.optimizer))
    assert [it.completed for it in report.iterations] == [True, True, True, False, True]


def test_keyboard_interrupt_in_a_child_leaves_no_swap(tmp_path):
    child = textwrap.dedent(f"""
        import os, signal, threading, torch, outcore
        from outcore import workloads
        w = workloads.build("mlp", batch=64, optimizer="sgd")
        ooc = outcore.OutOfCore(budget="12MiB", swap_dir={str(tmp_path)!r}, min_move_bytes=0)
        for i in range(10**6):
            with ooc.iteration():
                w.step()
            if i == 2:                # recorded, planned, and replaying from now on
                print("READY", flush=True)
    """)
    proc = zygote.Child(["-c", child])
    assert proc.stdout.readline().strip() == "READY"
    import time
    time.sleep(0.5)                   # a few iterations on
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "KeyboardInterrupt" in err
    assert list(tmp_path.iterdir()) == []


def test_non_static_step_deviates_and_stays_exact(resnet_trace):
    budget = budgets(resnet_trace)["half"]

    def step(w, it):
        x, y = w.batch
        h = w.model(x)
        if it == 3:                   # data-dependent control flow: an extra op
            h = h * 1.0
        loss = torch.nn.functional.cross_entropy(h, y)
        loss.backward()
        w.optimizer.step()
        w.optimizer.zero_grad()
        return loss

    plain, managed = build("resnet18-tiny", "sgd"), build("resnet18-tiny", "sgd")
    with outcore.OutOfCore(budget=budget, min_move_bytes=0) as ooc:
        for it in range(6):
            step(plain, it)
            with ooc.iteration():
                step(managed, it)
        report = ooc.report()
    assert_bitwise_equal(state_of(plain.model, plain.optimizer), state_of(managed.model, managed.optimizer))
    assert report.deviations == 1, str(report)
    modes = [it.mode for it in report.iterations]
    # A shape seen once is a one-off: the next iteration replays the plan it left
    # (NOTE [Step shapes] in run/plans.py, rule 3), with no recording.
    assert modes[3:] == ["replay"] * 3, modes
    assert all(it.deviation is None for it in report.iterations[4:]), str(report)


def test_a_smaller_batch_replays_a_larger_one_deviates_and_both_stay_exact(resnet_trace):
    """NOTE [Step shapes] rule 10: a batch of 4 replays the plan of 8; one of 16 leaves
    it, and the next iteration is recorded."""
    budget = budgets(resnet_trace)["half"]
    plain, managed = build("resnet18-tiny", "sgd"), build("resnet18-tiny", "sgd")
    small = tuple(t[:4] for t in plain.batch)
    large = tuple(torch.cat([t, t]) for t in plain.batch)
    with outcore.OutOfCore(budget=budget, min_move_bytes=0) as ooc:
        for it in range(7):
            for w in (plain, managed):
                w.batch = small if it == 3 else large if it == 4 else tuple(
                    t for t in build("resnet18-tiny", "sgd").batch)
            plain.step()
            with ooc.iteration():
                managed.step()
        report = ooc.report()
    assert_bitwise_equal(state_of(plain.model, plain.optimizer), state_of(managed.model, managed.optimizer))
    its = report.iterations
    assert its[3].deviation is None and its[3].smaller, str(report)
    assert its[4].deviation is not None and its[4].outgrew, str(report)
    assert its[5].mode == "record" and its[6].mode == "replay" and not its[6].deviation, str(report)
    assert all(it.peak_resident <= budget for it in its), str(report)


def test_reading_and_saving_between_iterations(resnet_trace, tmp_path):
    budget = budgets(resnet_trace)["half"]
    plain, managed = build("resnet18-tiny", "sgd"), build("resnet18-tiny", "sgd")
    with outcore.OutOfCore(budget=budget, min_move_bytes=0) as ooc:
        for it in range(4):
            plain.step()
            with ooc.iteration():
                managed.step()
            for (name, p), q in zip(managed.model.named_parameters(), plain.model.parameters()):
                assert torch.equal(p, q), name
                assert np.array_equal(p.detach().numpy(), q.detach().numpy())
                assert p.sum().item() == q.sum().item()
            small = managed.model.bn1.weight
            assert small.detach().tolist() == plain.model.bn1.weight.detach().tolist()
            text = repr(next(managed.model.parameters()))
            assert "tensor" in text.lower() or "Parameter" in text
            buf = io.BytesIO()
            torch.save(managed.model.state_dict(), buf)
            buf.seek(0)
            loaded = torch.load(buf)
            for k, v in plain.model.state_dict().items():
                assert torch.equal(loaded[k], v)
            managed.model.eval()
            with torch.no_grad():
                assert torch.equal(managed.model(managed.batch[0]), plain.model.eval()(plain.batch[0]))
            managed.model.train(), plain.model.train()
    assert ooc.report().iterations[-1].bytes_written > 0


def test_from_numpy_tensor_in_the_step(resnet_trace):
    budget = budgets(resnet_trace)["half"]
    plain = build("resnet18-tiny", "sgd")
    images = plain.batch[0].numpy().copy()

    def step(w):
        x = torch.from_numpy(images)          # not resizable: stays in place
        loss = torch.nn.functional.cross_entropy(w.model(x), w.batch[1])
        loss.backward(); w.optimizer.step(); w.optimizer.zero_grad()
        return loss
    with outcore.OutOfCore(budget=budget, min_move_bytes=0) as ooc:
        assert_same_training(train_twins(lambda: build("resnet18-tiny", "sgd"), step, ooc))
    assert np.array_equal(images, plain.batch[0].numpy())     # the numpy memory is untouched


def test_everything_fits_follows_the_step_without_tracking(resnet_trace):
    budget = 2 * resnet_trace.peak(actual=True)[0]

    def step(w, it):
        h = w.model(w.batch[0])
        if it == 3:
            h = h * 1.0               # the step changes: noticed even though nothing moves
        loss = torch.nn.functional.cross_entropy(h, w.batch[1])
        loss.backward(); w.optimizer.step(); w.optimizer.zero_grad()

    plain, managed = build("resnet18-tiny", "sgd"), build("resnet18-tiny", "sgd")
    with outcore.OutOfCore(budget=budget, min_move_bytes=0) as ooc:
        for it in range(6):
            step(plain, it)
            with ooc.iteration():
                step(managed, it)
        report = ooc.report()
    assert_bitwise_equal(state_of(plain.model, plain.optimizer), state_of(managed.model, managed.optimizer))
    # The changed step is a one-off: the plan it left replays after it (NOTE [Step
    # shapes] in run/plans.py, rule 3), tracking its ops while the last iterations had
    # two shapes (rule 4).
    assert [it.mode for it in report.iterations] == ["record", "record"] + ["replay"] * 4
    assert not report.iterations[2].tracked and report.iterations[3].deviation
    assert all(it.tracked and it.deviation is None for it in report.iterations[4:]), str(report)
    assert all(it.bytes_written == 0 for it in report.iterations)


def test_direct_reads_inside_an_iteration_see_the_right_values(resnet_trace):
    """A large tensor made at the start of the step and read with `.numpy()`, `.tolist()`
    and `np.asarray` only at its end is swapped out in between (the recording iterations
    evict it on-demand). Those methods reach the storage through aten ops (the dispatcher
    then restores it); this test fails if that ever stops being true."""
    budget = budgets(resnet_trace)["tight"]
    seen = {"plain": [], "ooc": []}

    def step(w, key, it):
        kept = torch.full((1 << 17,), float(it + 1)) * 3        # 512 KiB, held by this variable
        loss = w.loss()
        loss.backward(); w.optimizer.step(); w.optimizer.zero_grad()
        seen[key].append((kept.numpy().sum(), sum(kept.tolist()), np.asarray(kept).max()))
        return loss

    plain, managed = build("resnet18-tiny", "sgd"), build("resnet18-tiny", "sgd")
    with outcore.OutOfCore(budget=budget, min_move_bytes=0) as ooc:
        for it in range(4):
            step(plain, "plain", it)
            with ooc.iteration():
                step(managed, "ooc", it)
        replays = [r for r in ooc.report().iterations if r.mode == "replay"]
    assert replays and all(r.bytes_written > 0 for r in replays)
    assert seen["plain"] == seen["ooc"]
    assert seen["ooc"][-1][2] == 12.0
    assert_bitwise_equal(state_of(plain.model, plain.optimizer), state_of(managed.model, managed.optimizer))


def test_data_ptr_of_a_tensor_on_the_slow_tier_is_refused_inside_a_block(tmp_path):
    """NOTE [Sharing a storage outcore moves] rule 18 (helper-141): inside a block every
    tensor outcore has on the slow tier had data_ptr() 0, so `{p.data_ptr(): p}` (the
    idiom that skips tied weights) merged different parameters and trained on wrong
    values without an error. It is refused now, saying what to do; a tensor with memory
    gets its address, and between iterations every parameter has its own. PyTorch's
    own code gets PyTorch's answer (helper-142: `allow_mutation_on_saved_tensors` keys
    by identity and version beside it, and raising broke it)."""
    class Weight(torch.nn.Parameter):
        pass

    ooc = outcore.OutOfCore("1MiB", swap_dir=str(tmp_path))
    with ooc.building():
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
        for layer in model:                           # a subclass of Parameter too
            layer.weight = Weight(layer.weight.detach().clone())
    params = list(model.parameters())
    with ooc:
        with pytest.raises(outcore.OutcoreError, match=r"data_ptr\(\).*slow tier.*identity"):
            with ooc.iteration():
                fresh = torch.ones(4)
                assert fresh.data_ptr() != 0                  # memory of its own: PyTorch's
                slow = [p for p in params if ooc._res.entries[p.untyped_storage()._cdata]
                        .state is outcore.states.SLOW]
                assert any(isinstance(p, Weight) for p in slow) and len(slow) > 1
                assert torch.autograd.graph._get_sid(slow[0])[0] == 0     # torch's own
                {p.data_ptr(): p for p in slow if isinstance(p, Weight)}
        ptrs = {p.data_ptr() for p in params}                 # between iterations: mapped
        assert 0 not in ptrs and len(ptrs) == len(params)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with ooc.iteration():                                 # the OutOfCore goes on
            model(torch.randn(2, 256)).sum().backward()
            opt.step()


def test_a_tensor_mapped_between_iterations_that_cannot_grow_says_what_to_do(tmp_path):
    """NOTE [Sharing a storage outcore moves] rule 19 (helper-141): `resize_()` past the
    size of a storage outcore keeps mapped between iterations raised PyTorch's "Trying
    to resize storage that is not resizable" and left the tensor with the new shape over
    the old storage. Now an OutcoreError says why and what to do, and the tensor keeps
    its shape and values; a resize within the storage is PyTorch's."""
    ooc = outcore.OutOfCore("2MiB", swap_dir=str(tmp_path))
    with ooc:
        buf = torch.arange(512 * 256, dtype=torch.float32).reshape(512, 256)   # 512 KiB
        with ooc.iteration():
            buf.sum()
            keep = [torch.full((512, 256), float(i)) for i in range(4)]  # buf moves out
        del keep
        entry = ooc._res.entries[buf.untyped_storage()._cdata]
        assert str(entry.state) == "on the slow tier, mapped for use between iterations"
        with pytest.raises(outcore.OutcoreError, match=r"resize_\(\).*cannot grow.*torch\.cat"):
            buf.resize_(600, 256)
        assert buf.shape == (512, 256)
        assert torch.equal(buf, torch.arange(512 * 256, dtype=torch.float32).reshape(512, 256))
        buf.resize_(256, 256)                         # within the storage: PyTorch's own
        assert buf.shape == (256, 256)


@pytest.mark.parametrize("where", ["backward after the block", "backward inside",
                                   "evaluation under no_grad", "forward keeping only the loss"])
def test_a_backward_after_the_block_is_named_once(where, caplog, tmp_path):
    """A new user's first loop: `with ooc.iteration(): loss = model(x)`, then
    `loss.backward(); opt.step()` after the block. It trained bitwise and silently, with
    the backward and the update outside the budget (nothing planned or moved there):
    the first recording that leaves a forward's graph alive with no backward says so,
    once per OutOfCore. A step whose backward is inside, an evaluation under no_grad and
    a forward whose graph dies in the block (its loss detached) say nothing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(6)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level("WARNING", logger="outcore"):
        with outcore.OutOfCore("1MiB", swap_dir=str(tmp_path), min_move_bytes=0) as ooc:
            for _ in range(3):
                x = torch.randn(128, 256)
                with ooc.iteration():
                    if where == "evaluation under no_grad":
                        with torch.no_grad():
                            loss = model(x).square().mean()
                    else:
                        loss = model(x).square().mean()
                    if where == "backward inside":
                        loss.backward()
                        opt.step()
                        opt.zero_grad()
                    elif where == "forward keeping only the loss":
                        loss = loss.detach()      # the graph dies in the block
                if where == "backward after the block":
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
    warned = [r for r in caplog.records if "no backward" in r.getMessage()]
    if where == "backward after the block":
        assert len(warned) == 1, caplog.text
        assert "outside the budget" in warned[0].getMessage()
        assert "iteration 1 " in warned[0].getMessage()
    else:
        assert warned == [], caplog.text


@pytest.mark.parametrize("where", ["inside", "after the block", "another model's after"])
def test_an_optimizer_step_after_the_block_is_named_once(where, caplog, tmp_path):
    """helper-153: backward inside the block, clipping and optimizer.step() after it:
    bitwise, but the step and Adam's state ran outside the budget (51 MiB unmanaged at a
    10 MiB budget), and nothing said so. The first such step on parameters outcore
    manages says so, once; an optimizer of parameters it does not manage says nothing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(6)])
    opt = torch.optim.Adam(model.parameters())
    other = torch.nn.Linear(256, 256)
    other_opt = torch.optim.Adam(other.parameters())
    hooks = dict(_global_optimizer_pre_hooks)
    with caplog.at_level("WARNING", logger="outcore"):
        with outcore.OutOfCore("1MiB", swap_dir=str(tmp_path), min_move_bytes=0) as ooc:
            for _ in range(3):
                with ooc.iteration():
                    model(torch.randn(128, 256)).square().mean().backward()
                    if where != "after the block":
                        opt.step()
                        opt.zero_grad()
                if where == "after the block":
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    opt.zero_grad()
                elif where == "another model's after":
                    other(torch.randn(8, 256)).sum().backward()
                    other_opt.step()
        assert dict(_global_optimizer_pre_hooks) == hooks      # close() took its hook out
        opt.step()
    warned = [r.getMessage() for r in caplog.records if "ran outside" in r.getMessage()]
    if where == "after the block":
        assert len(warned) == 1 and warned[0].startswith("Adam.step() ran outside"), warned
    else:
        assert warned == [], caplog.text
