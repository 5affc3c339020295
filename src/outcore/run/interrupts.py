"""Signals are held back while outcore's bookkeeping runs, so an interrupt never lands
between two of its steps.

NOTE [Interrupts]
Python runs a signal handler between two bytecodes of the main thread, and the default
SIGINT handler raises KeyboardInterrupt there: between resizing a storage and noting
that it was resized, say. Rather than make every line safe against that, outcore holds
signals back while it works and lets them through at the next point where every storage
has its full size (or is safely on the slow tier) and every counter is true:

  1. While an iteration runs (and in `close()`), each signal whose handler is a Python
     function gets `Shield._handler` in front of it (`Shield.install`).
  2. Code that must not be cut runs as a *held section*: `enter()` ... `exit()`. Held
     sections are every intercepted op (its bookkeeping, the op and the transfers
     around it), the start and the end of an iteration, `close()`, and making an
     `OutOfCore` (its descriptors, directories and threads are given back before the
     KeyboardInterrupt leaves the constructor).
  3. A signal that comes while a section is held (depth > 0), or while the main thread
     is in the first bytecodes of a function that is about to hold one (`CRITICAL`),
     is noted, not handled. When the outermost section ends, the noted signals are
     handed to the user's handlers in order: KeyboardInterrupt is raised there.
  4. A held section lasts one op and the transfers it waits for; Ctrl-C is delayed by
     that much, never lost. Outside held sections the user's handler runs at once.
  5. `uninstall` runs inside a held section and puts back the user's handlers, unless
     the user installed another one meanwhile (theirs is left alone).
  6. Python swallows an exception raised in a weakref callback ("Exception ignored
     in ..."), so a KeyboardInterrupt raised there would be lost and the step would
     run on, and the callback would stop halfway (a mapping never unmapped, a host
     segment never released). A signal that lands in a function marked `no_raise`
     (outcore's weakref callbacks, and `weakref.finalize.__call__`, through which
     every finalizer runs), or in anything such a function calls, is noted as in
     rule 3 and handed over when the next held section ends: the next op, or at the
     latest the end of the iteration.
  7. The user's handler may read and write the model (a preemption handler that logs
     or saves a checkpoint on SIGTERM). PyTorch takes a dispatch mode off its stack
     while it dispatches an op to it, so a handler handed a signal at the end of an
     op's held section, or called while PyTorch's own Python code runs before the
     mode's `__torch_dispatch__`, ran its ops past outcore, on storages outcore had on
     the slow tier: a segmentation fault (helper-105). So the block's mode is
     `Shield.mode` while pushed, and the user's handlers run with it on the stack,
     pushed back for them where PyTorch (or outcore, setting it aside) has it off:
     the handler's ops are the step's (in a replay, off its plan: run op by op). A
     signal whose handler runs now is noted and handed over after it, at the next
     held section's end; other signals reach their handlers as usual. A signal noted
     again before it was handed over is noted once, as Python itself merges them.
  8. Between iterations and after `close()` no shield is installed, yet outcore's
     callbacks still run whenever the user drops a tensor: a mapped storage's unmap
     (NOTE [Mapped state]), a host segment's release, a numpy export's end. A Ctrl-C
     landing in one was swallowed (helper-133: 20 of 24 while a model mapped from a
     closed OutOfCore's swap file was dropped) and stopped it halfway (the region
     mapped for good). So a `no_raise` callback run on the main thread where no shield
     is installed installs one of its own (`_Guard`, for SIGINT and SIGTERM) for its
     duration: a signal landing in any callback then is noted (rule 6) and sent again
     to the main thread from a short-lived thread a millisecond later, the guard
     installed until one lands outside outcore's callbacks, where it puts the user's
     handlers back and hands it over. A signal that lands in the few bytecodes before
     a callback's guard is installed, or is sent again into another library's weakref
     callback (a WeakSet's being emptied), is still Python's to swallow.

  9. Between iterations, what moves a storage on the user's call (`.numpy()`'s read
     back, `sharing._prepare`; an async collective's hold, `OutOfCore._hold_for_collective`)
     runs as a held section with the OutOfCore's shield installed for its length
     (`held_here`), and the noted signals are handed over as it ends, at once, on the
     main thread. Raised inside, a Ctrl-C left a storage unmapped and empty on the slow
     tier (reading it was a segmentation fault) or a read in flight (helper-179). The wait
     for other threads' reads (`OutOfCore._alone`) comes before it, so a Ctrl-C still
     breaks that wait (helper-180: under rule 8's guard it was sent again every millisecond
     until the other thread let go). Installed also where rule 8's guard is up (a
     callback's signal waiting to be sent again), which then hands its noted signals to
     the shield.

Only the main thread runs Python signal handlers; from another thread `install` does
nothing (signals still reach the main thread's own handlers).
"""
from __future__ import annotations

