"""Keep the process's resident memory near the budget without paying for it on every tensor.

glibc keeps freed heap memory for reuse, so a process that streams gigabytes of
activations through a small budget sits far above that budget in resident memory.
Two ways to give it back (docs/executor.md, "The allocator governor", has the
measurements and their commands):

* "eager": every allocation of 64 KiB or more becomes its own mapping, unmapped on free.
  Resident memory follows the live bytes closely, but every new tensor faults in fresh,
  zeroed pages, which slows even an in-core step.
* "trim" (the default, `TrimGovernor`): every allocation stays on glibc's heap, where
  freed memory is reused without faults, and the heap's free pages are handed back
  (`malloc_trim`) only when the resident set grows past a limit. Page faults are what
  this saves: plain PyTorch on glibc's defaults maps every tensor over its mmap
  threshold (up to 32 MiB) on its own and faults it in afresh each time, every step.
  The limit is generous until the budget first needs room (the resident set at the
  first iteration plus the budget and a slack of 64 MiB + budget/5: a step that fits is
  never trimmed). From the first eviction on, the trim point is the process bound (its
  base plus the budget plus `process_slack`, NOTE [The process's base] in run/ooc.py)
  less a margin for what the step allocates before the next check (32 MiB and the
  largest storage the step has made, or the most it grew between two readings): the
  heap keeps what the bound allows, and every
  trim is one the bound needed (`trim_ceiling`, NOTE [Trim at the bound]).

Both modes are governor objects with one interface (`make_governor(mode)`):
`start(budget, rss_start)` at the first iteration, `tighten()` at the first eviction,
`check()` where memory is freed or taken, `stop()` at close() or garbage collection.

NOTE [One governor per process]
glibc's settings are process-wide, so at most one governor steers them: `start()`
claims a module-level record (`steering_governor()`) and raises OutcoreError while
another governor holds it; `stop()` releases it. The record is claimed before the first
mallopt and released after the last, so a governor that may have changed glibc's
settings always holds it. stop() keeps no reference to an OutOfCore, catches the
exceptions of its own work, does nothing twice, and can be called again after an
interrupted stop() or start(): it is safe from a `weakref.finalize` callback. State
that the checks read (`TrimGovernor._limits`) changes by one attribute store, so a
KeyboardInterrupt between two bytecodes leaves either the old state or the new one.

NOTE [What stop() restores]
"trim" hands mallopt M_MMAP_MAX and M_TRIM_THRESHOLD, "eager" M_MMAP_THRESHOLD and
M_TRIM_THRESHOLD; M_TOP_PAD is never touched. In glibc (malloc.c `do_set_*`, read in
2.36, this machine's; older versions do the same inside mallopt itself), *any* mallopt
of M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD or M_MMAP_MAX also sets
`mp_.no_dyn_threshold = 1`, and nothing ever sets it back. It is the switch of the
dynamic threshold: while it is 0, `free()` of an mmapped chunk larger than
`mmap_threshold` and at most DEFAULT_MMAP_THRESHOLD_MAX (32 MiB on 64-bit, 512 KiB on
32-bit) raises `mmap_threshold` to that chunk's size and `trim_threshold` to twice it
(`__libc_free`). glibc sets the switch at start-up too when the environment fixes one
of the four (MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_, MALLOC_MMAP_THRESHOLD_,
MALLOC_MMAP_MAX_, or their glibc.malloc.* names in GLIBC_TUNABLES: the tunables'
callbacks in arena.c are the same `do_set_*`). So, decided at start() (`_restore_plan`):

* The environment fixed one of them (read from /proc/self/environ, the environment
  glibc saw, with glibc's number syntax and precedence: `fixed_at_start`): the
  thresholds were static from the start, and stop() puts back exactly the values glibc
  had for the options this mode changed: the user's, or glibc's defaults for those not
  given (mmap_threshold 128 KiB, trim_threshold 128 KiB, mmap_max 65536). The one loss:
  a value mallopt's int cannot carry (2 GiB up to 2**64 - 2 GiB) comes back as INT_MAX.
* Otherwise the dynamic threshold was on. Turning it back on is impossible (no public
  interface reaches `no_dyn_threshold`), and reading how far it had got is too (no call
  returns `mp_.mmap_threshold`). stop() sets the values it converges to in a process
  that frees mmapped chunks of up to 32 MiB, as a training step does: mmap_threshold
  32 MiB, trim_threshold 64 MiB, mmap_max 65536 (all three, whichever mode). Not
  restored: the thresholds no longer move. A process whose largest freed mapping stays
  below 32 MiB would have kept its threshold there; after stop() it keeps allocations
  between that size and 32 MiB on the heap (fewer page faults than without outcore,
  and up to 64 MiB of free heap top kept rather than twice its own threshold).
  Before, stop() set only M_MMAP_MAX=65536 and M_TRIM_THRESHOLD=128 KiB, which froze
  mmap_threshold wherever glibc had got to at start() (under 1 MiB when outcore starts
  before the step's first large free): every tensor above it was mapped and faulted in
  afresh at each step, and the heap's top trimmed past 128 KiB, ever after
  (benchmarks/faults_after_close.py; tests/run/test_malloc.py, real glibc).
* A program that called mallopt itself before start() (no_dyn_threshold already 1,
  its own values) cannot be told apart from the second case: stop() sets the values
  above in place of its own.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import time
import weakref
from typing import NamedTuple

from ..errors import OutcoreError
from ..units import format_bytes

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_GLIBC_MMAP_MAX = 65536                # glibc's static defaults (malloc.c)
_GLIBC_TRIM_THRESHOLD = 128 * 1024
_GLIBC_MMAP_THRESHOLD = 128 * 1024
_GLIBC_TOP_PAD = 0
# The ceiling of glibc's dynamic mmap threshold, DEFAULT_MMAP_THRESHOLD_MAX:
# 4 MiB * sizeof(long) on 64-bit, 512 KiB on 32-bit.
_DYNAMIC_MMAP_THRESHOLD_MAX = 4 * 2**20 * 8 if ctypes.sizeof(ctypes.c_void_p) == 8 else 512 * 1024
_NEVER = 2**62
_C_INT_MAX = 2**31 - 1                 # mallopt takes a C int: 2**62 would arrive as 0

# option: (its GLIBC_TUNABLES name, its environment alias, glibc's static default)
_TUNABLES = {
    _M_TRIM_THRESHOLD: ("glibc.malloc.trim_threshold", "MALLOC_TRIM_THRESHOLD_", _GLIBC_TRIM_THRESHOLD),
    _M_TOP_PAD: ("glibc.malloc.top_pad", "MALLOC_TOP_PAD_", _GLIBC_TOP_PAD),
    _M_MMAP_THRESHOLD: ("glibc.malloc.mmap_threshold", "MALLOC_MMAP_THRESHOLD_", _GLIBC_MMAP_THRESHOLD),
    _M_MMAP_MAX: ("glibc.malloc.mmap_max", "MALLOC_MMAP_MAX_", _GLIBC_MMAP_MAX),
}
# What stop() sets where the dynamic threshold was on (NOTE [What stop() restores]).
_CONVERGED = {
    _M_MMAP_THRESHOLD: _DYNAMIC_MMAP_THRESHOLD_MAX,    # mallopt takes it: 2.36 has no bound, older ones HEAP_MAX_SIZE/2
    _M_TRIM_THRESHOLD: 2 * _DYNAMIC_MMAP_THRESHOLD_MAX,
    _M_MMAP_MAX: _GLIBC_MMAP_MAX,
}

_found_libc: list = []


def _libc():
    """glibc through ctypes, or None where the C library has no mallopt/malloc_trim.
    Looked up once per process (find_library runs ldconfig)."""
    if not _found_libc:
        libc = None
        name = ctypes.util.find_library("c")
        if name:
            try:
                libc = ctypes.CDLL(name)
                libc.mallopt, libc.malloc_trim
            except (OSError, AttributeError):
                libc = None
        _found_libc.append(libc)
    return _found_libc[0]


# -- what the environment fixed at start-up (NOTE [What stop() restores]) ---------------
def _glibc_number(text: str) -> int:
    """A number as glibc's tunables read it (_dl_strtoul): blanks, a sign, 0x for hex,
    a leading 0 for octal, digits up to the first that does not fit, nothing read as 0;
    the result as an unsigned 64-bit value (UINT64_MAX on overflow)."""
    text = text.lstrip(" \t")
    negative = text[:1] == "-"
    if text[:1] in "+-" and text:
        text = text[1:]
    if not text[:1].isdigit():
        return 0
    base, digits = 10, "0123456789"
    if text[0] == "0":
        if text[1:2] in ("x", "X"):
            base, digits, text = 16, "0123456789abcdefABCDEF", text[2:]
        else:
            base, digits = 8, "01234567"
    n, value = 0, 0
    while n < len(text) and text[n] in digits:
        value = value * base + int(text[n], 16)
        if value >= 2**64:
            return 2**64 - 1
        n += 1
    return (-value) % 2**64 if negative else value


def _tunable_value(option: int, text: str) -> int | None:
    """The value glibc takes for `option` from `text`, or None where it refuses it."""
    value = _glibc_number(text)
    if option == _M_MMAP_MAX:               # INT_32, minval 0 (elf/dl-tunables.list)
        signed = value - 2**64 if value >= 2**63 else value
        return signed if 0 <= signed <= _C_INT_MAX else None
    return value                            # SIZE_T: every value fits


def _start_environment() -> list[tuple[str, str]]:
    """The environment the process started with, as glibc read it: /proc/self/environ
    (os.environ can have changed since)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
        pairs = []
        for entry in raw.split(b"\0"):
            name, sep, value = entry.partition(b"=")
            if sep:
                pairs.append((os.fsdecode(name), os.fsdecode(value)))
        return pairs
    except OSError:
        return list(os.environ.items())


