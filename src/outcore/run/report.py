"""What an OutOfCore run recorded, planned, moved, and waited for."""
from __future__ import annotations

import collections
import json
import math
import operator
import textwrap
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from ..errors import OutcoreError, file_kind
from ..memory.malloc import PROCESS_SLACK_BYTES, PROCESS_SLACK_SHARE
from ..units import count, exact_bytes, format_bytes

FORMAT = "outcore.report"
VERSION = 2        # 2: `elided` (a long run's iterations not listed); 1 still loads


@dataclass(frozen=True)
class IterationStats:
    index: int
    mode: str                  # "record" (on-demand while recording) or "replay"
    seconds: float
    bytes_read: int
    bytes_written: int
    unplanned_bytes: int       # moved by on-demand fallbacks and safety evictions
    wait_s: float              # the step blocked on transfers
    transfer_s: float          # the movers were busy (both directions)
    restore_s: float           # the iteration's end: transfers settled, state parked (mapped)
    peak_resident: int         # managed bytes in fast memory, at most
    deviation: str | None = None
    completed: bool = True
    tracked: bool = True       # False: the plan moved nothing and residency was not tracked
    skipped_actions: int = 0   # planned moves of arrays this iteration had not touched yet
    page_faults: int = 0       # the process's, during the step: memory the OS had to hand over
    trims: int = 0             # times the memory governor gave the heap's free pages back
    trimmed_bytes: int = 0     # what those trims took off the resident set: the step faults
                               # it in again where it reuses the memory
    rss_above_start: int = 0   # the process's peak resident set above its base, `rss_start`
                               # (sampled every op, 500 Hz at most)
    unmanaged: int = 0         # the most of that which was not managed tensors
    bytes_recomputed: int = 0  # activations made again instead of read back
    plan_s: float = 0.0        # a recording's planning, after the step (not in `seconds`)
    switched_at: int | None = None  # the function where it took up another shape's plan
    smaller: bool = False      # replayed a plan with some arrays smaller than planned
    outgrew: bool = False      # left its plan at an array larger than planned
    op_by_op: bool = False     # a recording no plan can run: its shape runs op by op (rule 11)
    over_why: str | None = None     # over the budget: an op made more than its meta kernel said

    @property
    def overlap(self) -> float:
        """Share of transfer time hidden behind compute (1.0: the step never waited)."""
        if self.transfer_s <= 0:
            return 1.0
        return max(0.0, 1.0 - self.wait_s / self.transfer_s)


# How many iterations a run's report lists one by one: the first (recording and learning
# the step's shapes happen there) and the most recent. Those between are summed into
# `Elided`: a run of a million iterations kept every IterationStats (about 600 B each,
# so 600 MB of the process's memory, outside the budget) and printed a million lines.
KEEP_FIRST = 20
KEEP_LAST = 500
# How many of the listed ones `print(report)` shows at each end; the rest in one line.
# The header's lines are wrapped at this width, the rest of a line indented past the
# labels (helper-165: lines of 400+ characters); the table's rows are not.
WIDTH = 100


def _wrapped(line: str) -> str:
    return textwrap.fill(line, WIDTH, subsequent_indent=" " * 12, break_long_words=False,
                         break_on_hyphens=False)


PRINT_FIRST = 20
PRINT_LAST = 20


