"""The Schedule: what to move around each function of a Trace, and what that costs.

A Schedule is plain, frozen data. For every function i it lists

  begin[i]  actions run before function i:  WAIT (on an earlier SWAP_OUT), SWAP_IN
  end[i]    actions run after function i:   FREE, DROP, SWAP_OUT
            (the last function's end-actions also WAIT on every outstanding swap-out,
            so an iteration never ends with a copy in flight)

Action kinds (each names one array id of the trace):

  SWAP_IN   copy the array from the slow tier into fresh fast memory, asynchronously.
            Its fast bytes count from this moment; the consuming function waits on it.
  SWAP_OUT  copy the array to the slow tier, asynchronously. The fast memory stays
            occupied (and counted) until a WAIT on it.
  WAIT      block until that array's SWAP_OUT has completed, then release its fast memory.
  DROP      release the fast copy of an array whose slow copy is current (it was not
            written since it was last swapped in or out): no transfer needed.
  FREE      release an array that is dead (never used again in this iteration).

`resident_at_start` / `resident_at_end` name the arrays that are on the fast tier when
the iteration begins / ends (everything else that exists is on the slow tier). For
arrays that existed before the step the two agree, so iteration k+1 starts where k ended.
"""
from __future__ import annotations

import functools
import os

from dataclasses import dataclass, field

from ..units import format_bytes

SWAP_IN, WAIT, SWAP_OUT, DROP, FREE = "SWAP_IN", "WAIT", "SWAP_OUT", "DROP", "FREE"
ACTION_KINDS = (SWAP_IN, WAIT, SWAP_OUT, DROP, FREE)
_CODE = {SWAP_IN: "in", WAIT: "wait", SWAP_OUT: "out", DROP: "drop", FREE: "free"}
_KIND = {v: k for k, v in _CODE.items()}

FORMAT = "outcore.schedule"
VERSION = 1


@dataclass(frozen=True)
class Action:
    kind: str
    array: int

    def __str__(self) -> str:
        return f"{_CODE[self.kind]} a{self.array}"