def fixed_at_start(environment: list[tuple[str, str]] | None = None) -> dict[int, int]:
    """The options among M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD and M_MMAP_MAX
    that glibc's start-up took from the environment, with their values. Any entry means
    glibc's dynamic mmap threshold was off from the start. GLIBC_TUNABLES wins over the
    MALLOC_*_ aliases (elf/dl-tunables.c: an alias is read only while its tunable is
    unset, and GLIBC_TUNABLES sets it whatever its order)."""
    env = _start_environment() if environment is None else environment
    by_alias = {alias: option for option, (_, alias, _) in _TUNABLES.items()}
    by_name = {name: option for option, (name, _, _) in _TUNABLES.items()}
    from_alias: dict[int, int] = {}
    from_tunables: dict[int, int] = {}
    for name, value in env:
        if name == "GLIBC_TUNABLES":
            for item in value.split(":"):
                key, sep, text = item.partition("=")
                if sep and key in by_name:
                    parsed = _tunable_value(by_name[key], text)
                    if parsed is not None:
                        from_tunables[by_name[key]] = parsed
        elif name in by_alias and by_alias[name] not in from_alias:
            parsed = _tunable_value(by_alias[name], value)
            if parsed is not None:
                from_alias[by_alias[name]] = parsed
    return {**from_alias, **from_tunables}


