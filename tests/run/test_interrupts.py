"""Interrupts and faults at every kind of point of the executor leave nothing corrupted.

Each case sends SIGINT to this process (or raises) from inside one of outcore's own
functions, on the n-th call, in a replayed or recording iteration. The contract
(ooc.py, `_Iteration`): the user sees KeyboardInterrupt; every storage has its full
size; the residency counters equal a recount; `close()` and later iterations work; and
training continued from that state is bitwise equal to plain PyTorch continued from it.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import signal
import sys
import threading
import weakref

import pytest
import torch

import outcore
from outcore.states import SLOW
from outcore.run import interrupts
from outcore.run.movers.disk import DiskMover
from outcore.run.ooc import _Iteration
from outcore.run.replay import Replayer
from outcore.run.residency import Residency

from ..trace.helpers import assert_bitwise_equal, state_of
from .twins import budgets, build, ctrl_c_as_a_read_begins, steady_trace


@pytest.fixture(scope="module")
def mlp_budget():
    return budgets(steady_trace("mlp-tiny", "adam"))["tight"]


def _storages(w):
    out = [t for t in w.model.state_dict().values()]
    out += [p.grad for p in w.model.parameters() if p.grad is not None]
    for state in w.optimizer.state.values():
        out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def assert_whole(w):
    for t in _storages(w):
        assert t.untyped_storage().nbytes() >= (t.storage_offset() + t.numel()) * t.element_size()
        assert torch.isfinite(t.float()).all()


def train(ooc, w, iterations=3):
    for _ in range(iterations):
        with ooc.iteration():
            w.step()


def assert_intact(w, ooc):
    assert_whole(w)
    repr(next(w.model.parameters()))
    copy.deepcopy(w.model)
    res = ooc._res
    gc.collect()
    counted = res.recount()             # retires storages that died meanwhile first
    assert (res.resident, res.offloaded) == counted
    # between iterations nothing is unusable: what is on the slow tier is mapped
    assert not [e for e in res.entries.values() if e.ref() is not None and e.state is SLOW]
    assert not ooc._active


def warm(name, optimizer):
    w = build(name, optimizer)
    w.step()
    return w


def continue_like_plain(w, ooc, iterations=3):
    """A plain twin takes over w's exact state (w is an "mlp-tiny" with Adam); both train
    on; they must stay equal."""
    twin = warm("mlp-tiny", "adam")
    twin.model.load_state_dict(copy.deepcopy(w.model.state_dict()))
    twin.optimizer.load_state_dict(copy.deepcopy(w.optimizer.state_dict()))
    for p, q in zip(twin.model.parameters(), w.model.parameters()):
        p.grad = None if q.grad is None else q.grad.detach().clone()
    for _ in range(iterations):
        twin.step()
        with ooc.iteration():
            w.step()
    assert_bitwise_equal(state_of(twin.model, twin.optimizer), state_of(w.model, w.optimizer))


def _sigint():
    signal.raise_signal(signal.SIGINT)


def _interrupt_on_call(monkeypatch, owner, name, n, action=_sigint):
    """Make the n-th call of owner.name run `action` (SIGINT to this process) first."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            action()
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapper)
    return calls


# (owner, method, which call): points in the executor where an interrupt may land.
POINTS = [
    (Residency, "_wait", 3), (Residency, "_wait", 40),
    (Residency, "evict", 5), (Residency, "finish", 7), (Residency, "restore", 4),
    (Residency, "ready_all", 30), (Residency, "_ready", 6), (Residency, "track", 12),
    (Residency, "map_slow", 3),
    (Residency, "unmap_all", 3), (Residency, "_unmap", 4),
    (Residency, "settle", 2), (Residency, "_reap_dead", 5),
    (Replayer, "start", 1), (Replayer, "finish", 1), (Replayer, "_actions", 20),
    (_Iteration, "_begin", 3), (_Iteration, "_end", 3), (_Iteration, "_account", 2),
]


def interrupted_then_plain(monkeypatch, w, ooc, owner, name, n, again=None) -> None:
    """SIGINT at the n-th call of owner.name while `ooc` trains `w`: the iteration ends
    with KeyboardInterrupt, everything is intact, and training goes on bitwise equal to
    a plain twin. `again` re-applies the test's own patches after the interrupt's are
    undone (monkeypatch.undo() takes them all)."""
    try:
        calls = _interrupt_on_call(monkeypatch, owner, name, n)
        with pytest.raises(KeyboardInterrupt):
            for _ in range(8):
                with ooc.iteration():
                    w.step()
        assert calls["n"] >= n, f"{owner.__name__}.{name} was called {calls['n']} times"
        monkeypatch.undo()
        if again is not None:
            again()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert_intact(w, ooc)
        continue_like_plain(w, ooc)
        assert_intact(w, ooc)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("owner,name,n", POINTS, ids=[f"{o.__name__}.{m}#{n}" for o, m, n in POINTS])