@dataclass(frozen=True)
class Schedule:
    """Per-function begin/end actions plus derived figures (see module docstring).

    resident_curve[i]: fast-tier bytes occupied while function i runs (resident arrays,
    swap-ins issued, swap-outs not yet waited for, and the arrays i creates).
    peak_bytes: the largest occupancy at any point, between actions included."""
    policy: str
    budget: int
    begin: tuple[tuple[Action, ...], ...]
    end: tuple[tuple[Action, ...], ...]
    resident_at_start: tuple[int, ...]
    resident_at_end: tuple[int, ...]
    bytes_in: int
    bytes_out: int
    peak_bytes: int
    resident_curve: tuple[int, ...]
    options: dict = field(default_factory=dict, compare=False, hash=False)

    # -- derived figures ---------------------------------------------------------------
    @property
    def bytes_moved(self) -> int:
        return self.bytes_in + self.bytes_out

    @functools.cached_property
    def moved_arrays(self) -> frozenset:
        """The arrays some action moves (SWAP_IN, SWAP_OUT or DROP), found once per
        schedule (the executor asks at every replay's start)."""
        return frozenset(a.array for step in self.begin + self.end for a in step
                         if a.kind in (SWAP_IN, SWAP_OUT, DROP))

    def boundary(self, trace) -> tuple[int, int]:
        """Bytes read and written between two iterations of `trace`: the state the step
        ends with in fast memory and the next starts without is written out, and the
        reverse read in (the planner may choose such a plan where it moves fewer bytes in
        all: plan/api.py `_cycle`). Counted apart from bytes_in and bytes_out."""
        start, end = set(self.resident_at_start), set(self.resident_at_end)
        state = [a for a in trace.arrays if a.kind == "persistent" and a.existed_before]
        return (sum(a.nbytes for a in state if a.id in start and a.id not in end),
                sum(a.nbytes for a in state if a.id in end and a.id not in start))

    def __len__(self) -> int:
        return len(self.begin)

    def count(self, kind: str) -> int:
        return sum(1 for acts in (self.begin, self.end) for step in acts for a in step
                   if a.kind == kind)

    def actions(self, index: int) -> tuple[tuple[Action, ...], tuple[Action, ...]]:
        return self.begin[index], self.end[index]

    # -- printing ----------------------------------------------------------------------
    def __str__(self) -> str:
        return self.summary()

    def _screened_lines(self) -> list[str]:
        """For policy auto: what each configuration it tried simulated to."""
        tried = self.options.get("screened") or []
        if not tried:
            return []
        cells = []
        for name, extra, seconds in tried:
            shown = ", ".join(f"{k}={format_bytes(v) if k == 'window' else v}"
                              for k, v in extra.items())
            cells.append(f"{name}{' (' + shown + ')' if shown else ''}"
                         + (f" {seconds * 1e3:.1f} ms" if seconds is not None else ""))
        if len(tried) == 1 and tried[0][2] is None:
            return [f"  auto planned one configuration alone, {cells[0]}: others are "
                    "screened only on traces short enough to plan each within about a "
                    "second (plan/policies/auto.py), so none was simulated to compare"]
        return [f"  auto tried (simulated iteration on {self.options.get('machine')}): "
                + "; ".join(cells)]

    def summary(self, *, trace=None, max_lines: int = 20) -> str:
        """A page a person reads: totals, then the first functions that move something.
        With `trace`, lines name each function's op and phase."""
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.options.items())
                         if k != "screened")
        lines = [
            f"Schedule ({self.policy}{', ' + opts if opts else ''}) for {len(self)} functions "
            f"under a budget of {format_bytes(self.budget)}",
            *self._screened_lines(),
            f"  moved in   {format_bytes(self.bytes_in):>12}  ({self.count(SWAP_IN)} swap-ins)",
            f"  moved out  {format_bytes(self.bytes_out):>12}  ({self.count(SWAP_OUT)} swap-outs, "
            f"{self.count(WAIT)} waits)",
            f"  released   {self.count(FREE)} frees, {self.count(DROP)} drops of clean copies",
            f"  peak fast  {format_bytes(self.peak_bytes):>12}  "
            f"({100.0 * self.peak_bytes / self.budget if self.budget else 0:.1f}% of budget)",
            f"  resident at start: {len(self.resident_at_start)} arrays, "
            f"at end: {len(self.resident_at_end)} arrays",
        ]
        shown = 0
        for i in range(len(self)):
            moves = [a for a in self.begin[i] + self.end[i] if a.kind != FREE]
            if not moves:
                continue
            if shown == max_lines:
                lines.append("  ...")
                break
            name = f"f{i}"
            if trace is not None:
                fn = trace.functions[i]
                name += f" {fn.op} ({fn.phase})"
            before, after = _actions(self.begin[i]), _actions(self.end[i])
            lines.append(f"  {name}: before [{before}] after [{after}]")
            shown += 1
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Schedule(policy={self.policy!r}, {len(self)} functions, budget={self.budget}, "
                f"in={self.bytes_in}, out={self.bytes_out}, peak={self.peak_bytes})")

    # -- JSON --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        def enc(steps):
            return [[[_CODE[a.kind], a.array] for a in step] for step in steps]
        return {
            "format": FORMAT, "version": VERSION, "policy": self.policy, "budget": self.budget,
            "options": self.options, "resident_at_start": list(self.resident_at_start),
            "resident_at_end": list(self.resident_at_end), "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out, "peak_bytes": self.peak_bytes,
            "resident_curve": list(self.resident_curve),
            "begin": enc(self.begin), "end": enc(self.end),
        }

    @staticmethod
    def from_dict(data: dict) -> "Schedule":
        from ..errors import ScheduleError
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ScheduleError(f"not an outcore schedule (expected \"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise ScheduleError(f"schedule format version {data.get('version')} is not supported "
                                f"(this outcore reads version {VERSION}); plan again")

        def dec(steps):
            try:
                return tuple(tuple(Action(_KIND[code], int(arr)) for code, arr in step)
                             for step in steps)
            except (KeyError, TypeError, ValueError) as exc:
                raise ScheduleError(f"malformed action list in schedule: {exc!r}") from exc
        try:
            return Schedule(
                policy=str(data["policy"]), budget=int(data["budget"]),
                begin=dec(data["begin"]), end=dec(data["end"]),
                resident_at_start=tuple(data["resident_at_start"]),
                resident_at_end=tuple(data["resident_at_end"]),
                bytes_in=int(data["bytes_in"]), bytes_out=int(data["bytes_out"]),
                peak_bytes=int(data["peak_bytes"]), resident_curve=tuple(data["resident_curve"]),
                options=dict(data.get("options", {})))
        except KeyError as exc:
            raise ScheduleError(f"schedule is missing field {exc.args[0]!r}") from exc

    def save(self, path) -> None:
        """Write the schedule as JSON, atomically: `path` holds the whole schedule or what
        it held before (NOTE [Atomic save] in run/checkpoint.py)."""
        from ..run.checkpoint import atomic_write_json
        atomic_write_json(path, self.to_dict())

    @staticmethod
    def load(path) -> "Schedule":
        import json
        with open(path) as fh:
            return Schedule.from_dict(json.load(fh))


def require_schedule(schedule, api: str) -> None:
    """Raise OutcoreError naming `api` unless `schedule` is a Schedule, or has the lists
    of one that simulate and check read (the auto policy's candidates, policies/auto.py)."""
    if isinstance(schedule, Schedule) or all(
            hasattr(schedule, name) for name in ("begin", "end", "resident_at_start")):
        return
    from ..errors import OutcoreError
    how = (f"load the file first: outcore.Schedule.load({os.fspath(schedule)!r})"
           if isinstance(schedule, (str, os.PathLike)) else "outcore.plan(trace, budget) makes one")
    raise OutcoreError(f"{api} needs a Schedule, got {type(schedule).__name__}: {how}")


def _actions(actions, shown: int = 12) -> str:
    """A function's actions for the listing: the first `shown`, then how many more (the
    first function of a step that starts on the slow tier reads in hundreds)."""
    if not actions:
        return "-"
    text = " ".join(map(str, actions[:shown]))
    return text + (f" ... and {len(actions) - shown} more" if len(actions) > shown else "")
