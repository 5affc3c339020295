"""The Trace: one training iteration as an ordered list of functions and the arrays they touch.

An *array* is a storage, not a tensor: views and in-place ops share one array.
A *function* is one aten op (or one element of a split multi-tensor op) with
its accesses in order. Everything here is plain, frozen data: the planner and
the simulator read it without touching torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

Phase = Literal["forward", "backward", "optimizer", "other"]
AccessKind = Literal["read", "write", "create"]
ArrayKind = Literal["persistent", "input", "transient"]

PHASES: tuple[str, ...] = ("forward", "backward", "optimizer", "other")
ACCESS_KINDS: tuple[str, ...] = ("read", "write", "create")
ARRAY_KINDS: tuple[str, ...] = ("persistent", "input", "transient")
# What an array is for; a heuristic from when and how the step used it (docs/trace.md).
CATEGORIES: tuple[str, ...] = (
    "parameter", "buffer", "gradient", "optimizer_state", "activation", "temporary", "input", "output")


@dataclass(frozen=True)
class Access:
    """One function touching one array. `write` modifies existing contents in place
    (so they must be present); `create` produces fresh contents (nothing to load)."""
    array: int
    kind: AccessKind


@dataclass(frozen=True)
class Function:
    """One executed op. `index` is its position in the trace; `duration_s` is measured
    when the trace was recorded for real and estimated otherwise (see Trace.durations)."""
    index: int
    op: str
    phase: Phase
    accesses: tuple[Access, ...]
    duration_s: float = 0.0
    flops: int = 0
    # Bytes of tensor elements the op reads and writes (for roofline estimates).
    bytes_touched: int = 0
    # (element, count) when this function is one tensor's share of a multi-tensor
    # `_foreach_*` op that the recorder split; None otherwise.
    split: tuple[int, int] | None = None
    # Wall time on the host since the previous op returned (the first: since the step
    # began), outside any op: the framework's Python between ops (autograd, DDP's
    # reducer, FSDP's hooks) and waits no op holds (a collective's Work). Measured when
    # recorded for real, without the recorder's own time; 0 in older traces.
    host_s: float = 0.0
    # The CPU time this thread spent in that same span: the framework's own work.
    # host_s - host_cpu_s is time spent waiting (for another rank, a collective, a
    # data loader), which a simulation of all ranks together models itself
    # (simulate_ranks). 0 in older traces.
    host_cpu_s: float = 0.0
    # A point-to-point op (c10d.send, c10d.recv_): the other rank, as its process group
    # numbers it. None otherwise, and in older traces.
    peer: int | None = None
    # Bytes the op takes for itself while it runs and gives back before it returns,
    # outside every array: a library's workspace or scratchpad (cuDNN, cuBLAS, oneDNN).
    # The fast tier must hold them beside the op's operands (NOTE [Workspace] in
    # plan/feasibility.py). 0 when not measured, and in older traces.
    workspace_bytes: int = 0
    # Set on a function the planner inserted to recompute an array instead of moving it
    # (plan/recompute.py): the index of the earlier function it runs again. The step
    # itself never calls it; the executor does. None for every recorded function.
    repeats: int | None = None

    def arrays(self) -> tuple[int, ...]:
        return tuple(a.array for a in self.accesses)


@dataclass(frozen=True)
class Array:
    """One storage. Ids are assigned in order of first access, so the same array has
    the same id in every iteration of a static step.

    kind:
      persistent - alive across iterations: existed before the step and is a parameter
                   (frozen ones too), a module's buffer or written, or was created
                   inside and outlives it (optimizer state, gradients, returned values).
      input      - existed before the step and is only read (the batch; not a parameter nor
                   a module's buffer).
      transient  - created inside the step and dead by its end.
    origin: (function index, slot) of the first access: for a created array the output
    slot, otherwise the argument slot where it was first read.
    first_use / last_use: function indices of the first and last access.
    freed_after: index of the function after which the storage really died during the
    recording (None when it was still alive at the end); always >= last_use.
    """
    id: int
    nbytes: int
    dtype: str
    device: str
    kind: ArrayKind
    category: str
    origin: tuple[int, int]
    first_use: int
    last_use: int
    freed_after: int | None = None
    # True when the array existed (with contents) before the step began.
    existed_before: bool = False


@dataclass(frozen=True)
class Trace:
    """One recorded iteration. `durations` is "measured" or "estimated" (meta recording)."""
    functions: tuple[Function, ...]
    arrays: tuple[Array, ...]
    device: str
    durations: Literal["measured", "estimated"]
    info: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        # Cheap structural checks; Trace.load() runs the full validation.
        for i, fn in enumerate(self.functions):
            if fn.index != i:
                raise ValueError(f"function at position {i} has index {fn.index}")
        for i, arr in enumerate(self.arrays):
            if arr.id != i:
                raise ValueError(f"array at position {i} has id {arr.id}")

    # -- derived figures -------------------------------------------------------------
    @property
    def total_duration_s(self) -> float:
        return sum(f.duration_s for f in self.functions)

    def live_bytes(self, *, actual: bool = False) -> list[int]:
        """Bytes live during each function, in-core (nothing ever moved).

        With actual=False an array is live from its first use (or the start, for arrays
        that existed before the step) to its last use (or the end, for arrays that
        outlive it): the least any executor must hold. With actual=True it stays live
        until the storage really died while recording: what plain PyTorch held."""
        from .lifetimes import live_bytes
        return live_bytes(self, actual=actual)

    def peak(self, *, actual: bool = False) -> tuple[int, int]:
        """(peak live bytes, index of the function where it occurs)."""
        curve = self.live_bytes(actual=actual)
        if not curve:
            return 0, -1
        best = max(range(len(curve)), key=curve.__getitem__)
        return curve[best], best

    def bytes_by_category(self) -> dict[str, int]:
        out = {c: 0 for c in CATEGORIES}
        for a in self.arrays:
            out[a.category] = out.get(a.category, 0) + a.nbytes
        return out

    # -- I/O ---------------------------------------------------------------------------
    def save(self, path) -> None:
        from .io import save
        save(self, path)

    @staticmethod
    def load(path) -> "Trace":
        from .io import load
        return load(path)

    def to_dict(self) -> dict:
        from .io import to_dict
        return to_dict(self)

    @staticmethod
    def from_dict(data) -> "Trace":
        from .io import from_dict
        return from_dict(data)

    def __str__(self) -> str:
        from .summary import summarize
        return summarize(self)

    def __repr__(self) -> str:
        peak, _ = self.peak()
        return (f"Trace({len(self.functions)} functions, {len(self.arrays)} arrays, "
                f"device={self.device!r}, durations={self.durations!r}, in-core peak={peak} B)")


def require_trace(trace, api: str) -> None:
    """Raise OutcoreError naming `api` unless `trace` is a Trace. What users pass instead
    (the path the command line takes, a dict, None before an iteration ran) would fail
    deep inside with Python's own TypeError or AttributeError."""
    if isinstance(trace, Trace):
        return
    from ..errors import OutcoreError
    if isinstance(trace, (str, os.PathLike)):
        how = f"load the file first: outcore.Trace.load({os.fspath(trace)!r})"
    elif isinstance(trace, dict):
        how = "outcore.Trace.from_dict(d) makes one of a dict that Trace.to_dict() wrote"
    else:
        how = ("record one step (`with outcore.record() as rec:` ... `rec.trace`, on the meta "
               "device if it does not fit), or pass an OutOfCore's `ooc.trace` once an "
               "iteration has run")
    raise OutcoreError(f"{api} needs a Trace, got {type(trace).__name__}: {how}")
