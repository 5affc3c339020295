"""`outcore.OutOfCore`: train under a fast-memory budget with one context manager.

    ooc = outcore.OutOfCore(budget="2GiB", offload="disk")
    for x, y in loader:
        with ooc.iteration():
            loss = loss_fn(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
    print(ooc.report())

Iteration 1 records the step while running on-demand (memory-safe); the schedule is
planned once; later iterations replay it. An iteration that deviates from the record
finishes on-demand and the next one is recorded again.

Between iterations everything the user can reach is back in RAM, as plain PyTorch
tensors (see README, "Between iterations").
"""
from __future__ import annotations

import time
from contextlib import contextmanager

from ..errors import OutcoreError
from ..memory.malloc import TrimGovernor, page_faults, return_freed_memory as return_freed_memory_to_os
from ..plan import check, plan
from ..plan.api import POLICIES
from ..units import format_bytes, parse_bytes
from .movers.disk import DiskMover
from .recording import SafeRecording
from .replay import Replayer
from .report import IterationStats, Report
from .residency import Residency

# Lazily created optimizer state makes the first iteration differ from later ones; a
# step is recorded again (at most this many times in a row) until its state is stable.
_MAX_RECORDINGS = 3


MIN_MOVE_BYTES = 64 * 1024


def planned_budget(trace, budget: int, min_move_bytes: int = MIN_MOVE_BYTES) -> int:
    """The budget the plan gets: storages below min_move_bytes never move (a transfer
    would cost more than it frees), so the rest is planned within what they leave."""
    pinned = sum(a.nbytes for a in trace.arrays if a.nbytes < min_move_bytes)
    return max(budget - pinned, 1)