import _signal
import _thread
import contextlib
import functools
import os
import signal
import sys
import threading
import time
import weakref

from torch.utils._python_dispatch import TorchDispatchMode

from ..aten import FAST_PATH_OP, OutcoreMode, autocast_as_entered

# Code objects in which a signal is held back even before `enter()` has run (rule 3).
CRITICAL: set = set()
# Code objects where Python would swallow the handler's exception (rule 6): a weakref
# callback, and the loop that runs finalizers at exit (a signal that rule 8's thread sent
# again landed there, between two of them, under load, and the user's handler raised
# SystemExit into it: "Exception ignored in atexit callback").
SWALLOWING: set = {weakref.finalize.__call__.__code__,
                   weakref.finalize._exitfunc.__func__.__code__}


def critical(function):
    """Mark `function` as one that holds a section from its first line (rule 3)."""
    CRITICAL.add(getattr(function, "__code__", None))
    return function


def no_raise(function):
    """Mark `function` as one Python runs where an exception is swallowed, a weakref
    callback: a signal landing in it is noted, not raised there (rule 6), also where no
    shield is installed (rule 8)."""
    SWALLOWING.add(function.__code__)

    @functools.wraps(function)
    def run(*args, **kwargs):
        if _installed[0] or threading.get_ident() != _MAIN:      # a shield notes it here
            return function(*args, **kwargs)
        guard = _guard()
        held = guard.hold()
        try:
            return function(*args, **kwargs)
        finally:
            if held and not guard.pending:     # else it stays until it hands them over
                guard.uninstall()
    SWALLOWING.add(run.__code__)
    return run


_MAIN = threading.main_thread().ident
_installed = [0]     # shields installed now (`Shield.install`)
# The signals rule 8 notes: those that stop a process (swapped through `_signal`:
# signal.signal and getsignal make an enum per call, most of a callback's cost).
GUARDED_SIGNALS = (int(signal.SIGINT), int(signal.SIGTERM))
# Every signal there is, as integers (signal.valid_signals() makes its enum anew each
# call: 76 us).
_SIGNALS = tuple(int(s) for s in signal.valid_signals())
# How long rule 8's thread waits before it sends a noted signal again: a callback's last
# bytecodes after the one that noted it take microseconds.
GUARD_RESEND_S = 0.001


# NOTE [Forked children]
# A process forked while a block is open (a DataLoader's workers, started by
# `iter(loader)` inside `ooc.iteration()`) inherits outcore's dispatch mode but not the
# mover's threads: an op there that waited for a transfer waited forever, and the parent
# for its workers. In such a child every Shield made before the fork is `forked`, and the
# modes holding one pass ops through as plain PyTorch. The child must not touch state
# the parent had on the slow tier (a DataLoader's workers touch only their data).
_shields: "weakref.WeakSet[Shield]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _MAIN
    for shield in list(_shields):
        shield.forked = True
    _MAIN = threading.get_ident()        # the forking thread is the child's main thread
    _guard()._sending = False            # no thread of the parent's is here to send


os.register_at_fork(after_in_child=_after_fork_in_child)


