"""Keep the process's resident memory near the budget without paying for it on every tensor.

glibc keeps freed heap memory for reuse, so a process that streams gigabytes of
activations through a small budget sits far above that budget in resident memory
(docs/results-run.md). Two ways to give it back:

* "eager": every allocation of 64 KiB or more becomes its own mapping, unmapped on free.
  Resident memory follows the live bytes closely, but every new tensor faults in fresh,
  zeroed pages: ResNet-50 (64x64, batch 64) steps in 1.38-1.42 s instead of 0.82-1.02 s even
  in-core (docs/results-run.md).
* "trim" (the default, `TrimGovernor`): every allocation stays on glibc's heap, where
  freed memory is reused without faults, and the heap's free pages are handed back
  (`malloc_trim`) only when the resident set grows past a limit. Page faults are what
  this saves: plain PyTorch on glibc's defaults maps every tensor over 32 MiB on its own
  and faults it in afresh each time, 1.5 million faults per ResNet-50 step at 128x128,
  batch 64, on this machine, which take it from 2.83 s to 4.05 s (docs/results-run.md).
  The limit is generous until the budget first needs room (the resident set at the
  first iteration plus the budget and a slack: a step that fits is never trimmed), then
  tight: the resident set at the first eviction (the budget is full then), trimmed,
  plus a slack. The slack is 64 MiB + budget/5 until the managed bytes alive at once
  (in RAM and on the slow tier) pass twice the budget (a smaller one trimmed and
  re-faulted so often near the peak that a step with 8 MiB to move ran 12-25% slower
  than plain PyTorch), and 32 MiB + budget/10 from then on, where the resident set is
  what the user is short of and a trim costs little beside the disk traffic (ResNet-50
  128x128 at a quarter budget, with a prototype that used the small slack from the
  start: 1083 against 1191 MiB, 4.15 against 4.00 s, one run each; docs/results-run.md).
  Resident memory stays within the limit plus what one stretch of the step allocates
  between checks.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import time

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_GLIBC_MMAP_MAX = 65536                # glibc's defaults, put back by stop()
_GLIBC_TRIM_THRESHOLD = 128 * 1024
_NEVER = 2**62
_C_INT_MAX = 2**31 - 1                 # mallopt takes a C int: 2**62 would arrive as 0


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim
        return libc
    except (OSError, AttributeError):
        return None


def return_freed_memory(threshold: int = 64 * 1024) -> bool:
    """The "eager" mode: map allocations >= `threshold` on their own and trim freed
    memory. Returns False where the C library is not glibc (nothing changes then)."""
    libc = _libc()
    if libc is None:
        return False
    ok = (libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1
          and libc.mallopt(_M_TRIM_THRESHOLD, threshold) == 1)
    libc.malloc_trim(0)
    return ok


_PAGE = os.sysconf("SC_PAGE_SIZE")
_statm = None


def resident_bytes() -> int:
    """The process's resident set (VmRSS), in bytes: one pread of /proc/self/statm on a
    descriptor kept open (a fork reopens it: /proc/self is per process)."""
    global _statm
    if _statm is None or _statm[0] != os.getpid():
        _statm = (os.getpid(), os.open("/proc/self/statm", os.O_RDONLY))
    return int(os.pread(_statm[1], 128, 0).split()[1]) * _PAGE


def page_faults() -> int:
    """Page faults of this process so far (minor and major): each is a page the OS had
    to hand over, e.g. memory given back and taken again (~1 us each on this machine)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def _slack(budget: int, tight_budget: bool) -> int:
    """How far the resident set may grow past its trimmed size before the next trim."""
    if tight_budget:                # under half the in-core peak
        return 32 * 2**20 + budget // 10
    return 64 * 2**20 + budget // 5


class TrimGovernor:
    """The "trim" mode. `start(budget)` (at the first iteration) puts every allocation on
    glibc's heap with no trimming of its own and sets a generous limit; `tighten()` (at
    the first eviction) sets the tight one; `check()` (called where memory is freed or
    taken) trims when the resident set is over the limit; `stop()` gives glibc its
    defaults back. After a trim that cannot get under the limit (the live bytes are above
    it, e.g. all state read back at the end of an iteration), the next trim waits until
    the resident set has grown by another slack: trims stay rare whatever the step does."""

    def __init__(self):
        self.libc = _libc()
        self.limit = None
        self.slack = 0
        self.budget = 0
        self.tight = False
        self.small_slack = False
        self.live_bytes = None     # () -> managed bytes alive on either tier, if known
        self._next = _NEVER
        self._checked = 0.0
        self.trims = 0

    @property
    def active(self) -> bool:
        return self.limit is not None

    def start(self, budget: int) -> bool:
        if self.libc is None or self.active:
            return False
        ok = (self.libc.mallopt(_M_MMAP_MAX, 0) == 1
              and self.libc.mallopt(_M_TRIM_THRESHOLD, _C_INT_MAX) == 1)
        self.budget = budget
        self.slack = _slack(budget, tight_budget=False)
        self.libc.malloc_trim(0)           # what glibc kept so far: the limit starts from live bytes
        self.limit = resident_bytes() + budget + self.slack
        self._next = self.limit
        return ok

    def tighten(self) -> None:
        """The budget is full: from now on the resident set may exceed today's by a slack."""
        if not self.active or self.tight:
            return
        self.tight = True
        self.libc.malloc_trim(0)
        self.limit = resident_bytes() + self.slack
        self._next = self.limit

    def know_peak(self, at_least: int) -> None:
        """The step needs at least `at_least` bytes at once (its in-core peak, or the
        managed bytes alive right now): a budget below half of that gets the smaller
        slack."""
        if not self.active or self.small_slack or self.budget * 2 >= at_least:
            return
        self.small_slack = True
        slack = _slack(self.budget, tight_budget=True)
        if self.tight:                  # the limit and the pending trim point move alike
            self.limit += slack - self.slack
            self._next += slack - self.slack
        self.slack = slack

    def stop(self) -> None:
        """glibc's own defaults again, and the heap's free pages handed back."""
        if not self.active:
            return
        self.libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
        self.libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD)
        self.libc.malloc_trim(0)
        self.limit, self.tight, self.small_slack, self._next = None, False, False, _NEVER

    def check(self) -> None:
        if self.limit is None:
            return
        now = time.perf_counter()
        if now - self._checked < 0.002:        # reading /proc costs ~1 us: 500 Hz at most
            return
        self._checked = now
        if self.tight and not self.small_slack and self.live_bytes is not None:
            self.know_peak(self.live_bytes())
        rss = resident_bytes()
        if rss <= self._next:
            return
        self.libc.malloc_trim(0)
        self.trims += 1
        after = resident_bytes()
        self._next = max(self.limit, after + self.slack)