def test_sigint_inside_the_executor(monkeypatch, mlp_budget, owner, name, n):
    # One plain step first: Adam's lazily created state exists before any interrupt (an
    # interrupt inside its creation breaks the optimizer in plain PyTorch just the same).
    w = warm("mlp-tiny", "adam")
    with outcore.OutOfCore(budget=mlp_budget, min_move_bytes=0) as ooc:
        interrupted_then_plain(monkeypatch, w, ooc, owner, name, n)


def _memory_error_then_plain(monkeypatch, budget, owner, name, n, raised, match) -> None:
    """A MemoryError at the n-th call of owner.name: the iteration raises `raised`
    (matching `match`), everything is intact, and training goes on like a plain twin."""
    w = warm("mlp-tiny", "adam")
    with outcore.OutOfCore(budget=budget, min_move_bytes=0) as ooc:
        def boom():
            raise MemoryError("injected")
        _interrupt_on_call(monkeypatch, owner, name, n, boom)
        with pytest.raises(raised, match=match):
            for _ in range(4):
                with ooc.iteration():
                    w.step()
        monkeypatch.undo()
        assert_intact(w, ooc)
        continue_like_plain(w, ooc)


def test_exception_in_the_write_thread_keeps_the_tensor(monkeypatch, mlp_budget):
    """A non-I/O failure inside the mover's worker thread (here a MemoryError) becomes an
    OutcoreError; the tensor it was writing stays in RAM, intact."""
    _memory_error_then_plain(monkeypatch, mlp_budget, DiskMover, "_write", 10,
                             outcore.OutcoreError, "nothing was lost")


def test_an_error_while_the_replay_is_set_up_reaches_the_user(monkeypatch, mlp_budget):
    """The replayer's construction fails (here a MemoryError, at the first replay): the
    user sees that error, not one from the iteration's accounting after it, and
    nothing is lost."""
    _memory_error_then_plain(monkeypatch, mlp_budget, Replayer, "_recompute_state", 1,
                             MemoryError, "injected")


def test_a_signal_in_a_held_section_is_delivered_at_its_end():
    shield = interrupts.Shield()
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        shield.install()
        shield.enter()
        signal.raise_signal(signal.SIGUSR1)
        for _ in range(1000):          # bytecodes run: the handler had every chance
            pass
        assert seen == [] and len(shield.pending) == 1
        shield.exit()
        assert seen == [signal.SIGUSR1]
        signal.raise_signal(signal.SIGUSR1)      # outside a held section: at once
        assert seen == [signal.SIGUSR1] * 2
        shield.enter()
        mine = lambda signum, frame: None        # noqa: E731 - a user handler set meanwhile
        signal.signal(signal.SIGUSR1, mine)
        shield.uninstall()
        shield.exit()
        assert signal.getsignal(signal.SIGUSR1) is mine        # theirs is left alone
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_in_a_weakref_callback_is_not_lost():
    # Python swallows exceptions raised in weakref callbacks; a KeyboardInterrupt raised
    # in outcore's storage-death callback was printed as "Exception ignored" and the
    # training loop ran on (seen once in tests/run/test_safety.py's Ctrl-C child).
    # NOTE [Interrupts] rule 6: the signal is noted there and raised at the next end of
    # a held section.
    from outcore.run import headroom, residency
    assert residency._note_death.__code__ in interrupts.SWALLOWING
    assert headroom._gone.__code__ in interrupts.SWALLOWING     # helper-123
    shield = interrupts.Shield()
    fired = []

    @interrupts.no_raise
    def callback(_ref):           # stands in for _note_death: raises the signal inside
        signal.raise_signal(signal.SIGINT)
        for _ in range(1000):     # bytecodes run: the handler had every chance
            pass
        fired.append(True)
    try:
        shield.install()
        storage = torch.UntypedStorage(8)
        ref = weakref.ref(storage, callback)
        del storage
        gc.collect()
        assert fired == [True] and ref() is None and len(shield.pending) == 1
        shield.enter()
        with pytest.raises(KeyboardInterrupt):
            shield.exit()
    finally:
        shield.enter()
        shield.uninstall()
        shield.depth = 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_callback_run_while_the_guard_is_being_installed_leaves_ctrl_c_working(monkeypatch):
    """helper-135: swapping a handler allocates, so the collector may run another
    outcore callback while a callback's guard (NOTE [Interrupts] rule 8) is being
    installed. That one installed it again over the half-made list of saved handlers,
    and SIGINT's handler was left the guard's with nothing saved: no Ctrl-C reached the
    user again. Here the nested callback runs right after the first handler swap."""
    import _signal
    import time
    nested = interrupts.no_raise(lambda: None)
    outer = interrupts.no_raise(lambda: None)
    real, ran = _signal.signal, []

    def swap(signum, handler):
        previous = real(signum, handler)
        if not ran:
            ran.append(True)
            nested()                       # as the collector would run it here
        return previous
    monkeypatch.setattr(_signal, "signal", swap)
    outer()
    monkeypatch.undo()
    assert ran and interrupts._installed == [0]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pass


