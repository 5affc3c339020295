"""What a replayed iteration did and when: the measured half of a timeline.

The replayer fills one StepLog per iteration (always: a few appends per op, next to the
op's own dispatch); `OutOfCore.timeline()` turns the last one into Chrome trace events
(`outcore.view.timeline`). Times are `time.perf_counter()` seconds; `origin` is when
the iteration began, so the events start at 0 as the simulation's do.
"""
from __future__ import annotations

from array import array

# Columns of `times`, per logged function.
TAKEN, STARTED, RETURNED, DONE = range(4)


class StepLog:
    """Per function the executor ran as planned: its trace index; when the executor took
    it up, when the op started (after its begin-actions and the waits for its operands),
    when the op returned, when its end-actions were done; and at that moment the managed
    bytes in fast memory, on the slow tier, and the process's resident set (the latest
    sample, 500 Hz at most). Per completed transfer: the trace's array id (-1 when the
    storage was never bound to one), "in" or "out", bytes, start and end.

    Kept in flat typed arrays: about 60 bytes per function, so that logging a step of
    20,000 functions costs about a megabyte, not the budget."""

    def __init__(self, origin: float):
        self.origin = origin
        self.index = array("q")
        self.times = array("d")            # 4 per function: TAKEN, STARTED, RETURNED, DONE
        self.memory = array("q")           # 3 per function: resident, offloaded, rss
        self.transfers: list[tuple[int, str, int, float, float]] = []
        self.deviation: tuple[int, str] | None = None   # (function index, reason)
        self.end = origin

    def function(self, index: int, taken: float, started: float, returned: float, done: float,
                 resident: int, offloaded: int, rss: int) -> None:
        self.index.append(index)
        self.times.extend((taken, started, returned, done))
        self.memory.extend((resident, offloaded, rss))

    def __len__(self) -> int:
        return len(self.index)

    def rows(self):
        """(index, taken, started, returned, done, resident, offloaded, rss), in order."""
        t, m = self.times, self.memory
        for k, i in enumerate(self.index):
            yield (i, t[4 * k], t[4 * k + 1], t[4 * k + 2], t[4 * k + 3],
                   m[3 * k], m[3 * k + 1], m[3 * k + 2])