@dataclass(frozen=True)
class Elided:
    """Iterations a report does not list one by one: how many, which, and their sums
    and extremes (the columns of the table, as one row would have them)."""
    count: int = 0
    first_index: int = 0
    last_index: int = 0
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    unplanned_bytes: int = 0
    wait_s: float = 0.0
    transfer_s: float = 0.0
    restore_s: float = 0.0
    skipped_actions: int = 0
    bytes_recomputed: int = 0
    page_faults: int = 0
    trims: int = 0
    trimmed_bytes: int = 0
    plan_s: float = 0.0            # planning after the recordings among them
    recordings: int = 0
    deviations: int = 0
    interrupted: int = 0
    over_budget: int = 0           # iterations whose managed peak passed the budget
    peak_resident: int = 0         # the largest of the iterations' peaks
    rss_above_start: int = 0       # the largest
    unmanaged: int = 0             # the largest

    # Fields `join` takes the larger of, and those it takes from one side; the rest add up.
    _LARGEST = ("peak_resident", "rss_above_start", "unmanaged")

    @staticmethod
    def of(it: IterationStats, budget: int) -> "Elided":
        """Iteration `it` alone."""
        return Elided(
            count=1, first_index=it.index, last_index=it.index, seconds=it.seconds,
            bytes_read=it.bytes_read, bytes_written=it.bytes_written,
            unplanned_bytes=it.unplanned_bytes, wait_s=it.wait_s, transfer_s=it.transfer_s,
            restore_s=it.restore_s, skipped_actions=it.skipped_actions,
            bytes_recomputed=it.bytes_recomputed, page_faults=it.page_faults,
            trims=it.trims, trimmed_bytes=it.trimmed_bytes, plan_s=it.plan_s,
            recordings=int(it.mode == "record"), deviations=int(bool(it.deviation)),
            interrupted=int(not it.completed), over_budget=int(it.peak_resident > budget),
            peak_resident=it.peak_resident, rss_above_start=it.rss_above_start,
            unmanaged=it.unmanaged)

    @staticmethod
    def over(rows, budget: int) -> "Elided":
        """`add` of each of `rows` (in order) to an empty summary, a column at a time
        rather than a new summary per row (the same sums, in the same order): a report
        printed at every iteration folded its up to 500 listed rows one by one, 7.8 ms a
        print after 520 iterations (helper-189)."""
        parts = [Elided.of(it, budget) for it in rows]
        if not parts:
            return Elided()
        columns = [f.name for f in fields(Elided) if f.name not in ("first_index", "last_index")]
        return Elided(**{name: (max if name in Elided._LARGEST else sum)(
            getattr(part, name) for part in parts) for name in columns},
            first_index=parts[0].first_index, last_index=parts[-1].last_index)

    def add(self, it: IterationStats, budget: int) -> "Elided":
        """This summary with iteration `it` in it too (iterations come in order)."""
        return self.join(Elided.of(it, budget))

    def join(self, later: "Elided") -> "Elided":
        """This summary and `later`'s, of the iterations after these, as one."""
        if not self.count:
            return later
        if not later.count:
            return self
        joined = {f.name: (max if f.name in self._LARGEST else operator.add)(
            getattr(self, f.name), getattr(later, f.name)) for f in fields(self)
            if f.name not in ("first_index", "last_index")}
        return Elided(**joined, first_index=self.first_index, last_index=later.last_index)

    def line(self, budget: int, listed: str) -> str:
        """The report's row for these iterations."""
        events = [f"{n} {word}" for n, word in ((self.recordings, "recorded"),
                  (self.deviations, "deviated"), (self.interrupted, "interrupted"),
                  (self.over_budget, "over the budget")) if n]
        return (f"  {self.first_index:>4}-{self.last_index}: {self.count:,} iterations, "
                f"{self.seconds:.2f}s in all, read {format_bytes(self.bytes_read)}, written "
                f"{format_bytes(self.bytes_written)}, unplanned "
                f"{format_bytes(self.unplanned_bytes)}, waited {self.wait_s:.2f}s"
                + (f" of {self.transfer_s:.2f}s moving" if self.transfer_s else "")   # v2 files: 0
                + ", "
                f"{_thousands(self.page_faults)} faults; peak at most "
                f"{format_bytes(self.peak_resident)}, rss+ at most "
                f"{format_bytes(self.rss_above_start)}, unmanaged at most "
                f"{format_bytes(self.unmanaged)}"
                + (f"; {', '.join(events)}" if events else "")
                + (f"; recomputed {format_bytes(self.bytes_recomputed)}"
                   if self.bytes_recomputed else "")
                + (f"; {count(self.trims, 'trim')} gave back {format_bytes(self.trimmed_bytes)}"
                   if self.trims else "")
                + (f"; planned in {self.plan_s:.2f}s" if self.plan_s else "")
                + (f"; {self.skipped_actions} planned moves skipped" if self.skipped_actions
                   else "")
                + f" ({listed})")