def test_a_ctrl_c_as_a_callbacks_guard_comes_down_is_raised_once(monkeypatch):
    """helper-136: a SIGINT landing as a callback's guard is taken down (the guard still
    SIGINT's handler) was noted and sent again, and the user got it; but it stayed
    noted, the next callback left the guard installed for it, and the next held section
    raised it a second time."""
    import _signal
    import time
    real, shot = _signal.getsignal, []

    def getsignal(signum):
        if sys._getframe(1).f_code.co_name == "uninstall" and not shot:
            shot.append(True)
            signal.raise_signal(signal.SIGINT)       # lands here, in the callback
        return real(signum)

    class Target:
        pass
    callback = interrupts.no_raise(lambda ref: None)
    monkeypatch.setattr(_signal, "getsignal", getsignal)
    target = Target()
    ref = weakref.ref(target, callback)
    del target                                       # the callback runs
    monkeypatch.undo()
    raised = 0
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        try:
            while time.monotonic() < deadline:
                pass
        except KeyboardInterrupt:
            raised += 1
    target = Target()
    ref = weakref.ref(target, callback)              # an ordinary callback after it
    del target
    assert shot and raised == 1 and ref() is None
    assert interrupts._installed == [0]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    shield = interrupts.Shield()
    shield.install()
    shield.enter()
    shield.exit()                                    # nothing left to raise here
    shield.enter()
    shield.uninstall()
    shield.exit()


@pytest.mark.parametrize("when", ["between iterations", "after close"])
def test_a_ctrl_c_while_a_mapped_storage_is_dropped_reaches_the_user(tmp_path, when):
    """helper-133: between iterations and after close() no shield is installed, and a
    Ctrl-C landing in the finalizer that unmaps a storage mapped from the swap file (the
    user drops the model) was swallowed ("Exception ignored"; 20 of 24 at random
    moments) and left that region mapped for good. NOTE [Interrupts] rule 8: it is
    noted there and sent again once the callbacks have ended. Here a real SIGINT is
    sent as `_unmap` starts, as a Ctrl-C landing there would be."""
    import os
    import sys
    import time
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(6)])
    opt = torch.optim.Adam(model.parameters())
    ooc = outcore.OutOfCore("4MiB", swap_dir=tmp_path)
    for _ in range(3):
        with ooc.iteration():
            model(torch.ones(8, 512)).sum().backward()
            opt.step()
            opt.zero_grad()
    if when == "after close":
        ooc.close()
    sent, unraisable = [], []
    previous_hook = sys.unraisablehook

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "_unmap" and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
    sys.unraisablehook = unraisable.append
    try:
        with pytest.raises(KeyboardInterrupt):
            sys.setprofile(profile)
            try:
                del model, opt
                gc.collect()
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:       # it arrives within milliseconds
                    pass
            finally:
                sys.setprofile(None)
    finally:
        sys.unraisablehook = previous_hook
    assert sent and not unraisable
    ooc.close()
    gc.collect()
    with open("/proc/self/maps") as maps:
        assert not [line for line in maps if str(tmp_path) in line]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_in_the_recorders_storage_death_callback_is_not_lost(tmp_path):
    # helper-102: the recording iteration's own weakref callback (trace/recorder.py,
    # `storage_died`) was not `no_raise`: a Ctrl-C at random moments of a notebook's
    # training cell once printed "Exception ignored in ... storage_died" with a
    # KeyboardInterrupt and the loop ran on. Here the handler is called in that
    # callback's frame, as Python calls it when the signal lands there.
    import sys
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(64, 256)
    fired, unraisable = [], []
    previous_trace, previous_hook = sys.gettrace(), sys.unraisablehook

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "storage_died" and not fired:
            fired.append(True)
            signal.getsignal(signal.SIGINT)(signal.SIGINT, frame)
        return None
    with outcore.OutOfCore("4MiB", swap_dir=tmp_path) as ooc:
        sys.unraisablehook = unraisable.append
        try:
            with pytest.raises(KeyboardInterrupt):
                with ooc.iteration():          # the first: it records
                    sys.settrace(tracer)
                    try:
                        model(x).sum().backward()
                        opt.step()
                        opt.zero_grad()
                    finally:
                        sys.settrace(previous_trace)
        finally:
            sys.unraisablehook = previous_hook
        assert fired and not unraisable
        with ooc.iteration():                  # and the next one runs
            model(x).sum().backward()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_in_what_a_finalizer_calls_is_not_lost(tmp_path):
    # Every weakref.finalize callback (outcore's unmapping of a mapped storage, the
    # release of a host segment, the end of a numpy export) runs through
    # `weakref.finalize.__call__`, where Python swallows exceptions: a Ctrl-C landing in
    # the function it calls, or in one that function calls, was printed as "Exception
    # ignored" and lost, and the callback stopped halfway. Here the handler is called in
    # the frame of a function the finalizer's callback calls, as Python calls it when
    # the signal lands there (NOTE [Interrupts] rule 6); the callback then runs an op,
    # whose held section ends inside the finalizer: the signal must not be handed over
    # there either (helper-107).
    import sys
    import weakref
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 10))
    x = torch.randn(64, 256)
    fired, unraisable, released = [], [], []
    previous_trace, previous_hook = sys.gettrace(), sys.unraisablehook

    def let_go(token):
        pass

    def callback(token):
        let_go(token)
        torch.ones(4).add_(1)          # an op of the finalizer's: a held section ends
        released.append(token)

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code is let_go.__code__ and not fired:
            fired.append(True)
            signal.getsignal(signal.SIGINT)(signal.SIGINT, frame)
        return None

    class Held:
        pass
    with outcore.OutOfCore("4MiB", swap_dir=tmp_path) as ooc:
        for _ in range(2):
            with ooc.iteration():
                model(x).sum().backward()
        sys.unraisablehook = unraisable.append
        try:
            with pytest.raises(KeyboardInterrupt):
                with ooc.iteration():
                    held = Held()
                    weakref.finalize(held, callback, "segment")
                    sys.settrace(tracer)
                    try:
                        del held                   # the finalizer runs here
                    finally:
                        sys.settrace(previous_trace)
                    model(x).sum().backward()
        finally:
            sys.unraisablehook = previous_hook
        assert fired and not unraisable
        assert released == ["segment"]             # the callback ran to its end
        with ooc.iteration():                      # and the next iteration runs
            model(x).sum().backward()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_install_from_another_thread_does_nothing():
    shield = interrupts.Shield()
    thread = threading.Thread(target=shield.install)
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_one_open_outofcore_per_process(tmp_path):
    first = outcore.OutOfCore(budget="64MiB")
    with pytest.raises(outcore.OutcoreError, match="another OutOfCore.*close"):
        outcore.OutOfCore(budget="64MiB")
    first.close()
    second = outcore.OutOfCore(budget="64MiB")
    del second                      # never closed: garbage collection gives it all back
    third = outcore.OutOfCore(budget="64MiB", swap_dir=str(tmp_path))
    third.close()
    assert list(tmp_path.iterdir()) == []
    assert outcore.open_outofcore() is None