class Shield:
    def __init__(self):
        self.forked = False                # NOTE [Forked children]
        _shields.add(self)
        self.depth = 0
        self.pending: list = []            # (signum, frame) noted while held
        self._saved: dict = {}             # signum -> the user's handler
        self._installed = False
        self.mode = None                   # the block's dispatch mode, while pushed (rule 7)
        self._running: set = set()         # signals whose handler runs now (`_deliver`)

    # -- held sections ------------------------------------------------------------------
    @critical
    def enter(self) -> None:
        self.depth += 1

    def exit(self, mode=None) -> None:
        """End a held section; at the outermost end, hand over the noted signals, unless
        it ends inside a weakref callback (an op a finalizer runs): raised there, Python
        would swallow them (rule 6), so they wait for the next end outside one. `mode`:
        the dispatch mode whose `__torch_dispatch__` is ending, put back on the stack for
        the user's handlers (rule 7)."""
        self.depth -= 1
        if self.pending and self.depth == 0 and not _swallowed(sys._getframe(1)):
            with _pushed(mode):
                self._deliver()

    def _deliver(self) -> None:
        """Hand the noted signals to the user's handlers, in order; one whose handler
        runs now (its own ops end held sections) waits for the next held section's end,
        so the step goes on between handlers however fast a signal comes (handed over
        from inside its own handler, SIGTERM every 3 ms nested handler in handler until
        the stack overflowed). A handler that raises leaves the signals after it noted."""
        ready = [(n, f) for n, f in self.pending if n not in self._running]
        if not ready:
            return
        self.pending = [(n, f) for n, f in self.pending if n in self._running]
        for k, (signum, frame) in enumerate(ready):
            handler = self._saved.get(signum)
            if handler is None:
                handler = signal.getsignal(signum)
            if not callable(handler) or handler == self._handler:
                continue
            self._running.add(signum)
            try:
                handler(signum, frame)             # may raise: KeyboardInterrupt, SystemExit
            except BaseException:
                self.pending[:0] = ready[k + 1:]
                raise
            finally:
                self._running.discard(signum)

    def _mode_off(self) -> bool:
        """Whether the block's dispatch mode is pushed but off the stack now (rule 7):
        PyTorch takes a mode off while it dispatches an op to it, from its own Python
        code before the mode's `__torch_dispatch__` starts."""
        mode = self.mode
        if mode is None:
            return False
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
        return not any(m is mode for m in _get_current_dispatch_mode_stack())

    # -- handlers -----------------------------------------------------------------------
    def install(self) -> None:
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        guard = _guard()
        if guard._installed and guard is not self:  # rule 8: its noted signals are ours
            self.pending += [(n, f) for n, f in guard.pending
                             if all(n != m for m, _ in self.pending)]
            guard.pending = []
            guard.uninstall()
        self._saved = {}
        for signum in _SIGNALS:
            try:
                handler = signal.getsignal(signum)
            except (ValueError, OSError):
                continue
            if (callable(handler) and handler != self._handler
                    and not isinstance(getattr(handler, "__self__", None), _Guard)):
                self._saved[signum] = handler
                signal.signal(signum, self._handler)
        self._installed = True
        _installed[0] += 1

    def uninstall(self) -> None:
        """Put the user's handlers back (call inside a held section: rule 5)."""
        for signum, handler in self._saved.items():
            if signal.getsignal(signum) == self._handler:
                signal.signal(signum, handler)
        if self._installed:
            _installed[0] -= 1
        self._installed = False     # `_saved` stays: noted signals are delivered to it

    def _handler(self, signum, frame) -> None:
        if (self.depth > 0 or signum in self._running
                or (frame is not None and frame.f_code in CRITICAL) or _swallowed(frame)):
            if all(n != signum for n, _ in self.pending):    # as Python does: once each
                self.pending.append((signum, frame))
            return
        self._running.add(signum)
        try:                    # rule 7: the mode on the stack, where PyTorch had it off
            with _pushed(self.mode if self._mode_off() else None):
                self._saved[signum](signum, frame)
        finally:
            self._running.discard(signum)


