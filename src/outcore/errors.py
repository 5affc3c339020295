"""The exceptions outcore raises. Every message states what was wrong and what to do."""
import sys
import warnings

# NOTE [Warnings as errors]
# A warnings filter may turn any warning into an exception (`python -W error`, pytest's
# `filterwarnings = error`). outcore warns in the middle of its bookkeeping: a read of
# the swap file tried again, a compiled function met inside an op. Raised there, the
# exception cut a transfer between its steps: with RuntimeWarning an error, a weight
# kept the bytes of a read that was never issued, for good (helper-168). So:
#   1. outcore's warnings issued where its bookkeeping must not be cut go through
#      `warn`: the warning is issued as usual, and one a filter raises is caught and
#      kept (`KEPT_WARNINGS`); the bookkeeping goes on.
#   2. The end of the block (`with ooc.iteration():`, `ooc.building()`; `close()`)
#      raises the first kept warning, with the others as notes, after its cleanup: the
#      step has run whole (raised at the end of an op, one inside optimizer.step() left
#      some parameters stepped and the rest not, helper-174), and inside the user's
#      warnings filter, which an OutOfCore outlives. Where the block raised, they are
#      notes on its exception.
#   3. A warning kept outside a block (making an OutOfCore) waits for the next end.
KEPT_WARNINGS: list = []


def warn(message: str, category=UserWarning, stacklevel: int = 2) -> None:
    """`warnings.warn`, kept rather than raised where a filter makes it an error (NOTE
    [Warnings as errors])."""
    try:
        warnings.warn(message, category, stacklevel=stacklevel + 1)
    except Warning as err:
        KEPT_WARNINGS.append(err)


def kept_warnings() -> list:
    """Rule 2 of NOTE [Warnings as errors]: the kept warnings, taken (the first with the
    others as notes; empty where none)."""
    if not KEPT_WARNINGS:
        return []
    first, *rest = KEPT_WARNINGS
    KEPT_WARNINGS.clear()
    for other in rest:
        first.add_note(f"also: {other}")
    return [first]


class OutcoreError(Exception):
    """Base class of every error outcore raises on purpose."""


class TraceError(OutcoreError):
    """A trace could not be recorded, loaded or understood."""


# How an InfeasibleBudget or HostBudgetTooSmall found after the step had begun to change
# state ends: that OutOfCore stops for good, its remedy applies to a new one (helper-188
# followed the advice, make_movable(optimizer, ooc), and the same OutOfCore refused on).
STOPPED = ("later iterations of this OutOfCore will not start: close() it (the model and the "
           "optimizer keep their values) and train on with a new OutOfCore, made after the "
           "change above.")


class InfeasibleBudget(OutcoreError):
    """No schedule can keep the step within the requested fast-tier budget.

    Attributes name the function that cannot fit and the smallest budget that
    would, so a caller can retry programmatically. `ran_within_budget`: the step ran op
    by op within the budget and only a plan cannot run it (NOTE [Step shapes] rule 11).
    """

    def __init__(self, message: str, *, function_index: int, op: str, phase: str,
                 needed_bytes: int, budget_bytes: int, min_feasible_bytes: int,
                 ran_within_budget: bool = False):
        # Where the step ran within the budget, the error is only logged (a shape that
        # runs op by op) and every rank goes on: nothing to say about the others
        # (helper-128 read "the others are not told" in such a warning).
        others = "" if ran_within_budget else _other_ranks()
        super().__init__(message if others in message else message + others)
        self.ran_within_budget = ran_within_budget
        self.function_index = function_index
        self.op = op
        self.phase = phase
        self.needed_bytes = needed_bytes
        self.budget_bytes = budget_bytes
        self.min_feasible_bytes = min_feasible_bytes


def _other_ranks() -> str:
    """What an InfeasibleBudget means to the other ranks of a distributed run, if this is
    one (helper-96: they saw only gloo's "Connection closed by peer" in their backward,
    and a retry at the figure named in the raising process hung: DDP's rebuild
    broadcast while the other rank waited in an allreduce)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return ""
    ranks = dist.get_world_size()
    if ranks < 2:
        return ""
    return (f" This is rank {dist.get_rank()} of {ranks}: the others are not told. They stop "
            "at their next collective with this one (gloo: \"Connection closed by peer\", "
            "once this process ends) or wait until the process group's timeout, and unless "
            "every rank raised this too, a retry within this process waits on them: end "
            "every rank and start the job again with the budget named (each rank's own; "
            "they can differ by a few bytes).")


class ScheduleError(OutcoreError):
    """A schedule violates an invariant for its trace and budget (outcore.check), or a
    schedule file could not be read. The message names the function and the array."""


class HostBudgetTooSmall(OutcoreError):
    """With offload="host": the state a plan leaves on the slow tier between iterations
    does not fit in host_budget (NOTE [Host tier between iterations] 5). Raised when the
    recording that made the plan ends (that step completed correctly); later iterations
    of the OutOfCore do not start."""

    def __init__(self, message: str, *, needed_bytes: int, host_budget: int):
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.host_budget = host_budget


# What each of outcore's JSON files is, for an error that met one where another belongs.
_FILES = {
    "outcore.trace": "a trace (`outcore trace -o`, outcore.record(), Trace.save)",
    "outcore.schedule": "a schedule (`outcore plan -o`, Schedule.save): the commands read "
                        "the trace it was planned from, and plan it again",
    "outcore.report": "a run's report (ooc.report().save(path)): print it with "
                      "`outcore report`",
    "outcore.state": "a state_dir's manifest (OutOfCore(state_dir=...))",
}


def file_kind(data) -> str:
    """`; it is <what>` for JSON data of one of outcore's other formats, else ""."""
    kind = data.get("format") if isinstance(data, dict) else None
    return f"; it is {_FILES[kind]}" if isinstance(kind, str) and kind in _FILES else ""


def file_too_large(needed: int | None, flag: str = "swap_dir") -> str:
    """Why a write to the swap file met EFBIG though the disk may have room, and what to
    do: the process's RLIMIT_FSIZE (`ulimit -f`) where it is set below `needed` (set at
    all, where `needed` is not known: a write inside a file that already grew, after the
    limit was lowered), the largest file of the file system there otherwise."""
    import resource
    from .units import format_bytes
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and (needed is None or limit < needed):
        return (f"this process may not write files larger than {format_bytes(limit)} "
                "(RLIMIT_FSIZE, `ulimit -f`): raise that limit or the budget")
    return (f"the file system there does not allow a larger file: pass {flag}= another "
            "file system, or raise the budget")


def no_room(exc: OSError) -> type[OutcoreError]:
    """The error for a failed write to the slow tier: SwapSpaceExhausted where the disk
    is full (or the quota spent), OutcoreError otherwise."""
    import errno
    return SwapSpaceExhausted if exc.errno in (errno.ENOSPC, errno.EDQUOT) else OutcoreError


class SwapSpaceExhausted(OutcoreError):
    """The slow tier's disk is full: the swap file could not grow. The tensor being
    written stays in memory, whole. Raised inside an optimizer step, it leaves the
    parameters as any exception there does (some updated, the rest not): `OutOfCore`
    adds a note saying so."""