def test_an_outofcore_no_name_holds_can_be_closed(tmp_path):
    """helper-102: after an exception in a notebook cell, IPython's stored traceback (here
    a list standing in for it) keeps the OutOfCore of the cell open, and the user, whose
    name for it is gone, had no way to close it; a new one was refused. The error says
    how, and outcore.open_outofcore() gives it."""
    kept = [outcore.OutOfCore(budget="64MiB", swap_dir=str(tmp_path))]
    with pytest.raises(outcore.OutcoreError, match=r"outcore\.open_outofcore\(\)\.close\(\)"):
        outcore.OutOfCore(budget="64MiB")
    assert outcore.open_outofcore() is kept[0]
    outcore.open_outofcore().close()
    assert outcore.open_outofcore() is None and kept[0].closed
    with outcore.OutOfCore(budget="64MiB", swap_dir=str(tmp_path)):
        pass


def test_two_threads_making_an_outofcore_at_once_open_one(monkeypatch, tmp_path):
    """helper-154: an OutOfCore being made is closed until it is built, and a second
    thread making one meanwhile found the slot free: both opened (20 of 20 tries)."""
    from outcore.run import ooc as ooc_module
    claimed, go = threading.Event(), threading.Event()
    real = ooc_module.torch_huge_pages

    def held():                    # runs after the slot is claimed
        claimed.set()
        go.wait(30)
        return real()
    monkeypatch.setattr(ooc_module, "torch_huge_pages", held)
    made = []
    thread = threading.Thread(target=lambda: made.append(outcore.OutOfCore("4MiB")))
    thread.start()
    assert claimed.wait(30)
    try:
        with pytest.raises(outcore.OutcoreError, match="another OutOfCore is being made"):
            outcore.OutOfCore("4MiB", swap_dir=str(tmp_path))
    finally:
        go.set()
        thread.join()
    assert outcore.open_outofcore() is made[0] and not made[0].closed
    made[0].close()
    assert list(tmp_path.iterdir()) == []


# Points inside OutOfCore(...) where a Ctrl-C may land: once it holds the process's slot,
# after the unnamed swap file is open, after the named fallback's private directory is
# made, while the state directory is set up, after the swap file is open there, and at
# the end of building.
BUILD_POINTS = ["_claim", "_filesystem_type", "mkdir", "Durable", "_open_kept", "make_governor"]