class IterationLog:
    """The iterations of a run, as its report lists them: the first KEEP_FIRST and the
    last KEEP_LAST one by one, those between summed (`Elided`). Memory stays bounded
    however long the run; `len` counts every iteration."""

    def __init__(self, budget: int):
        self.budget = budget
        self._first: list[IterationStats] = []
        self._last: collections.deque[IterationStats] = collections.deque()
        self.elided = Elided()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def last(self) -> IterationStats:
        return self._last[-1] if self._last else self._first[-1]

    def append(self, it: IterationStats) -> None:
        self._count += 1
        if len(self._first) < KEEP_FIRST:
            self._first.append(it)
            return
        if len(self._last) == KEEP_LAST:
            self.elided = self.elided.add(self._last.popleft(), self.budget)
        self._last.append(it)

    def amend_last(self, **changes) -> None:
        """The last iteration with `changes` (its planning time, known after it)."""
        if self._last:
            self._last[-1] = replace(self._last[-1], **changes)
        else:
            self._first[-1] = replace(self._first[-1], **changes)

    def listed(self) -> tuple[IterationStats, ...]:
        return (*self._first, *self._last)


def _thousands(n: int) -> str:
    return f"{n / 1000:.0f}k" if n >= 1000 else str(n)


@dataclass(frozen=True)
class Report:
    """What an OutOfCore did, from `ooc.report()`: the budget, the plan in use and one
    row per iteration (`IterationStats`: how it ran, its time, bytes moved, waits, page
    faults, the resident set). `print(report)` gives the table (docs/see.md, "The
    report"); `to_dict()` the same as plain data; `save(path)` writes it as JSON, whole
    or not at all; `Report.load(path)` or `outcore report PATH` reads it back. Of a long
    run the first KEEP_FIRST and the last KEEP_LAST iterations are kept, and `elided`
    sums the rest."""
    budget: int
    policy: str
    swap: str
    functions: int
    in_core_peak: int              # of the step the plan in use last was made for; 0
                                   # until a step is planned
    planned_peak: int | None
    planned_in: int | None
    planned_out: int | None
    pinned_bytes: int
    iterations: tuple[IterationStats, ...] = field(default_factory=tuple)
                                   # the first KEEP_FIRST and the last KEEP_LAST; those
                                   # between summed in `elided`
    rss_start: int = 0         # the process's base: its resident set when the first iteration
                               # began, less the managed bytes (NOTE [The process's base])
    planned_recomputed: int = 0    # bytes of activations the plan recomputes per iteration
    recomputed_arrays: int = 0     # how many
    huge_pages: str = ""           # PyTorch's huge pages for large CPU tensors: "on (...)" or
                                   # "off: why" (memory/pages.py); "" for a GPU budget
    rss_made: int = 0              # the resident set when the OutOfCore was made
    rss_adopted: int = 0           # state made before the OutOfCore that the first iteration
                                   # took over, taken off rss_start (NOTE [The process's
                                   # base] rule 5)
    planned_budget: int | None = None   # what the plan got: the budget less what never moves
    planned_between: tuple[int, int] = (0, 0)   # bytes read, written between iterations
                                                 # (Schedule.boundary)
    step_shapes: int = 0           # plans kept, one per shape of step (NOTE [Step shapes])
    held_peak: int = 0             # that step's peak as plain PyTorch holds it: each tensor
                                   # until it is freed, not until its last use (`Trace.peak(
                                   # actual=True)`; helper-159 read the lower figure and
                                   # found a plan above it); 0 where unknown
    largest_in_core_peak: int = 0  # the largest in_core_peak of the steps planned: with
                                   # several shapes (an eval step, sizes that vary),
                                   # in_core_peak is that of the plan in use last. Steps
                                   # replayed passively (nothing moves) are not measured:
                                   # at a budget above every peak, a longer step later
                                   # replays and is not counted (docs/see.md)
    rss_bound: int = 0             # how far above rss_start the process grew at most on the
                                   # workloads measured (malloc.process_slack); 0 where that
                                   # was not measured (a GPU budget, return_freed_memory other
                                   # than "trim")
    elided: Elided = field(default_factory=Elided)   # the iterations not in `iterations`
                                   # (a long run; count 0: none)
    op_by_op_steps: int = 0        # steps that ran op by op within the budget, as no plan
                                   # of them fits it (NOTE [Step shapes] rule 11)
    op_by_op_plan_needs: int = 0   # the smallest budget a plan of the largest of them needs

    @property
    def deviations(self) -> int:
        """Iterations that left their plan, listed or not."""
        return (sum(1 for it in self.iterations if it.deviation)
                + self.elided.deviations)

    @property
    def recordings(self) -> int:
        """Iterations recorded, listed or not."""
        return (sum(1 for it in self.iterations if it.mode == "record")
                + self.elided.recordings)

    @property
    def iteration_count(self) -> int:
        """Iterations run, listed or not."""
        return len(self.iterations) + self.elided.count

    # -- JSON --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain data (json.dumps takes it): every field, iterations as a list of dicts."""
        return {"format": FORMAT, "version": VERSION, **asdict(self),
                "planned_between": list(self.planned_between),        # as JSON has it
                "iterations": [asdict(it) for it in self.iterations],
                "elided": asdict(self.elided)}

    @staticmethod
    def from_dict(data: dict, source: str = "the data") -> "Report":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise OutcoreError(f"{source} is not an outcore report (expected \"format\": "
                               f"\"{FORMAT}\"){file_kind(data)}; write a report with "
                               "ooc.report().save(path)")
        if data.get("version") not in (1, VERSION):
            raise OutcoreError(f"report format version {data.get('version')} is not supported "
                               f"(this outcore reads versions 1 to {VERSION})")
        try:
            if "iterations" not in data:
                raise TypeError("it has no 'iterations' field")
            its = tuple(IterationStats(**_known(IterationStats, it)) for it in data["iterations"])
            known = _known(Report, data)
            between = known.get("planned_between", (0, 0))
            if (not isinstance(between, (list, tuple)) or len(between) != 2 or any(
                    isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in between)):
                raise TypeError(f"Report.planned_between must be two byte counts, found "
                                f"{between!r:.40}")
            elided = data.get("elided")
            elided = Elided() if elided is None else Elided(**_known(Elided, elided))
            report = Report(**{**known, "iterations": its, "planned_between": tuple(between),
                               "elided": elided})
        except (KeyError, TypeError) as exc:
            raise OutcoreError(f"malformed outcore report: {exc}") from exc
        if isinstance(report.budget, bool) or not isinstance(report.budget, int) or report.budget <= 0:
            raise OutcoreError(f"malformed outcore report: its budget must be a positive byte "
                               f"count, found {report.budget!r}")
        return report

    def save(self, path) -> None:
        """Write the report as JSON, whole or not at all (NOTE [Atomic save]);
        `outcore report PATH` prints it."""
        from .checkpoint import atomic_write_json
        atomic_write_json(path, self.to_dict(), indent=1)

    @staticmethod
    def load(path) -> "Report":
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise OutcoreError(f"{path} is not JSON ({exc}); is it an outcore report?") from exc
        return Report.from_dict(data, str(path))

    def _between(self) -> str:
        """The planned moves between iterations, beside those within the step."""
        read, written = self.planned_between
        if not (read or written):
            return ""
        both = " and ".join(f"{format_bytes(n)} {word}" for n, word in
                            ((read, "read"), (written, "written")) if n)
        return (f"; and {both} between iterations (state the step ends with on one tier "
                "and the next starts with on the other: the plan moves fewer bytes in all so)")

    def __str__(self) -> str:
        lines = [f"outcore report: budget {format_bytes(self.budget)}, policy {self.policy}, swap {self.swap}"]
        if self.functions:
            largest = (f"; the largest of the steps planned {format_bytes(self.largest_in_core_peak)}"
                       f" ({self.largest_in_core_peak / self.budget:.2f}x)"
                       if self.largest_in_core_peak > self.in_core_peak else "")
            held = (f", {format_bytes(self.held_peak)} as plain PyTorch holds them, each until "
                    f"it is freed ({self.held_peak / self.budget:.2f}x)"
                    if self.held_peak > self.in_core_peak else "")
            # Of the plan the last iteration used: with several, an evaluation step's read
            # as the training step's (helper-160).
            which = (f"the step of the last iteration, one of {self.step_shapes} planned: "
                     if self.step_shapes > 1 else "")
            lines.append(f"  recorded: {which}{self.functions} functions, in-core peak "
                         f"{format_bytes(self.in_core_peak)} "
                         f"of tensors in use ({self.in_core_peak / self.budget:.2f}x the budget)"
                         f"{held}; a plain run's resident memory is more: the allocator keeps "
                         f"what was freed, the process its libraries{largest}")
        if self.planned_peak is not None:
            lines.append(f"  planned:  peak {format_bytes(self.planned_peak)}, per iteration "
                         f"{format_bytes(self.planned_in)} in, {format_bytes(self.planned_out)} out"
                         + (f", {format_bytes(self.planned_recomputed)} recomputed "
                            f"({self.recomputed_arrays} activations)"
                            if self.recomputed_arrays else "")
                         + self._between())
        if self.op_by_op_steps:
            lines.append(f"  op by op: {self.op_by_op_steps} step(s) ran op by op within the "
                         "budget, recorded each time and never planned: a plan keeps room for "
                         "what never moves at its peak throughout and needs at least "
                         f"{exact_bytes(self.op_by_op_plan_needs)} for them; from that budget "
                         "on they replay a plan, faster (NOTE [Step shapes] in run/plans.py, "
                         "rule 11)")
        if self.step_shapes > 1:
            lines.append(f"  plans:    {self.step_shapes} shapes of step, a plan each (the lines "
                         "above are of the one the last iteration used; docs/executor.md, "
                         "\"Steps of several shapes\"); where one ends with state on another "
                         "tier than the next starts with, that state moves between them, "
                         "counted in the rows' read and written, not in the planned bytes")
        kept = (self.budget - self.planned_budget) if self.planned_budget is not None else 0
        if self.pinned_bytes or kept > 0:
            lines.append(f"  pinned in fast memory (small, not resizable, or kept by a collective or "
                         f"FSDP): {format_bytes(self.pinned_bytes)}"
                         + (f" now; the plan leaves them up to {format_bytes(kept)} of the budget "
                            "(their most alive at once), and plans the rest: the measured peak "
                            "counts both, the planned one only the plan's" if kept > 0 else ""))
        if self.huge_pages:
            lines.append(f"  huge pages for tensors: {self.huge_pages}")
        if self.iterations:
            made = (f"{format_bytes(self.rss_made)} when made, " if self.rss_made else "")
            adopted = (f", and the {format_bytes(self.rss_adopted)} of state made before the "
                       "first iteration that it took over" if self.rss_adopted else "")
            lines.append(f"  resident set: {made}{format_bytes(self.rss_start)} when the first "
                         f"iteration began (less the managed bytes{adopted}: the base); per "
                         "iteration "
                         "its peak above the base (rss+) and the most of it that was not managed "
                         "tensors (unmanaged: heap kept, library buffers, mapped pages)"
                         + (f"; on the workloads measured in docs/state.md (OutOfCore made "
                            f"before the model) rss+ stayed within "
                            f"the budget + {format_bytes(PROCESS_SLACK_BYTES)} + budget/"
                            f"{PROCESS_SLACK_SHARE} (here {format_bytes(self.rss_bound)})"
                            if self.rss_bound else ""))
            if self.elided.unplanned_bytes or any(
                    it.mode == "replay" and it.unplanned_bytes for it in self.iterations):
                # helper-162, helper-165: a small constant figure in every replay, unsaid.
                lines.append("  unplanned: bytes read or written outside the plan: the rest "
                             "of a step run op by op after it left its plan, safety "
                             "evictions, and storages the record does not know or that "
                             "outlive it there (a batch the loop still holds while the next "
                             "one loads), written out to keep the budget (docs/see.md)")
            lines = [_wrapped(line) for line in lines]
            lines.append("  iter  mode     time     read       written    unplanned  waited   overlap  "
                         "faults  trims  peak        rss+        unmanaged")
            rows = self.iterations
            # The summed ones lie between the listed ones before and after them.
            cut = self.elided.first_index if self.elided.count else None
            if cut is None and len(rows) <= PRINT_FIRST + PRINT_LAST + 1:
                lines += self._rows(rows)
            else:
                first = [it for it in rows if cut is None or it.index < cut][:PRINT_FIRST]
                last = [it for it in rows[len(first):]
                        if cut is None or it.index > cut][-PRINT_LAST:]
                lines += self._rows(first)
                lines.append(self._middle(rows[len(first):len(rows) - len(last)]))
                lines += self._rows(last)
            return "\n".join(lines)
        return "\n".join(_wrapped(line) for line in lines)

    def _middle(self, rows) -> str:
        """One line for the iterations between those printed: `rows`, listed, and the
        elided ones, between the first and the last listed."""
        later = [it for it in rows if self.elided.count and it.index > self.elided.last_index]
        before = Elided.over(rows[:len(rows) - len(later)], self.budget)
        middle = before.join(self.elided).join(Elided.over(later, self.budget))
        if rows and self.elided.count:
            where = (f"not printed: ooc.report().iterations lists {len(rows)} of them, the "
                     "others are summed in its `elided`")
        elif self.elided.count:
            where = "summed in ooc.report().elided"
        else:
            where = "not printed: listed in ooc.report().iterations"
        return middle.line(self.budget, where)

    def _rows(self, rows) -> list[str]:
        lines = []
        for it in rows:
            lines.append(
                f"  {it.index:>4}  {it.mode:<7} {it.seconds:>6.2f}s {format_bytes(it.bytes_read):>10} "
                f"{format_bytes(it.bytes_written):>10} {format_bytes(it.unplanned_bytes):>10} "
                f"{it.wait_s:>6.2f}s  "
                + (f"{it.overlap * 100:>5.1f}%" if it.transfer_s > 0 else f"{'-':>6}")
                + f"  {_thousands(it.page_faults):>6} "
                f"{it.trims:>6}  {format_bytes(it.peak_resident):<10}  "
                f"{format_bytes(it.rss_above_start):<10}  {format_bytes(it.unmanaged)}"
                + ("" if it.tracked else " (planned; nothing moves, not tracked)")
                + (f"  (then planned in {it.plan_s:.2f}s)" if it.plan_s else "")
                + ("" if it.completed else "  (interrupted)"))
            if it.peak_resident > self.budget:
                lines.append(f"        peak {format_bytes(it.peak_resident - self.budget)} "
                             "over the budget: " + (it.over_why or OVER_BUDGET_WHY))
            if self.rss_bound and it.rss_above_start > self.rss_bound:
                lines.append(f"        rss+ passed {format_bytes(self.rss_bound)}: more memory "
                             "outside the managed tensors than on the workloads measured "
                             "(a library's first-run buffers, heap kept); nothing plans "
                             "for it yet")
            if it.trimmed_bytes:
                lines.append(f"        the allocator gave back {format_bytes(it.trimmed_bytes)} "
                             f"in {count(it.trims, 'trim')} (to keep rss+ within the budget + "
                             f"{format_bytes(PROCESS_SLACK_BYTES)} + budget/"
                             f"{PROCESS_SLACK_SHARE}); the step faulted in again what it reused")
            if it.bytes_recomputed:
                lines.append(f"        recomputed {format_bytes(it.bytes_recomputed)} instead "
                             "of reading it back")
            if it.op_by_op:
                lines.append("        ran op by op within the budget: no plan of this step "
                             "fits it (\"op by op\" above)")
            if it.switched_at is not None:
                lines.append(f"        from function {it.switched_at} on, followed the plan "
                             "of another shape of step whose record begins the same "
                             "(NOTE [Step shapes] in run/plans.py, rule 9)")
            if it.skipped_actions:
                lines.append(f"        {it.skipped_actions} planned moves skipped: their arrays "
                             "had not been touched yet in this iteration")
            if it.smaller:
                lines.append("        some arrays smaller than the plan's (the same ops "
                             "on shorter sequences or a smaller batch): replayed it "
                             "(NOTE [Step shapes] in run/plans.py, rule 10)")
            if it.deviation and it.outgrew:
                lines.append(f"        deviated from the record: {it.deviation}; the rest "
                             "ran on demand, and the next step of the same ops is "
                             "recorded to plan for the larger sizes (NOTE [Step shapes] in "
                             "run/plans.py, rule 10)")
            elif it.deviation:
                lines.append(f"        deviated from the record: {it.deviation}; the rest "
                             "ran on demand (a step of this shape is recorded when one is "
                             "expected: NOTE [Step shapes] in run/plans.py)")
        return lines