class _Guard(Shield):
    """The shield `no_raise` callbacks install where none is (rule 8). A signal that
    lands inside a callback is noted and sent again to the main thread from another
    thread; the guard stays installed until one lands outside outcore's callbacks, and
    then puts the user's handlers back and hands it over. An OutOfCore's shield installed
    meanwhile takes the noted signals over (`Shield.install`)."""

    def __init__(self):
        super().__init__()
        self._sending = False
        # Inside `hold` or `uninstall`: a callback the collector runs meanwhile (a swap
        # allocates) neither installs it again over a half-made `_saved` nor takes it
        # down (helper-135: SIGINT's handler was left the guard's, with nothing saved,
        # and no Ctrl-C reached the user again).
        self._busy = False

    def hold(self) -> bool:
        """Install for GUARDED_SIGNALS, through `_signal` (no enum made); False, and
        nothing done, where it is installed or being installed or taken down."""
        if self._installed or self._busy:
            return False
        self._busy = True
        try:
            saved = {}
            for signum in GUARDED_SIGNALS:
                handler = _signal.getsignal(signum)
                if handler == self._handler and signum in self._saved:
                    saved[signum] = self._saved[signum]   # left ours by a cut-short uninstall
                elif callable(handler) and not isinstance(getattr(handler, "__self__", None),
                                                          Shield):
                    saved[signum] = handler
            # Counted before the swaps: a handler the swap runs (a user's, raising) must
            # not leave SIGINT ours and the guard uncounted (helper-136).
            self._saved, self._installed = saved, True
            _installed[0] += 1
            for signum in saved:
                _signal.signal(signum, self._handler)
        except BaseException:
            self.uninstall()
            raise
        finally:
            self._busy = False
        return True

    def uninstall(self) -> None:
        """The count first, SIGINT's handler last: a signal landing in between finds the
        guard's handler, which hands it over (helper-136: cut short after SIGINT's swap,
        the guard stayed counted and every later callback ran unguarded)."""
        self._busy = True
        try:
            if self._installed:
                self._installed = False
                _installed[0] -= 1
            for signum in sorted(self._saved, key=lambda n: n == signal.SIGINT):
                if _signal.getsignal(signum) == self._handler:
                    _signal.signal(signum, self._saved[signum])
        finally:
            self._busy = False

    def _handler(self, signum, frame) -> None:
        if self.depth > 0 or (frame is not None and frame.f_code in CRITICAL) or _swallowed(frame):
            # Noted without its frame: the frame holds the callback's locals (a numpy
            # export's owner) for as long as the signal waits (helper-180: a dropped array's
            # storage stayed pinned into the next iteration); it is sent again anyway.
            if all(n != signum for n, _ in self.pending):
                self.pending.append((signum, None))
            if not self._sending:
                self._sending = True
                self._send_again()
            return
        self.uninstall()
        others = [n for n, _ in self.pending if n != signum]
        self.pending = []
        handler = self._saved.get(signum)
        try:
            if callable(handler):
                handler(signum, frame)           # KeyboardInterrupt, in the user's code
        finally:
            for other in others:        # to their own handlers, after this one (helper-136)
                signal.pthread_kill(threading.get_ident(), other)

    def _send_again(self) -> None:
        def send():
            time.sleep(GUARD_RESEND_S)
            # Taken, not read: a signal noted as the guard came down stayed in `pending`
            # after its resend, and the next shield raised it a second time (helper-136).
            noted, self.pending = self.pending, []
            self._sending = False
            for signum in [n for n, _ in noted]:
                signal.pthread_kill(_MAIN, signum)      # the fork hook keeps it current
        try:            # `_thread`: threading's start waits for the thread, in the callback
            _thread.start_new_thread(send, ())
        except RuntimeError:    # no new threads at interpreter shutdown: nothing to stop
            self._sending = False


@functools.cache
def _guard() -> _Guard:
    return _Guard()


@contextlib.contextmanager
def held_here(shield: Shield):
    """A held section where no shield may be installed (rule 9): on the main thread,
    with no other shield installed, `shield` is installed for its length, and the
    signals noted are handed to the user's handlers as it ends; elsewhere only entered.
    Rule 8's guard, installed while a callback's signal waits to be sent again, is no
    other shield: `install` takes its noted signals over (with the guard left up, a
    signal landing in the section reached the user there)."""
    guard = _guard()
    own = (threading.get_ident() == _MAIN and not shield._installed
           and _installed[0] == (1 if guard._installed and guard is not shield else 0))
    if own:
        shield.install()
    shield.enter()
    try:
        yield
    finally:
        if own:
            shield.uninstall()       # first: what comes after goes to the user at once
        shield.exit()                # the noted ones, to the handlers `install` saved


@contextlib.contextmanager
def _pushed(mode):
    """`mode` on the dispatch stack for the block (rule 7), pushed and popped as
    TorchDispatchMode does it, not by the mode's own `__enter__`/`__exit__` (a
    recording's build its trace there: helper-108); None: nothing pushed."""
    if mode is None:
        yield
        return
    TorchDispatchMode.__enter__(mode)
    try:
        yield
    finally:
        TorchDispatchMode.__exit__(mode, None, None, None)


def _swallowed(frame) -> bool:
    """Whether `frame` runs inside a weakref callback (rule 6): walked only when a signal
    lands, so the cost is one walk up the stack per signal."""
    while frame is not None:
        if frame.f_code in SWALLOWING:
            return True
        frame = frame.f_back
    return False


class HeldMode(OutcoreMode):
    """A dispatch mode whose every op is one held section (rule 2), profiler ops passed
    through; subclasses implement `_dispatch(func, args, kwargs)`."""

    def __init__(self, shield: Shield):
        super().__init__()
        self.shield = shield

    @critical
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.shield.forked:          # NOTE [Forked children]
            return func(*args, **kwargs)
        self.shield.depth += 1
        try:
            if func.namespace == "profiler":
                return func(*args, **kwargs)
            if func is FAST_PATH_OP:        # NOTE [Fast paths under autocast] in aten.py
                with autocast_as_entered(self):
                    return self._dispatch(func, args, kwargs)
            return self._dispatch(func, args, kwargs)
        finally:
            self.shield.exit(self)

    def _dispatch(self, func, args, kwargs):
        raise NotImplementedError