@pytest.mark.parametrize("point", BUILD_POINTS)
def test_a_ctrl_c_while_an_outofcore_is_made_leaves_nothing(monkeypatch, tmp_path, point):
    """The user sees KeyboardInterrupt; no descriptor, directory or file stays behind;
    and the next OutOfCore opens."""
    import inspect
    import os
    from outcore.run import ooc as ooc_module
    from outcore.run.movers import disk

    def after(owner, name):
        real = getattr(owner, name)

        def call(*args, **kwargs):
            result = real(*args, **kwargs)
            _sigint()                    # lands at the next bytecode, as a Ctrl-C would
            return result
        static = isinstance(inspect.getattr_static(owner, name), staticmethod)
        monkeypatch.setattr(owner, name, staticmethod(call) if static else call)
    kwargs = {"swap_dir": str(tmp_path / "swap")}
    os.mkdir(kwargs["swap_dir"])
    if point == "mkdir":                 # the named fallback: O_TMPFILE refused
        monkeypatch.setattr(disk, "_open_unnamed", lambda base: None)
        after(disk.os, "mkdir")
    elif point in ("Durable", "_open_kept"):
        kwargs["state_dir"] = str(tmp_path / "state")
        after(*((ooc_module, "Durable") if point == "Durable" else (DiskMover, "_open_kept")))
    else:
        after(disk if point == "_filesystem_type" else ooc_module, point)
    # (at "_claim" the slot must be given back: the last line opens another)
    descriptors = set(os.listdir("/proc/self/fd"))
    with pytest.raises(KeyboardInterrupt):
        outcore.OutOfCore("4MiB", **kwargs)
    monkeypatch.undo()
    gc.collect()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    left = {d for d in set(os.listdir("/proc/self/fd")) - descriptors
            if os.path.exists(f"/proc/self/fd/{d}")}
    assert not left, [os.readlink(f"/proc/self/fd/{d}") for d in left]
    assert os.listdir(kwargs["swap_dir"]) == []
    outcore.OutOfCore("4MiB", **kwargs).close()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "1e400", "1e400GiB", -5, "lots", True])
def test_every_invalid_budget_is_an_outcore_error(value):
    with pytest.raises(outcore.OutcoreError):
        outcore.OutOfCore(budget=value)


def _failing_reads(monkeypatch, first: int, last: float):
    """os.preadv in the disk mover fails with EIO from its `first`-th call to its `last`-th."""
    import errno
    import os as _os

    from outcore.run.movers import disk
    real, calls = _os.preadv, {"n": 0}

    def preadv(fd, buffers, offset):
        calls["n"] += 1
        if first <= calls["n"] <= last:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)
    monkeypatch.setattr(disk.os, "preadv", preadv)
    return calls


def test_a_transient_read_error_is_retried_and_loses_nothing(monkeypatch, mlp_budget):
    w = warm("mlp-tiny", "adam")
    with outcore.OutOfCore(budget=mlp_budget, min_move_bytes=0) as ooc:
        train(ooc, w)
        calls = _failing_reads(monkeypatch, 1, 1)
        with pytest.warns(RuntimeWarning, match="trying again"):
            with ooc.iteration():
                w.step()
        assert calls["n"] > 1
        monkeypatch.undo()
        assert_intact(w, ooc)
        continue_like_plain(w, ooc)


@pytest.mark.parametrize("failing", ["first", "last"])
def test_a_retried_read_under_warnings_as_errors_loses_nothing(monkeypatch, mlp_budget, failing):
    """helper-168: with RuntimeWarning an error (`-W error`, pytest's filterwarnings), the
    retry's warning was raised before the read was issued again: the entry stayed
    "reading" with nothing in flight and its weight kept garbage, also after close().
    Raised at the end of the op instead, a read late in the step stopped it inside
    optimizer.step(), some parameters stepped and the rest not (helper-174). Now the
    warning is raised as the block ends (NOTE [Warnings as errors]): the step has run
    whole, as a plain twin's."""
    import warnings
    w = warm("mlp-tiny", "adam")
    with outcore.OutOfCore(budget=mlp_budget, min_move_bytes=0) as ooc:
        train(ooc, w)
        twin = warm("mlp-tiny", "adam")
        twin.model.load_state_dict(copy.deepcopy(w.model.state_dict()))
        twin.optimizer.load_state_dict(copy.deepcopy(w.optimizer.state_dict()))
        twin.step()
        reads = _failing_reads(monkeypatch, 0, -1)          # count this step's reads
        with ooc.iteration():
            w.step()
        n = reads["n"]
        assert n > 2
        monkeypatch.undo()
        twin.step()
        at = 1 if failing == "first" else n - 1
        calls = _failing_reads(monkeypatch, at, at)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with pytest.raises(RuntimeWarning, match="trying again"):
                with ooc.iteration():
                    w.step()
        assert calls["n"] > at
        monkeypatch.undo()
        assert_intact(w, ooc)
        assert_bitwise_equal(state_of(twin.model, twin.optimizer), state_of(w.model, w.optimizer))
        continue_like_plain(w, ooc)


