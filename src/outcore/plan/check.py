"""Replay a Schedule against its Trace, enforce every invariant, and account the bytes.

`replay` is the single source of truth for a schedule's figures (bytes in/out, peak,
resident curve): the planners build action lists and call it, so a planner bug surfaces
as a ScheduleError instead of a wrong number. `check` is the public entry point.

Rules (numbered so messages and tests can cite them):
  R1 every access finds its array on the fast tier (created arrays: not existing yet);
  R2 fast-tier bytes (resident + swap-ins issued + swap-outs not waited for, and while
     a function runs its workspace: NOTE [Workspace] in feasibility.py) never exceed
     the budget, at any point between actions;
  R3 FREE exactly at an array's release point (docs/planning.md#held-arrays): never a
     persistent one, never before PyTorch drops the storage (`freed_after`, or the end
     of the step when None; at least the last use), never after; the array may be
     resident or, if it was swapped out or dropped while dead but held, on the slow tier
     (the FREE then drops the slow copy); every non-persistent array is FREEd;
  R4 SWAP_OUT only an array that is used later, must outlive the iteration, or is dead
     but still held (after its last use, before its release); SWAP_IN only an array
     that is used again;
  R5 fast memory of a swapped-out array is released only by a WAIT (no FREE/DROP/access/
     SWAP_IN while its copy is in flight), and the iteration ends with nothing in flight;
  R6 DROP only a clean array whose slow copy is current;
  R7 every SWAP_IN is consumed by an access before its array leaves the fast tier;
  R8 start/end placement: inputs start resident and stay until their first use (the
     executor learns which storage an input is only when an op touches it; needs() in
     feasibility.py and the physical limit count on it); `resident_at_end` lists
     exactly what is resident at the end. Persistent arrays may start and end on
     either tier: between iterations the executor leaves state where the step left it
     and, before the next step, moves what the schedule starts with on another tier
     (simulate: boundary_s).
  R9 a function that repeats another to recompute an array (`Function.repeats`, NOTE
     [Recompute rules] in recompute.py) reads what the original read, unchanged since,
     or arrays made again by earlier repeats (recompute.verify); R1 already requires
     what it reads to be resident.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ScheduleError
from ..units import format_bytes
from .feasibility import release_points
from ..trace.model import require_trace
from .schedule import DROP, FREE, SWAP_IN, SWAP_OUT, WAIT, require_schedule

from ..states import ABSENT, DEAD, FAST, OUT, SLOW


@dataclass(frozen=True)
class Accounting:
    bytes_in: int
    bytes_out: int
    peak_bytes: int
    resident_curve: tuple[int, ...]
    resident_at_end: tuple[int, ...]


def replay(trace, begin, end, resident_at_start, budget, *, check_end_set=None) -> Accounting:
    """Walk the actions in execution order; raise ScheduleError at the first violation."""
    arrays = trace.arrays
    functions = trace.functions
    n = len(functions)
    if len(begin) != n or len(end) != n:
        raise ScheduleError(f"schedule has {len(begin)} begin / {len(end)} end action lists "
                            f"for a trace of {n} functions")
    release = release_points(trace)
    state = [ABSENT] * len(arrays)
    dirty = [True] * len(arrays)          # fast copy differs from the slow copy (or no slow copy)
    pending = [False] * len(arrays)       # swap-in issued, not yet consumed
    occ = 0
    start_set = set(resident_at_start)
    for a in arrays:
        if a.id in start_set:
            if not a.existed_before:
                raise ScheduleError(f"R8: array {a.id} ({a.kind}) is listed resident at the start "
                                    "but does not exist before the step")
            state[a.id] = FAST
            occ += a.nbytes
        elif a.existed_before:
            if a.kind == "input":
                raise ScheduleError(f"R8: input array {a.id} must be resident at the start")
            state[a.id] = SLOW
            dirty[a.id] = False
    if occ > budget:
        raise ScheduleError(f"R2: arrays resident at the start take {occ} B, over the budget "
                            f"of {budget} B")
    peak = occ
    bytes_in = bytes_out = 0
    curve = []

    def where(i, phase):
        fn = functions[i]
        return f"function {i} ({fn.op}, {fn.phase}) {phase}"

    def expect(a, wanted, i, phase, rule, what):
        if state[a] != wanted:
            raise ScheduleError(f"{rule}: {where(i, phase)}: {what} array {a}, which is "
                                f"{state[a]}")

    def untouched_input(arr, i, what):
        if arr.kind == "input" and arr.existed_before and i < arr.first_use:
            raise ScheduleError(f"R8: {where(i, 'end')}: {what} input array {arr.id} before "
                                f"its first use (function {arr.first_use}): an input stays "
                                "resident until an op touches it")

    def leave_fast(a, i, phase, what):
        if pending[a]:
            raise ScheduleError(f"R7: {where(i, phase)}: {what} array {a} whose swap-in was "
                                "never used")

    for i in range(n):
        for act in begin[i]:
            a = act.array
            if act.kind == WAIT:
                if state[a] != OUT:
                    expect(a, OUT, i, "begin", "R5", "WAIT on")
                state[a] = SLOW
                occ -= arrays[a].nbytes
            elif act.kind == SWAP_IN:
                if state[a] != SLOW:
                    expect(a, SLOW, i, "begin", "R5", "SWAP_IN of")
                if arrays[a].last_use < i:
                    raise ScheduleError(f"R4: {where(i, 'begin')}: SWAP_IN of array {a}, whose "
                                        f"last use was function {arrays[a].last_use}: it is "
                                        "never read again")
                state[a] = FAST
                pending[a] = True
                dirty[a] = False
                nb = arrays[a].nbytes
                occ += nb
                bytes_in += nb
                if occ > budget:
                    raise ScheduleError(f"R2: {where(i, 'begin')}: SWAP_IN of array {a} raises "
                                        f"fast-tier bytes to {occ}, over the budget of {budget}")
                peak = max(peak, occ)
            else:
                raise ScheduleError(f"{where(i, 'begin')}: {act.kind} is not a begin-action")
        for acc in functions[i].accesses:
            a = acc.array
            if acc.kind == "create":
                if state[a] != ABSENT:
                    expect(a, ABSENT, i, "run", "R1", "creation of")
                state[a] = FAST
                occ += arrays[a].nbytes
            else:
                if state[a] != FAST:
                    expect(a, FAST, i, "run", "R1", f"{acc.kind} of")
            pending[a] = False
            if acc.kind != "read":
                dirty[a] = True
        running = occ + functions[i].workspace_bytes
        if running > budget:
            raise ScheduleError(f"R2: {where(i, 'run')}: {running} B on the fast tier"
                                + (f" ({functions[i].workspace_bytes} B of it its workspace)"
                                   if functions[i].workspace_bytes else "")
                                + f", over the budget of {budget} B "
                                f"({format_bytes(running - budget)} too many)")
        peak = max(peak, running)
        curve.append(running)
        for act in end[i]:
            a = act.array
            arr = arrays[a]
            if act.kind == FREE:
                if state[a] not in (FAST, SLOW):
                    expect(a, FAST, i, "end", "R3/R5", "FREE of")
                if arr.kind == "persistent" or arr.last_use > i:
                    raise ScheduleError(f"R3: {where(i, 'end')}: FREE of array {a} ({arr.kind}), "
                                        f"which is used until function {arr.last_use}"
                                        + (" and must outlive the step" if arr.kind == "persistent" else ""))
                if i < release[a]:
                    raise ScheduleError(f"R3: {where(i, 'end')}: FREE of array {a} ({arr.kind}, "
                                        f"last used by function {arr.last_use}): the storage is "
                                        f"still held by PyTorch until function {release[a]}")
                if i > release[a]:
                    raise ScheduleError(f"R3: {where(i, 'end')}: FREE of array {a}, which PyTorch "
                                        f"already released after function {release[a]}; FREE it there")
                if pending[a]:
                    leave_fast(a, i, "end", "FREE of")
                if state[a] == FAST:
                    occ -= arr.nbytes
                state[a] = DEAD
            elif act.kind == DROP:
                if state[a] != FAST:
                    expect(a, FAST, i, "end", "R5/R6", "DROP of")
                untouched_input(arr, i, "DROP of")
                if dirty[a]:
                    raise ScheduleError(f"R6: {where(i, 'end')}: DROP of array {a}, whose slow "
                                        "copy is missing or stale (it must be swapped out)")
                if pending[a]:
                    leave_fast(a, i, "end", "DROP of")
                state[a] = SLOW
                occ -= arr.nbytes
            elif act.kind == SWAP_OUT:
                if state[a] != FAST:
                    expect(a, FAST, i, "end", "R4", "SWAP_OUT of")
                untouched_input(arr, i, "SWAP_OUT of")
                if arr.kind != "persistent" and i >= release[a]:
                    raise ScheduleError(f"R4: {where(i, 'end')}: SWAP_OUT of dead array {a} "
                                        f"(last used by function {arr.last_use}, released by "
                                        f"PyTorch after function {release[a]}); FREE it instead")
                if pending[a]:
                    leave_fast(a, i, "end", "SWAP_OUT of")
                state[a] = OUT
                dirty[a] = False
                bytes_out += arr.nbytes
            elif act.kind == WAIT:
                if state[a] != OUT:
                    expect(a, OUT, i, "end", "R5", "WAIT on")
                state[a] = SLOW
                occ -= arr.nbytes
            else:
                raise ScheduleError(f"{where(i, 'end')}: {act.kind} is not an end-action")

    resident_end = []
    for a in arrays:
        s = state[a.id]
        if s == OUT:
            raise ScheduleError(f"R5: the iteration ends with the swap-out of array {a.id} in "
                                "flight; WAIT on it in the last function's end-actions")
        if pending[a.id]:
            raise ScheduleError(f"R7: array {a.id} was swapped in and never used")
        if a.kind != "persistent" and s in (FAST, SLOW):
            raise ScheduleError(f"R3: {a.kind} array {a.id} is never freed (it ends the iteration "
                                f"{s}); FREE it after function {release[a.id]}, where "
                                "PyTorch releases it")
        if s == FAST:
            resident_end.append(a.id)
    if check_end_set is not None and tuple(sorted(check_end_set)) != tuple(resident_end):
        raise ScheduleError(f"R8: schedule says {len(check_end_set)} arrays are resident at the "
                            f"end, replay finds {len(resident_end)}")
    return Accounting(bytes_in, bytes_out, peak, tuple(curve), tuple(resident_end))


def check(trace, schedule, budget=None) -> None:
    """Raise ScheduleError at the first invariant `schedule` violates on `trace` under
    `budget` (default: the schedule's own budget). Returns None when all hold."""
    from ..units import parse_bytes
    require_trace(trace, "outcore.check")
    require_schedule(schedule, "outcore.check")
    budget = schedule.budget if budget is None else parse_bytes(budget)
    if any(fn.repeats is not None for fn in trace.functions):
        from .recompute import verify
        verify(trace)
    acc = replay(trace, schedule.begin, schedule.end, schedule.resident_at_start, budget,
                 check_end_set=schedule.resident_at_end)
    for name in ("bytes_in", "bytes_out", "peak_bytes"):
        if getattr(acc, name) != getattr(schedule, name):
            raise ScheduleError(f"schedule states {name}={getattr(schedule, name)} but its "
                                f"actions give {getattr(acc, name)}")