# Why an iteration's managed peak can pass the budget without an error (the warning and
# the report's line say the same).
_UNANNOUNCED = ("an op outcore met for the first time made more than its meta kernel "
                "said, or than its largest input where it has none (an LSTM's workspace: "
                "later iterations leave room for it)")
_UNMOVABLE = ("tensors that cannot move (numpy arrays kept, shared memory, from_numpy) "
              "held more than the plan had room for")
OVER_BUDGET_WHY_WARNED = f"{_UNANNOUNCED}, or {_UNMOVABLE}"
# The report's row: where InfeasibleBudget was raised in the iteration, that too (the
# warning is given only where it was not: helper-212 read a cause ruled out there).
OVER_BUDGET_WHY = (f"{_UNANNOUNCED}, {_UNMOVABLE}, or one op needed more than the budget at "
                   "once (InfeasibleBudget was raised in that iteration)")


def _known(cls, data: dict) -> dict:
    """The keys of `data` that are fields of `cls`: a report written by a newer outcore
    with more columns still loads. A field declared a count must hold a non-negative
    integer, a duration a non-negative finite number, a flag a bool and a name a string
    (TypeError naming it otherwise: a hand-edited report would print nonsense, or fail
    later)."""
    if not isinstance(data, dict):
        raise TypeError(f"expected an object of {cls.__name__} fields, found {data!r:.40}")
    names = {f.name: f.type for f in fields(cls)}
    out = {k: v for k, v in data.items() if k in names}
    for key, value in out.items():
        if value is None and names[key].endswith(" | None"):
            continue
        kind = names[key].removesuffix(" | None")
        numeric = int if kind == "int" else (int, float)
        if kind in ("int", "float") and (
                isinstance(value, bool) or not isinstance(value, numeric)
                or not 0 <= value < math.inf):
            what = "a byte count or count (an integer >= 0)" if kind == "int" else "a number >= 0"
            raise TypeError(f"{cls.__name__}.{key} must be {what}, found {value!r:.40}")
        if kind in ("str", "bool") and not isinstance(value, str if kind == "str" else bool):
            what = "a string" if kind == "str" else "a bool"
            raise TypeError(f"{cls.__name__}.{key} must be {what}, found {value!r:.40}")
    missing = [f.name for f in fields(cls) if f.name not in data
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise TypeError(f"{cls.__name__} has no {', '.join(repr(m) for m in missing)} "
                        f"field{'s' if len(missing) > 1 else ''}")
    return out