def test_a_dead_disk_raises_and_close_reads_back_once_it_works(monkeypatch, mlp_budget):
    w = warm("mlp-tiny", "adam")
    with outcore.OutOfCore(budget=mlp_budget, min_move_bytes=0) as ooc:
        train(ooc, w)
        _failing_reads(monkeypatch, 1, float("inf"))
        with pytest.warns(RuntimeWarning), pytest.raises(outcore.OutcoreError,
                                                         match="failed 3 times.*still whole"):
            with ooc.iteration():
                w.step()
        assert_whole(w)                      # mapped from the swap file, as the error says
        monkeypatch.undo()                   # the disk works again
        ooc.close()                          # reads back what the failed reads left out
        assert_whole(w)


def test_a_signal_handler_that_reads_the_model_during_iterations(tmp_path):
    """helper-105: a SIGTERM handler that reads the parameters (a preemption handler that
    logs or saves a checkpoint), called while an iteration runs, died with a segmentation
    fault at every delay tried: the handler was handed the signal at the end of an op's
    held section, inside the mode's `__torch_dispatch__`, where PyTorch has the mode off
    its stack, so its ops ran past outcore on storages outcore had on the slow tier
    (NOTE [Interrupts] rule 7). Signals come every 50 ms from a thread, in
    a child process (a crash is its exit code); the handler only reads, so training
    stays bitwise equal to plain PyTorch. The iterations go on until the handler has run
    10 times (8 iterations took 0.5 s on a fast day: 9 signals, and the test failed)."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent(f"""
        import os, signal, threading, time
        import torch, outcore
        torch.set_num_threads(1)    # compared with plain PyTorch, which on two threads now
                                    # and then differs from itself (docs/executor.md)

        def make():
            torch.manual_seed(0)
            layers = []
            for _ in range(4):
                layers += [torch.nn.Linear(512, 512), torch.nn.ReLU()]
            model = torch.nn.Sequential(*layers, torch.nn.Linear(512, 10))
            return model, torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model, opt, i):
            g = torch.Generator().manual_seed(i)
            x, y = torch.randn(256, 512, generator=g), torch.randint(0, 10, (256,), generator=g)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()

        model, opt = make()
        seen = []

        def handler(signum, frame):
            seen.append(sum(float(p.detach().sum()) for p in model.parameters()))
        signal.signal(signal.SIGTERM, handler)
        done = threading.Event()

        def send():
            for _ in range(200):                   # at most: a slow handler ends
                if done.wait(0.05):
                    return
                os.kill(os.getpid(), signal.SIGTERM)
        ooc = outcore.OutOfCore("4MiB", swap_dir={str(tmp_path)!r})
        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        steps = 0
        while steps < 8 or len(seen) < 10 and steps < 60:
            with ooc.iteration():
                step(model, opt, steps)
            steps += 1
        done.set()
        thread.join()
        moved = sum(it.bytes_written for it in ooc.report().iterations)
        ooc.close()
        plain, plain_opt = make()
        for i in range(steps):
            step(plain, plain_opt, i)
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     plain.state_dict().values()))
        print("handled", len(seen), "moved", moved, "same", same)
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    words = proc.stdout.split()
    assert words[-1] == "True", proc.stdout
    assert int(words[words.index("handled") + 1]) >= 10, proc.stdout
    assert int(words[words.index("moved") + 1]) > 0, proc.stdout
    assert not list(tmp_path.iterdir())


def test_a_handler_handed_a_signal_while_recording_leaves_the_recording_whole(tmp_path):
    """helper-108: handing a noted signal over with the mode re-entered by its own
    `__enter__`/`__exit__` (NOTE [Interrupts] rule 7) built the recording's trace in the
    middle of the step, forgot the storages seen before, and left the recording's global
    optimizer hooks registered after close(). The mode is pushed and popped as
    TorchDispatchMode does it."""
    import sys
    from torch.optim import optimizer as optim_module
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(64, 256)
    hooks = (len(optim_module._global_optimizer_pre_hooks),
             len(optim_module._global_optimizer_post_hooks))
    seen, raised = [], []
    previous_trace = sys.gettrace()

    def handler(signum, frame):
        seen.append(sum(float(p.detach().sum()) for p in model.parameters()))

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "call_split" and not raised:
            raised.append(True)                # inside an op's held section
            signal.raise_signal(signal.SIGUSR1)
        return None
    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        with outcore.OutOfCore("4MiB", swap_dir=tmp_path) as ooc:
            with ooc.iteration():              # the first: it records
                sys.settrace(tracer)
                try:
                    model(x).sum().backward()
                finally:
                    sys.settrace(previous_trace)
                opt.step()
                opt.zero_grad()
            with ooc.iteration():
                model(x).sum().backward()
                opt.step()
                opt.zero_grad()
            assert ooc.report().iterations[0].mode == "record"
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert raised and len(seen) == 1
    assert (len(optim_module._global_optimizer_pre_hooks),
            len(optim_module._global_optimizer_post_hooks)) == hooks