class OutOfCore:
    """Runs training iterations within `budget` bytes of fast memory.

    budget: bytes or a string such as "2GiB" — the most managed tensor bytes resident at
        once (the recording iteration may exceed it by one op's outputs).
    offload: "disk" (the slow tier is a swap file on a local disk).
    swap_dir: where the swap file goes (default: the system temp directory).
    policy: the planning policy (outcore.plan): "adaptive", "fixed", "on-demand", ...
    min_move_bytes: storages smaller than this stay in fast memory (a transfer would
        cost more than it frees).
    plan_options: extra options for the policy (e.g. {"window": "3GiB"}).
    return_freed_memory: how the C allocator (glibc) hands freed memory back to the OS,
        so that the process's resident memory follows the budget instead of its
        high-water mark; process-wide until close() (README, "Memory and speed"). True
        or "trim" (from the first iteration): every tensor on the reused heap (no page
        faults, unlike glibc's defaults), trimmed when the resident set grows past what
        it was at the first eviction plus a slack (64 MiB + budget/5; 32 MiB + budget/10
        once the step holds more than twice the budget), or, while nothing has had to
        move, past its size at the start plus the budget. "eager" (from the
        first eviction): every tensor its own mapping, unmapped on free (closest to the
        budget; page faults on every new tensor). False: glibc's defaults.
    """

    def __init__(self, budget, offload: str = "disk", swap_dir: str | None = None,
                 policy: str = "adaptive", *, min_move_bytes: int = MIN_MOVE_BYTES,
                 plan_options: dict | None = None, return_freed_memory: bool | str = True):
        self.budget = parse_bytes(budget)
        if self.budget <= 0:
            raise OutcoreError(f"the budget must be positive, got {budget!r}")
        if offload == "host":
            raise OutcoreError("offload='host' moves GPU tensors to pinned host memory and needs "
                               "the CUDA mover, which this version does not have; use offload='disk'")
        if offload != "disk":
            raise OutcoreError(f"unknown offload {offload!r}; use offload='disk'")
        if policy not in POLICIES:
            raise OutcoreError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if return_freed_memory not in (True, False, "trim", "eager"):
            raise OutcoreError(f"return_freed_memory must be True, False, 'trim' or 'eager', "
                               f"got {return_freed_memory!r}")
        self.policy = policy
        self.plan_options = dict(plan_options or {})
        self._mover = DiskMover(swap_dir)
        self._res = Residency(self._mover, min_move_bytes=min_move_bytes)
        self._governor = None
        if return_freed_memory == "eager":      # only once something must leave RAM
            self._res.before_first_eviction = return_freed_memory_to_os
        elif return_freed_memory:               # started by the first iteration
            self._governor = TrimGovernor()
            self._res.before_first_eviction = self._governor.tighten
            self._res.memory_check = self._governor.check
            self._governor.live_bytes = lambda: self._res.resident + self._res.offloaded
        self.trace = None
        self.schedule = None
        self._carried: dict = {}
        self._recordings_in_a_row = 0
        self._record_next = True
        self._iterations: list[IterationStats] = []
        self._active = False
        self.closed = False

    # -- the loop ------------------------------------------------------------------------
    @contextmanager
    def iteration(self):
        """One training iteration under the budget (see the module docstring)."""
        if self.closed:
            raise OutcoreError("this OutOfCore was closed; create a new one to train again")
        if self._active:
            raise OutcoreError("ooc.iteration() blocks cannot nest; end one before starting the next")
        self._active = True
        res = self._res
        if self._governor is not None:
            self._governor.start(self.budget)       # once; later calls do nothing
        before = (res.stats.bytes_read, res.stats.bytes_written, res.stats.unplanned_bytes,
                  res.stats.wait_s, self._mover.busy_read_s + self._mover.busy_write_s,
                  page_faults(), self._trims())
        recording = self._record_next
        started = time.perf_counter()
        deviation, completed = None, False
        if recording:
            mode = SafeRecording(res, self.budget, label=f"iteration {len(self._iterations) + 1}")
            res.evict_lru(self.budget, set())
        else:
            mode = Replayer(self.trace, self.schedule, res, self.budget, self._carried)
            mode.start()
        res.stats.peak_resident = res.resident     # the budget holds from here on
        try:
            with mode:
                yield self
            completed = True
        finally:
            stepped, faulted, trimmed = time.perf_counter(), page_faults(), self._trims()
            passive = not recording and mode.passive and mode.deviation is None
            peak = self.schedule.peak_bytes if passive else res.stats.peak_resident
            try:
                if not recording:
                    deviation = mode.deviation
                    mode.finish()
                    deviation = mode.deviation
                res.restore_all()
            finally:
                for entry in res.entries.values():
                    entry.clean = False     # the user may change anything before the next iteration
                self._active = False
                stats = res.stats
                self._iterations.append(IterationStats(
                    index=len(self._iterations) + 1, mode="record" if recording else "replay",
                    seconds=stepped - started, bytes_read=stats.bytes_read - before[0],
                    bytes_written=stats.bytes_written - before[1],
                    unplanned_bytes=stats.unplanned_bytes - before[2], wait_s=stats.wait_s - before[3],
                    transfer_s=self._mover.busy_read_s + self._mover.busy_write_s - before[4],
                    restore_s=time.perf_counter() - stepped, peak_resident=peak,
                    deviation=deviation, completed=completed, tracked=not passive,
                    skipped_actions=0 if recording else mode.skipped_actions,
                    page_faults=faulted - before[5], trims=trimmed - before[6]))
        if recording:
            if mode.infeasible is not None:
                raise mode.infeasible
            self._adopt(mode)
        else:
            self._carried = mode.persistent_entries()
            self._record_next = deviation is not None

    def _adopt(self, recording: SafeRecording) -> None:
        """Plan from a fresh recording, or ask for another one if the step is not steady yet."""
        trace = recording.trace
        self._recordings_in_a_row += 1
        lazy_state = any(a.category == "optimizer_state" and not a.existed_before for a in trace.arrays)
        if lazy_state and self._recordings_in_a_row < _MAX_RECORDINGS:
            self._record_next = True
            return
        budget = planned_budget(trace, self.budget, self._res.min_move_bytes)
        schedule = plan(trace, budget, self.policy, **self.plan_options)
        check(trace, schedule, budget)
        self.trace, self.schedule = trace, schedule

        self._carried = {}
        for aid, ref in recording.alive_at_end.items():
            storage = ref()
            entry = self._res.entries.get(storage._cdata) if storage is not None else None
            arr = trace.arrays[aid]
            if entry is not None and arr.kind == "persistent" and arr.existed_before:
                self._carried[aid] = entry
        self._record_next = False
        self._recordings_in_a_row = 0

    def _trims(self) -> int:
        return self._governor.trims if self._governor is not None else 0

    # -- reporting -----------------------------------------------------------------------
    def report(self) -> Report:
        trace, schedule = self.trace, self.schedule
        pinned = sum(e.nbytes for e in self._res.entries.values() if e.pinned and e.ref() is not None)
        return Report(
            budget=self.budget, policy=self.policy, swap=repr(self._mover),
            functions=len(trace.functions) if trace else 0,
            in_core_peak=trace.peak()[0] if trace else 0,
            planned_peak=schedule.peak_bytes if schedule else None,
            planned_in=schedule.bytes_in if schedule else None,
            planned_out=schedule.bytes_out if schedule else None,
            pinned_bytes=pinned, iterations=tuple(self._iterations))

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Release the swap space. Tensors are all in RAM between iterations already."""
        if self.closed:
            return
        if self._active:
            raise OutcoreError("cannot close inside an iteration")
        self._res.restore_all()
        self._mover.close()
        if self._governor is not None:
            self._governor.stop()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            if not self.closed and not self._active:
                self._mover.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("planned" if self.schedule else "recording")
        return f"OutOfCore(budget={format_bytes(self.budget)}, policy={self.policy!r}, {state})"