def _c_int(value: int) -> int:
    """A size_t for mallopt's int: glibc widens a negative int with its sign, so values
    within 2 GiB of 2**64 travel as negatives; those in between cannot, and get INT_MAX."""
    if value <= _C_INT_MAX:
        return value
    if value >= 2**64 - 2**31:
        return value - 2**64
    return _C_INT_MAX


def _restore_plan(changed: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(option, value) pairs that put glibc back after mallopt of `changed`
    (NOTE [What stop() restores])."""
    fixed = fixed_at_start()
    if fixed:                               # static from the start: exactly what glibc had
        return tuple((option, _c_int(fixed.get(option, _TUNABLES[option][2]))) for option in changed)
    options = tuple(changed) + tuple(o for o in _CONVERGED if o not in changed)
    return tuple((option, _CONVERGED[option]) for option in options)


# -- measurements ----------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE")
_statm = None


def _statm_fields() -> list[bytes]:
    """The fields of /proc/self/statm (in pages): one pread on a descriptor kept open (a
    fork reopens it: /proc/self is per process)."""
    global _statm
    if _statm is None or _statm[0] != os.getpid():
        _statm = (os.getpid(), os.open("/proc/self/statm", os.O_RDONLY))
    return os.pread(_statm[1], 128, 0).split()


def _statm_pages(field: int) -> int:
    return int(_statm_fields()[field])


def resident_bytes() -> int:
    """The process's resident set (VmRSS), in bytes."""
    return _statm_pages(1) * _PAGE


def resident_and_file_bytes() -> tuple[int, int]:
    """`resident_bytes()` and `file_resident_bytes()` of one reading."""
    fields = _statm_fields()
    return int(fields[1]) * _PAGE, int(fields[2]) * _PAGE


def peak_resident_bytes() -> int:
    """The process's peak resident set so far (VmHWM), in bytes; 0 where /proc has none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def file_resident_bytes() -> int:
    """The file-backed and shared part of the resident set, in bytes."""
    return _statm_pages(2) * _PAGE


def page_faults() -> int:
    """Page faults of this process so far (minor and major): each is a page the OS had
    to hand over, e.g. memory given back and taken again."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


PROCESS_SLACK_BYTES, PROCESS_SLACK_SHARE = 128 * 2**20, 5     # process_slack's two parts


def process_slack(budget: int) -> int:
    """How far above its base (NOTE [The process's base] in run/ooc.py), plus the budget,
    the whole process grew at most on the workloads measured (docs/state.md, "Figures"):
    128 MiB + budget/5. It holds what no plan counts: memory PyTorch itself keeps from a
    training step's first run (thread pools, library buffers, kernels' code: about
    70 MiB, plain PyTorch's too), the mover's two 8 MiB staging buffers, the heap the
    allocator keeps between trims, pages of mapped state read between iterations. A
    measured figure, not a guarantee: nothing plans for it (README, "Limits today")."""
    return PROCESS_SLACK_BYTES + budget // PROCESS_SLACK_SHARE


# Room for what a step allocates between two checks beside its largest storage (a
# convolution's workspace, a function's smaller outputs, the 2 ms between readings).
_CHECK_MARGIN = 32 * 2**20


def process_bound(rss_start: int, budget: int) -> int:
    """The resident set the whole process stays under on the workloads measured:
    rss_start (its base) + budget + process_slack(budget)."""
    return rss_start + budget + process_slack(budget)


def trim_ceiling(bound: int, margin: int = _CHECK_MARGIN) -> int:
    """The resident set past which the tight trim governor trims (NOTE [Trim at the
    bound]): the process bound less `margin`, room for what lands before the next check
    (`TrimGovernor._margin`)."""
    return bound - margin


# Past the ceiling (the live bytes alone are above it), the next trim waits until the
# resident set has grown by at least this much: trims stay rare whatever the step does.
_MIN_TRIM_STEP = 16 * 2**20

# check()'s `key` for a check within the op the last keyed check announced (its inputs'
# read-backs, the plan's actions): the default (NOTE [Each op's growth]).
WITHIN_OP = object()


def _slack(budget: int) -> int:
    """Before the first eviction: how far the resident set may grow past the first
    iteration's plus the budget before a trim (a step that fits is never trimmed)."""
    return 64 * 2**20 + budget // 5


# -- the governors ---------------------------------------------------------------------
_steering: dict = {}        # "governor": the one steering glibc now (NOTE [One governor per process])


def steering_governor():
    """The governor that holds glibc's settings in this process now, or None."""
    return _steering.get("governor")


class _Governor:
    """What both modes share: the one-governor record and stop()."""
    mode = ""
    _CHANGES: tuple[int, ...] = ()      # the options this mode hands mallopt

    def __init__(self):
        self.libc = _libc()
        self.budget = 0
        self.trims = 0
        self.given_back = 0        # bytes the checks' trims took off the resident set, in all
                                   # (the resident set just before and after each: what other
                                   # threads fault in meanwhile lowers it), memory the step
                                   # then faults in again where it reuses it
        self._told = False         # mallopt may have changed glibc: stop() puts it back
        self._restore: tuple = ()  # (option, value) pairs for that
        self._record = _steering   # stop() reads no module globals (interpreter exit)

    def _claim(self) -> None:
        """Hold the process's record, or raise if another governor holds it. One
        dict.setdefault: atomic between threads and between bytecodes."""
        self._pid = os.getpid()
        holder = self._record.setdefault("governor", self)
        if holder is not self and getattr(holder, "_pid", None) != self._pid:
            # A child forked while the parent's governor held the record: that one is the
            # parent's (its stop() runs there), not this process's.
            self._record["governor"] = holder = self
        if holder is not self:
            raise OutcoreError(
                f"another OutOfCore (return_freed_memory={holder.mode!r}, budget "
                f"{format_bytes(holder.budget)}) is steering glibc's allocator, which is "
                f"process-wide; close() it first, or open this one with "
                f"return_freed_memory=False")

    def _tell(self) -> bool:
        """Apply this mode's settings (from start() or tighten())."""
        raise NotImplementedError

    def _deactivate(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Put glibc back (NOTE [What stop() restores]), hand the heap's free pages back
        and release the record. Idempotent; safe at garbage collection and interpreter
        exit (no exception of its own escapes); after an interrupted start() or stop(),
        calling it again finishes the job."""
        try:
            self._deactivate()                  # first: checks and tighten do nothing now
            if self._told:
                libc = self.libc
                for option, value in self._restore:
                    libc.mallopt(option, value)
                self._told = False
                libc.malloc_trim(0)
            record = self._record
            if record.get("governor") is self:  # last: the record covers every change
                record.pop("governor", None)
        except Exception:
            pass

    def check(self, coming: int = 0) -> None:
        pass

    def begin(self) -> None:
        pass

    def trim_above(self, ceiling: int) -> bool:
        """Between iterations, when state left on the slow tier is read (the pager calls
        it, from its thread): hand the heap's free pages back if the resident set is
        above `ceiling`, so that the pages read find the room the step's memory held
        (the next step faults in again what it reuses). Returns whether it trimmed."""
        libc = self.libc
        if not self._told or libc is None:
            return False
        rss = resident_bytes()
        if rss <= ceiling:
            return False
        self._trim(rss)
        return True

    def hand_back(self) -> None:
        """Hand the heap's free pages back now, counted in no iteration: the process
        bound's base is measured after it (NOTE [The process's base] in run/ooc.py)."""
        if self._told and self.libc is not None:
            self.libc.malloc_trim(0)

    def rebase(self, rss_start: int, taken_off: int = 0) -> None:
        """The process bound now counts from `rss_start`: the trim ceiling follows.
        `taken_off`: bytes the resident set held, unmanaged, when the trim points were
        set, and which outcore manages now (NOTE [The process's base] rule 5 in
        run/ooc.py): the trim points come down by as much."""

    def _trim(self, rss: int) -> int:
        """Hand the heap's free pages back and count it; returns the resident set after."""
        self.libc.malloc_trim(0)
        self.trims += 1
        after = resident_bytes()
        self.given_back += max(rss - after, 0)
        return after

    def __repr__(self) -> str:
        state = "active" if self.active else ("steering" if self._told else "idle")
        return f"{type(self).__name__}(budget={format_bytes(self.budget)}, {state})"


class _Limits(NamedTuple):
    """The trim governor's state, replaced whole by one attribute store."""
    limit: int          # before the first eviction: trim when the resident set passes
    next: int           # this, and has grown past this since the last trim
    slack: int
    tight: bool         # the first eviction has come: trim at the bound (`point`)
    bound: int          # base + budget + process_slack (rebase moves it)
    after: int          # the resident set after the last trim

    def point(self, margin: int) -> int:
        """Where the next trim comes (NOTE [Trim at the bound]): once tight, the ceiling
        below the bound, or _MIN_TRIM_STEP above the resident set the last trim left
        where that is higher (the live bytes alone are above the ceiling)."""
        if not self.tight:
            return self.next
        return max(trim_ceiling(self.bound, margin), self.after + _MIN_TRIM_STEP)

    def due(self, rss: int, coming: int, margin: int) -> bool:
        """Whether to trim now, at `rss` with `coming` bytes about to be allocated: past
        `point`, where the bytes coming count toward the ceiling but not toward the
        growth since a trim that could not get under it (helper-143: every read-back of
        16 MiB or more trimmed again, with no growth and nothing given back)."""
        if not self.tight:
            return rss + coming > self.next
        floor = self.after + _MIN_TRIM_STEP
        ceiling = trim_ceiling(self.bound, margin)
        return rss + coming > ceiling and (floor <= ceiling or rss > floor)


class TrimGovernor(_Governor):
    """The "trim" mode. `start(budget, rss_start)` (at the first iteration) puts every
    allocation on glibc's heap with no trimming of its own and sets a generous limit;
    `tighten()` (at the first eviction) trims at the bound from then on; `check()`
    (called where memory is freed or taken) trims when the resident set is past the
    trim point; `stop()` puts glibc back (NOTE [What stop() restores]).

    NOTE [Trim at the bound]
    Once the budget is full, a trim hands back what the heap keeps for reuse, and the
    step faults it in again: every trim costs speed, so there are only those the
    process bound needs. The trim point is `trim_ceiling`: the bound less room for what
    lands before the next check (`_margin`): _CHECK_MARGIN beside the largest storage
    the step has made so far (`largest_allocation`, Residency's: one function's output
    lands whole between two checks, GPT-2's 147 MiB embedding gradient), or the most
    the resident set grew between two readings of one iteration and _MIN_TRIM_STEP,
    whichever is more (a convolution's backward takes its workspace and reorders beside
    its outputs: outcore's demo grew 46 MiB past a margin of 48.5 MiB, its largest
    storage 16.5 MiB, and passed the bound by 0.13 MiB in one run of three). After a
    trim that cannot get under it (the live bytes alone are above it, e.g. all state
    read back at the end of an iteration), the next waits until the resident set has
    grown by _MIN_TRIM_STEP (the bytes a read-back announces count toward the ceiling,
    not toward that growth: `_Limits.due`).
    Before, the point was the resident set after the last trim plus a slack, capped
    32 MiB below the bound: ResNet-50 64x64 batch 64 at a quarter of its peak, built
    after the OutOfCore, trimmed 72-76 times a step (21-24 now, 12-13 without the margin
    for bursts); GPT-2 at half its peak, built before it, passed the bound by 40-82 MiB
    on every replay (CHANGELOG, 2026-12-06). Where the live bytes alone are near the
    bound (GPT-2 at its smallest feasible budget) it trimmed 49-56 times a step where it
    had trimmed 16-18 times and passed the bound, in steps as fast within this machine's
    noise: the bound costs those trims (20-22 since NOTE [Announced outputs], below,
    within the bound). A trim point of the bound less 32 MiB once the
    live bytes are above the ceiling (fewer trims there) passed it by 60-100 MiB: not
    kept.

    NOTE [Announced outputs]
    1. A replay knows, before each op runs, the bytes of the arrays its plan has it
       create and its recorded workspace (a CUDA op's; the recorder sees none on the
       CPU) (`Replayer` tells `check(outputs=...)`); they count toward the ceiling like
       the bytes a read-back announces.
    2. So the margin of such a check leaves no room for the largest storage, only for
       what lands unannounced: _CHECK_MARGIN, or the most the resident set grew from such
       a reading to the next beyond what was announced (`_op_burst`; the next reading
       may be one told nothing, a WAIT's after the op) and _MIN_TRIM_STEP. Until one
       whole iteration has measured it, the burst of the checks told nothing counts
       too: the first replay has only the recording's. Checks told nothing (a
       recording, an op off the record) keep the margin above, with both bursts.
    3. Growth is measured less what was announced since the last reading: that was
       counted where it came, and counted again as growth it widened every margin. GPT-2
       at its smallest feasible budget (465 MiB), built before the OutOfCore, measured
       a burst of 294 MiB, most of it read-backs, and trimmed 38-43 times a step with
       the margin at its cap; 20-22 times with the burst at 147-158 MiB (one run each,
       /work/notes/s64/gov.py; CHANGELOG 2026-12-06). What an op takes beyond its
       outputs stays in the margin: a convolution's backward at 128x128 takes 96-162 MiB
       of workspace, and ResNet-50 128x128 batch 64 at a quarter of its peak trims
       about 100 times a step either way, its ceiling 15 MiB above the plan's peak.
       Letting the heap's free pages take that growth (estimated through mallinfo2) cut
       the trims to about 50 but passed the bound by 36 MiB in a first replay: the free
       pages lie in pieces a workspace does not fit (CHANGELOG, 2026-12-06). Rule 4 of
       NOTE [Each op's growth] keeps that room only where an op takes it.

    NOTE [Each op's growth]
    1. A replay names the op each check comes before (`key`: its function's index in
       the plan it follows, `follow`), and such a check always reads the resident set:
       the growth from it to the next reading is that op's (with its inputs' read-backs
       and the actions after it, up to the next op's check).
    2. That growth is learned, per plan and op, only from a clean reading: the resident
       set's anonymous part above the one this iteration's last trim left by no more
       than the managed bytes are above theirs, and _MIN_TRIM_STEP. Where the heap holds
       free pages, an op's workspace reuses them and its growth looks smaller than it
       is; right after a trim it is all growth. The learned figure is the most seen
       (`_grown`). Nothing is learned up to a reading of an op no plan knows: a replay
       on arrays smaller than its plan's (NOTE [Step shapes] rule 10) tells its ops
       unknown, as their outputs are smaller than announced and the shortfall would
       hide a workspace; so does an op off the record.
    3. Once an op's growth is learned and one whole told iteration has run, the margin
       at its checks is twice that growth and _MIN_TRIM_STEP (at least _CHECK_MARGIN;
       checks told nothing within the op add its announced outputs), never more than
       rule 2 of NOTE [Announced outputs] gives: twice, as a clean reading may still
       see some reuse (ResNet-50 128x128 batch 64 at a quarter of its peak, ten
       iterations: 6 of 1167 ops grew later by more than 16 MiB past what was learned
       first, the most from 80 to 145 MiB; /work/notes/s65/learn.py, CHANGELOG).
    4. So the room for a convolution backward's workspace is kept before that op, not
       before every op: the same case trimmed 50-56 times a step instead of 106-114, in
       steps 2-10% shorter (two runs of three rounds; CHANGELOG, 2026-12-06 fourth
       session). Ops never learned (a recording, ops off the record, a new plan's first
       replay) keep the margins above."""
    mode = "trim"
    _CHANGES = (_M_MMAP_MAX, _M_TRIM_THRESHOLD)

    def __init__(self):
        super().__init__()
        self._limits: _Limits | None = None     # None: not started (or stopped)
        self._checked = 0.0
        self._announced = 0             # bytes announced to check() since its last reading
        self._pending = 0               # bytes announced at or since it: landed by the next
        self.largest_allocation = None  # () -> the largest storage the step made, if known
        self._read = 0                  # the last reading in this iteration (0: none yet)
        self._read_outputs = False      # whether that reading's check was told `outputs`
        self._burst = 0                 # the most it grew between two readings of one
                                        # iteration, beyond what was announced (`_margin`)
        self._op_burst = 0              # the same from a reading told `outputs` on
        self._told_since = 0            # 0: no check told outputs yet; 1: the first
                                        # iteration with such checks runs; 2: it ended,
                                        # and `_op_burst` has seen a whole one
        # NOTE [Each op's growth]
        self.managed = None             # () -> the managed bytes resident (Residency's)
        self._plans = weakref.WeakKeyDictionary()   # plan -> its `_grown`
        self._grown: dict = {}          # op -> the most it grew from a clean reading
        self._key = None                # the op the replay is at; None: not a known one
        self._key_outputs = 0           # what its check announced it creates
        self._read_key = None           # the op at the last reading, where it was clean
        self._trimmed = (0, 0)          # the resident set's anonymous part and the managed
                                        # bytes after this iteration's last trim (0: none)

    # Read-only views of the state.
    active = property(lambda self: self._limits is not None)
    limit = property(lambda self: None if self._limits is None else self._limits.limit)
    next_trim = property(lambda self: _NEVER if self._limits is None
                         else self._limits.point(self._margin()))
    slack = property(lambda self: 0 if self._limits is None else self._limits.slack)
    tight = property(lambda self: self._limits is not None and self._limits.tight)

    def _margin(self, outputs: bool = False) -> int:
        """Room below the bound for what lands before the next check (NOTE [Trim at the
        bound]). `outputs`: the check was told what the next op creates, so its largest
        storage needs no room of its own, only what lands unannounced (rule 2 of NOTE
        [Announced outputs])."""
        if outputs:
            burst = (self._op_burst if self._told_since == 2    # rule 2
                     else max(self._burst, self._op_burst))
            margin = max(_CHECK_MARGIN, burst + _MIN_TRIM_STEP)
        else:
            largest = self.largest_allocation() if self.largest_allocation is not None else 0
            burst = max(self._burst, self._op_burst)
            margin = max(_CHECK_MARGIN + largest, burst + _MIN_TRIM_STEP)
        grown = self._grown.get(self._key) if self._told_since == 2 else None
        if grown is not None:               # rule 3 of NOTE [Each op's growth]
            own = max(_CHECK_MARGIN, 2 * grown + _MIN_TRIM_STEP)
            margin = min(margin, own if outputs else own + self._key_outputs)
        return min(margin, process_slack(self.budget))     # the ceiling: base + budget at least

    def follow(self, plan) -> None:
        """A replay follows `plan` from here (any weakly referable object, one per plan):
        the ops' growth learned is that plan's (NOTE [Each op's growth]). None: the
        replay has ended; no op is known until the next one names its first."""
        if plan is None:
            self._key = self._read_key = None
            return
        grown = self._plans.get(plan)
        if grown is None:
            grown = self._plans[plan] = {}
        self._grown, self._key, self._read_key = grown, None, None

    def begin(self) -> None:
        """An iteration begins: what the resident set did between iterations (state read,
        a checkpoint saved) is no growth between two of its readings."""
        self._read = 0
        self._key = self._read_key = None
        self._trimmed = (0, 0)              # no reading is clean before this one's first trim
        if self._told_since == 1:
            self._told_since = 2

    def start(self, budget: int, rss_start: int) -> bool:
        """Every allocation on the heap, no trimming but ours. Once: later calls (and
        calls without glibc) return False. `rss_start`: the process's base (the resident
        set when the OutOfCore was made until the first iteration measures it; `rebase`
        moves it), which the bound counts from. Raises OutcoreError while another
        governor steers glibc (NOTE [One governor per process])."""
        if self.libc is None or self._limits is not None:
            return False
        self._claim()
        self.budget = budget
        self._restore = _restore_plan(self._CHANGES)
        self._told = True                      # before mallopt: stop() undoes a partial start
        ok = (self.libc.mallopt(_M_MMAP_MAX, 0) == 1
              and self.libc.mallopt(_M_TRIM_THRESHOLD, _C_INT_MAX) == 1)
        self.libc.malloc_trim(0)           # what glibc kept so far: the limit starts from live bytes
        slack = _slack(budget)
        limit = resident_bytes() + budget + slack
        bound = process_bound(rss_start, budget)
        self._limits = _Limits(limit, limit, slack, False, bound, 0)     # last: active
        return ok

    def rebase(self, rss_start: int, taken_off: int = 0) -> None:
        """Also trims now where the resident set is past the new trim point: the heap kept
        what the old bound allowed, and the next iteration's rss+ counts from the new
        base from its first reading on (an OutOfCore made after the model: 39 MiB past
        the bound as the second iteration began)."""
        state = self._limits
        if state is None:
            return
        new = state._replace(bound=process_bound(rss_start, self.budget),
                             limit=state.limit - taken_off, next=state.next - taken_off)
        if self._limits is not state:           # stopped meanwhile
            return
        self._limits = new
        rss = resident_bytes()
        if new.tight and rss > new.point(self._margin()):
            after = self._trim(rss)
            if self._limits is new:
                self._limits = new._replace(after=after)

    def tighten(self) -> None:
        """The budget is full: from now on, trim at the bound (NOTE [Trim at the bound])."""
        state = self._limits
        if state is None or state.tight:
            return
        self.libc.malloc_trim(0)
        new = state._replace(tight=True, after=resident_bytes())
        self._note_trim(new.after)
        if self._limits is state:               # not stopped meanwhile
            self._limits = new

    def _deactivate(self) -> None:
        self._limits = None

    def _trim(self, rss: int) -> int:
        after = super()._trim(rss)
        self._note_trim(after)
        return after

    def _note_trim(self, after: int) -> None:
        """What a clean reading is measured from (rule 2 of NOTE [Each op's growth]): the
        anonymous part of the resident set (a mapped page copied in is no heap growth)
        and the managed bytes, right after a trim."""
        if self.managed is not None:
            self._trimmed = (after - file_resident_bytes(), self.managed())

    def _clean(self, rss: int, file: int) -> bool:
        """Whether the heap holds few free pages at this reading (rule 2 of NOTE [Each op's
        growth]): since this iteration's last trim the anonymous resident set (`rss` less
        its file-backed part `file`) grew by no more than the managed bytes did, and
        _MIN_TRIM_STEP."""
        after, managed = self._trimmed
        if not after or self.managed is None:
            return False
        grew = rss - file - after
        return grew - (self.managed() - managed) <= _MIN_TRIM_STEP

    def check(self, coming: int = 0, outputs: int | None = None, key=WITHIN_OP) -> None:
        """Trim if the resident set, and `coming` bytes about to be allocated, pass the
        trim point. `outputs`: what the op about to run creates, where a replay knows it
        (NOTE [Announced outputs]); None where nobody does. `key`: the op about to run
        (NOTE [Each op's growth]); None for an op not known; left out for checks within
        the last one (its inputs' read-backs). Reads /proc (a system call) at every
        check with a key, otherwise at most every 2 ms, unless the bytes announced since
        the last reading reach _MIN_TRIM_STEP / 2: storages read back in a burst (a
        foreach op's inputs) are each checked before they land."""
        state = self._limits
        if state is None:
            return
        now = time.perf_counter()
        landed = self._pending              # announced at or since the last reading, before
        told = outputs is not None          # this call: landed since
        if key is not WITHIN_OP:
            self._key, self._key_outputs = key, outputs or 0
        coming += outputs or 0
        self._announced += coming
        self._pending += coming
        if ((key is WITHIN_OP or key is None) and now - self._checked < 0.002
                and self._announced < _MIN_TRIM_STEP // 2):
            return
        self._checked, self._announced, self._pending = now, 0, coming
        rss, file = resident_and_file_bytes()
        if self._read:                      # rules 2-3 of NOTE [Announced outputs]
            grew = rss - self._read - landed
            if self._read_outputs:
                self._op_burst = max(self._op_burst, grew)
            else:
                self._burst = max(self._burst, grew)
            learned = self._read_key        # rules 1-2 of NOTE [Each op's growth]
            if (learned is not None and self._key is not None
                    and grew > self._grown.get(learned, -1)):
                self._grown[learned] = max(grew, 0)
        self._read, self._read_outputs = rss, told
        self._read_key = self._key if self._key is not None and self._clean(rss, file) else None
        if told and self._told_since == 0:
            self._told_since = 1
        if not state.due(rss, coming, self._margin(told)):
            return
        after = self._read = self._trim(rss)
        self._read_key = self._key          # right after a trim: clean
        new = state._replace(next=max(state.limit, after + state.slack), after=after)
        if self._limits is state:
            self._limits = new


class EagerGovernor(_Governor):
    """The "eager" mode: `start(budget)` (at the first iteration) claims the record and
    changes nothing; `tighten()` (at the first eviction) maps every allocation of
    `threshold` bytes or more on its own and trims the heap's top past `threshold`;
    `check()` does nothing; `stop()` puts glibc back (NOTE [What stop() restores]), or
    leaves it alone where nothing was evicted."""
    mode = "eager"
    _CHANGES = (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD)

    def __init__(self, threshold: int = 64 * 1024):
        super().__init__()
        self.threshold = threshold
        self._state = None          # None, "started" or "tight": one store per change

    active = property(lambda self: self._state is not None)
    tight = property(lambda self: self._state == "tight")
    limit = None

    def start(self, budget: int, rss_start: int | None = None) -> bool:
        if self.libc is None or self._state is not None:
            return False
        self._claim()
        self.budget = budget
        self._restore = _restore_plan(self._CHANGES)
        self._state = "started"                 # last: active
        return True

    def tighten(self) -> None:
        if self._state != "started":
            return
        self._told = True                       # before mallopt (see TrimGovernor.start)
        self.libc.mallopt(_M_MMAP_THRESHOLD, self.threshold)
        self.libc.mallopt(_M_TRIM_THRESHOLD, self.threshold)
        self.libc.malloc_trim(0)
        if self._state == "started":            # not stopped meanwhile
            self._state = "tight"

    def _deactivate(self) -> None:
        self._state = None


def make_governor(mode: bool | str):
    """The governor for OutOfCore's `return_freed_memory`: True or "trim" ->
    TrimGovernor, "eager" -> EagerGovernor, False -> None (glibc's defaults)."""
    if mode == "eager":
        return EagerGovernor()
    if mode is True or mode == "trim":
        return TrimGovernor()
    if mode is False:
        return None
    raise OutcoreError(f"return_freed_memory must be True, False, 'trim' or 'eager', got {mode!r}")