def test_an_error_the_block_raised_is_not_noted_on_itself_again():
    """The block's end notes on the block's exception what went wrong while ending it,
    each once; not the exception itself again (helper-177: a read of a truncated swap file
    raised, and the same text came twice more as notes on it)."""
    from outcore.run.ooc import _raise_or_note
    raised = outcore.OutcoreError("reading 576.00 KiB from the swap file failed")
    other = outcore.OutcoreError("writing 1.00 KiB to the swap file failed")
    _raise_or_note(raised, [outcore.OutcoreError(str(raised)), other,
                            outcore.OutcoreError(str(other)), raised])
    assert raised.__notes__ == ["outcore: while ending the interrupted block: OutcoreError: "
                                "writing 1.00 KiB to the swap file failed"], raised.__notes__


def test_a_signal_at_exit_lets_the_release_of_an_unclosed_outofcore_finish(tmp_path):
    """A script that never closes its OutOfCore, whose SIGTERM handler calls sys.exit:
    a second SIGTERM landing in the release run at exit (weakref.finalize) stopped it
    halfway, the governor's settings not put back, and printed a traceback ("Exception
    ignored in atexit callback", helper-177). `_release` is `no_raise` now (NOTE [Interrupts]
    rule 8): the signal is noted, the release finishes, nothing is printed."""
    import subprocess
    import textwrap
    script = textwrap.dedent(f"""
        import os, signal, sys, torch, outcore
        from outcore.memory import malloc
        torch.set_num_threads(1)
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
        stop = malloc._Governor.stop
        def landing(self):
            os.kill(os.getpid(), signal.SIGTERM)         # lands inside the release
            stop(self)
            print("RELEASED", flush=True)
        malloc._Governor.stop = landing
        model = torch.nn.Linear(512, 512)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ooc = outcore.OutOfCore("6MiB", swap_dir={str(tmp_path)!r})
        for _ in range(3):
            with ooc.iteration():
                model(torch.randn(8, 512)).sum().backward()
                opt.step()
                opt.zero_grad()
        print("EXITING", flush=True)
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert "EXITING" in proc.stdout and "RELEASED" in proc.stdout, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())


def test_a_ctrl_c_inside_numpy_between_iterations_comes_after_it(tmp_path):
    """`.numpy()` between iterations reads a mapped tensor back first (sharing._prepare);
    no shield is installed there, and a Ctrl-C raised between the unmap and the read left
    the tensor empty on the slow tier (helper-179, through the same read for a collective).
    It is noted and handed over after (NOTE [Interrupts] rule 8)."""
    import os
    import time
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256))
    managed = copy.deepcopy(plain)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    managed_opt = torch.optim.Adam(managed.parameters(), lr=1e-3)
    x = torch.randn(64, 256)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                  # two models trained in turn: CHANGELOG 12-05
    try:
        with outcore.OutOfCore(1_100_000, swap_dir=str(tmp_path), min_move_bytes=0) as ooc:
            for _ in range(4):
                for model, opt in ((plain, plain_opt), (managed, managed_opt)):
                    with ooc.iteration() if model is managed else contextlib.nullcontext():
                        model(x).sum().backward()
                        opt.step()
                        opt.zero_grad()
            res = ooc._res
            state = [*managed.parameters(), *(t for st in managed_opt.state.values()
                                              for k, t in st.items() if k != "step")]
            twins = [*plain.parameters(), *(t for st in plain_opt.state.values()
                                            for k, t in st.items() if k != "step")]
            mapped = [i for i, t in enumerate(state)
                      if res.entry_of(t.untyped_storage()).state is outcore.states.MAPPED]
            assert mapped, "nothing on the slow tier"                  # what the test needs
            held = state[mapped[0]]
            ctrl_c_as_a_read_begins(res)
            with pytest.raises(KeyboardInterrupt):
                array = held.detach().numpy()
                time.sleep(5)                  # (handed over as the read ends: not reached)
            assert "restore" not in vars(res)   # it did land
            assert held.untyped_storage().nbytes() == held.nbytes
            assert torch.equal(held, twins[mapped[0]])
            # The same where rule 8's guard is up (a callback's Ctrl-C waits to be sent
            # again): with the guard left installed it reached the user inside the read.
            k = next(i for i in mapped[1:] if res.entry_of(
                state[i].untyped_storage()).state is outcore.states.MAPPED)
            guard = interrupts._guard()
            assert guard.hold()
            try:
                ctrl_c_as_a_read_begins(res)
                with pytest.raises(KeyboardInterrupt):
                    state[k].detach().numpy()
                    time.sleep(5)
            finally:
                guard.uninstall()
            assert "restore" not in vars(res)
            assert state[k].untyped_storage().nbytes() == state[k].nbytes
            assert torch.equal(state[k], twins[k])
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            # A Ctrl-C while `.numpy()` waits for another thread's between() block
            # breaks the wait (helper-180: under a guard it waited the block's 3 s out).
            ooc._remap()                       # back to the slow tier: a read to wait for
            other = next(t for t in state if t is not held and res.entry_of(
                t.untyped_storage()).state is outcore.states.MAPPED)
            inside, done = threading.Event(), threading.Event()

            def reader():
                with ooc.between():
                    inside.set()
                    done.wait(10)
            thread = threading.Thread(target=reader)
            thread.start()
            inside.wait()
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
            began = time.monotonic()
            try:
                with pytest.raises(KeyboardInterrupt):
                    other.detach().numpy()
                assert time.monotonic() - began < 5
            finally:
                done.set()
                thread.join()
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("point", ["_account", "_plan_recording", "_park"])
def test_a_ctrl_c_after_the_block_ran_says_its_step_took_effect(monkeypatch, mlp_budget, point):
    """A Ctrl-C while outcore ends a block that ran to its end (parking its state, held
    till the end; accounting, or planning from the recording) is raised from the `with`
    line, whose traceback cannot
    say whether the step took effect: its note says it did (helper-200), and the state is
    that step's: a plain twin that took the same steps equals it."""
    w = warm("mlp-tiny", "adam")
    twin = copy.deepcopy(w)
    with outcore.OutOfCore(budget=mlp_budget, min_move_bytes=0) as ooc:
        # At the end of the first iteration (recorded, planned at its end), or the second
        # (a replay).
        owner, n = {"_plan_recording": (type(ooc), 1), "_park": (type(ooc), 2),
                    "_account": (_Iteration, 2)}[point]
        calls = _interrupt_on_call(monkeypatch, owner, point, n)
        stepped = 0
        with pytest.raises(KeyboardInterrupt) as info:
            for _ in range(4):
                with ooc.iteration():
                    w.step()
                    stepped += 1
        monkeypatch.undo()
        assert calls["n"] == stepped == n
        assert any("all the block did took effect" in n for n in info.value.__notes__)
        for _ in range(stepped):
            twin.step()
        assert_bitwise_equal(state_of(twin.model, twin.optimizer), state_of(w.model, w.optimizer))
        assert_intact(w, ooc)


def test_a_ctrl_c_after_a_building_block_ran_says_what_it_built_took_effect(monkeypatch):
    """The same for `with ooc.building():` (its state parked as it ends), whose note
    names what a building block does, not a training step's optimizer."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    with outcore.OutOfCore(budget="300KiB", min_move_bytes=0) as ooc:
        calls = _interrupt_on_call(monkeypatch, type(ooc), "_park", 1)
        torch.manual_seed(0)
        with pytest.raises(KeyboardInterrupt) as info:
            with ooc.building():
                built = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
        monkeypatch.undo()
        assert calls["n"] == 1
        notes = info.value.__notes__
        assert any("every tensor it made or changed is as the block left it" in n
                   for n in notes), notes
        assert not any("optimizer" in n for n in notes), notes
        with ooc.between():
            assert_bitwise_equal(plain.state_dict(), built.state_dict())


@pytest.mark.parametrize("point", ["_park", "_account"])
def test_a_ctrl_c_after_an_error_of_the_blocks_end_keeps_that_error(monkeypatch, mlp_budget,
                                                                      point):
    """Where outcore's end of the block met an error of its own (a callback on a
    collective that failed: "go on from your last checkpoint, not from these values"),
    a Ctrl-C there says nothing of the step taking effect, and carries that error: as
    its context where the Ctrl-C was held (`_park`), as a note where it cut the end off
    before the error was raised (`_account`: it was lost before). helper-202."""
    w = warm("mlp-tiny", "adam")
    with outcore.OutOfCore(budget=mlp_budget, min_move_bytes=0) as ooc:
        owner = type(ooc) if point == "_park" else _Iteration
        _interrupt_on_call(monkeypatch, owner, point, 1)
        with pytest.raises(KeyboardInterrupt) as info:
            with ooc.iteration():
                w.step()
                ooc._res.stopped_callback = RuntimeError("a comm-hook callback failed")
        monkeypatch.undo()
        notes = getattr(info.value, "__notes__", [])
        assert not any("took effect" in n for n in notes), notes
        said = notes + [str(info.value.__context__)]
        assert any("comm-hook callback failed" in s and "not from these values" in s
                   for s in said), said
        assert_whole(w)
