"""The executor's side of recompute (plan/recompute.py): keep a producer's call, drop
its output's bytes where the plan frees it, and make them again before backward.

NOTE [Replaying a recompute]
  1. Capture. When the step runs a function some repeat runs again (a producer, or its
     in-place follower), the replayer keeps the op and its arguments (`Call`), and,
     as soon as the op returns, the version of every tensor argument. What the op
     writes besides the recomputed array (batch norm's running statistics) is copied
     before it runs, so that the repeat runs on their values from before the op and
     the step's own update stays the only one (recompute rule 4). The call holds its
     arguments by `detach()`ed aliases: the storages the op read, in the geometry it
     read them, whatever the step later assigns to a tensor's `.data`. A call whose output
     does not fill its storage densely, or whose arguments are not plain tensors, is
     not kept: its array is then written out and read back like any other (slower,
     never wrong).
  2. Discard. Where the plan frees a recomputed array y, the storage autograd still holds
     is `resize_(0)`d without a copy: DISCARDED, in no counter (Residency.discard). The
     kept calls go with the entry (`Entry.remake`), with every reference to y itself
     replaced by its geometry, so that they keep y's inputs alive but not y.
  3. Remake. At the repeat, or whenever anything reads y first (Residency.ready: after
     a deviation, on-demand), the calls' inputs are made ready, every version is checked
     against the one noted at the capture (a change means the repeat would not give
     the same bytes: OutcoreError, nothing computed), the producer runs again, without
     autograd or autocast, into fresh memory, and y's storage (empty since the discard)
     takes that memory over (`_take`: the storages swap their data pointers, no copy);
     then the follower runs on y in place. So a repeat needs y's bytes once, not twice,
     which is what the plan counts (plan/recompute.py, rule 5). Where the output does not
     fill a storage of y's size alone in y's geometry (never seen: the same op on the
     same inputs), or something besides the executor holds it (a dispatch mode of the
     user's, entered outside the iteration, sees the repeat's op and may keep its
     output: taking the memory would leave that tensor empty), its bytes are copied
     into y's storage instead, y's bytes more than the plan for the length of the copy.
     The follower's writes go through an alias of y's storage with its own version
     counter, so autograd's saved-tensor checks see y unchanged, as after a swap-in.
  4. Whatever is still DISCARDED and alive when the step leaves the plan (before the op
     that left it runs, which may change an input) or the iteration ends (however it
     ends, a Ctrl-C included) is remade then, one at a time, each after the least
     recently used arrays were written out to make its room, its chain's included
     (`Replayer._room_for_remake`: the plan had room for each before its use, not for
     all at once). If a remake fails (out of memory, an input changed), the storage
     gets its size back filled with NaN (every byte 0xFF) and the error is raised: the
     activation of that failed iteration is lost, but no tensor is ever left without
     its memory. The kept calls are let go at the remake,
     or when y's storage dies.
  5. Temporaries (NOTE [Temporaries] in plan/recompute.py): a plan may make y again
     more than once, a temporary copy for a repeat that needs it early and y' later.
     Every copy but the last is a temporary: where the plan frees it, y's storage is
     discarded again with the same calls (kept by the replayer until the last copy is
     made), and the next repeat remakes it as in 3.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_map

from .. import aten
from ..aten import _PLAIN, iter_tensors, output_tensors, written_tensors
from ..errors import OutcoreError
from ..units import format_bytes


@dataclass(eq=False)
class Call:
    """One op of the step, kept to be run again (NOTE 1)."""
    func: object
    args: tuple
    kwargs: dict
    copies: dict            # id(argument) -> its value from before the op
    out_index: int = -1     # a producer's: the position of y among its outputs
    geometry: tuple = ()    # (size, stride, storage offset) of that output
    versions: list = None   # (tensor, its version just after the op) for every argument


@dataclass(frozen=True)
class _InY:
    """Where a kept call had a tensor on y's storage: its geometry (NOTE 2)."""
    dtype: object
    device: object
    size: tuple
    stride: tuple
    offset: int


def capture(func, args, kwargs, *, producer: bool) -> Call | None:
    """Before the op runs: the Call to keep, or None if it cannot be repeated (NOTE 1)."""
    tensors = list(iter_tensors(args)) + list(iter_tensors(kwargs.values()))
    if any(type(t) not in _PLAIN for t in tensors):
        return None
    args, kwargs = _detached(args), _detached(dict(kwargs))
    copies = {}
    if producer:
        for t in written_tensors(func, args, kwargs):
            copies[id(t)] = t.detach().clone()
    return Call(func, args, kwargs, copies)


def _detached(value):
    """`value` (an argument tree) with every tensor replaced by `detach()` of it: the
    same storage, geometry and version counter, held by a tensor of the call's own
    (NOTE 1). `param.data = other` later in the step points the parameter at another
    storage; the repeat must read the one the op read, as autograd's saved tensors do."""
    return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, value)


def ran(call: Call) -> None:
    """Right after the op returned: the versions a remake checks (NOTE 1 and 3)."""
    call.versions = [(t, t._version) for t in _arguments(call) if id(t) not in call.copies]


def spare(call: Call, written: set) -> None:
    """An op off the record is about to write the storages `written` (rule 8 of NOTE
    [Small ops off the record] in run/plans.py): the call's arguments on them are copied
    now, as the op's own writes are at the capture (NOTE 1), so that the repeat runs on
    their values from before; their versions are no longer checked. An argument already
    changed since the capture is left to the version check."""
    for t, version in call.versions or ():
        if t.untyped_storage()._cdata in written and id(t) not in call.copies \
                and t._version == version:
            call.copies[id(t)] = t.detach().clone()
    if call.versions:
        call.versions = [(t, v) for t, v in call.versions if id(t) not in call.copies]


def _arguments(call: Call):
    return list(iter_tensors(call.args)) + list(iter_tensors(call.kwargs.values()))


def captured(call: Call, out, storage) -> bool:
    """After a producer ran: note which of its outputs is y (in `storage`). False when y
    does not fill its storage densely (then it is not discarded)."""
    for j, t in enumerate(output_tensors(out)):
        if t.untyped_storage()._cdata == storage._cdata:
            if _dense(t) and t.numel() * t.element_size() == storage.nbytes():
                call.out_index = j
                call.geometry = (tuple(t.size()), tuple(t.stride()), t.storage_offset())
                return True
            return False
    return False


def _dense(t) -> bool:
    """Whether `t`'s elements fill a block of its storage without gaps or overlaps, in
    some order of its dimensions (contiguous, channels-last, ...)."""
    expected = 1
    for size, stride in sorted(zip(t.size(), t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _alias(storage, dtype, device, geometry) -> torch.Tensor:
    """A tensor over `storage` with `geometry` (size, stride, offset) and a version
    counter of its own (NOTE 3)."""
    size, stride, offset = geometry
    return torch.empty(0, dtype=dtype, device=device).set_(storage, offset, size, stride)


class Remake:
    """The calls that make one array again, from its discard on (NOTE 2 and 3)."""

    def __init__(self, res, calls: list[Call], label: str, storage):
        self.res = res
        self.label = label
        key = storage._cdata
        self.calls = [Call(c.func, _unhook(c.args, key), _unhook(c.kwargs, key), c.copies,
                           c.out_index, c.geometry) for c in calls]
        self.versions = [(t, v) for c in calls for t, v in c.versions or ()
                         if t.untyped_storage()._cdata != key]

    def __call__(self, storage, nbytes: int) -> None:
        """Give `storage` (empty) its `nbytes` of the array again (NOTE 3). On an error it
        may be left with memory and any bytes: the caller empties it."""
        res = self.res
        for t, version in self.versions:
            if t._version != version:
                raise OutcoreError(
                    f"outcore cannot recompute {self.label}: an input of it was changed in place "
                    "after it was computed, so recomputing would not give the same values. The "
                    "step changed since it was recorded; the next iteration records it again. "
                    "Pass recompute=False to OutOfCore to never recompute")
        for t, _ in self.versions:                       # inputs first (chains included)
            entry = res.entry_of(t.untyped_storage())
            if entry is not None:
                res.ready(entry)
            if t.untyped_storage().nbytes() < (t.storage_offset() + t.numel()) * t.element_size():
                raise OutcoreError(
                    f"outcore cannot recompute {self.label}: an input of it has no memory now "
                    "(another library freed it after forward, as FSDP does with unsharded "
                    "parameters). Nothing was computed. Pass recompute=False to OutOfCore, "
                    "and report the model: the plan should not have recomputed it")
        with torch.no_grad(), _no_autocast():
            for call in self.calls:
                args = _bind(call, call.args, storage)
                kwargs = _bind(call, call.kwargs, storage)
                if call.out_index >= 0:     # the result goes straight in: NOTE 3's count
                    _take(storage, nbytes, call.func(*args, **kwargs), call.out_index,
                          call.geometry)
                else:
                    call.func(*args, **kwargs)
        if storage.nbytes() != nbytes:
            raise OutcoreError(f"outcore could not recompute {self.label}: its producer's "
                               "call made no output for it. Pass recompute=False to OutOfCore, "
                               "and report the model")
        self.calls, self.versions = [], []

    def spare(self, written: set) -> None:
        """`spare` for a discarded array's calls, whose versions the remake holds."""
        copied = set()
        for t, version in self.versions:
            if t.untyped_storage()._cdata in written and t._version == version:
                copy = t.detach().clone()
                for call in self.calls:
                    call.copies.setdefault(id(t), copy)
                copied.add(id(t))
        self.versions = [(t, v) for t, v in self.versions if id(t) not in copied]


# NOTE 3: the references to the repeat's output while `_take` decides, where the op's
# result is passed to it straight (`Remake.__call__`): the result (`out`: the tensor, or
# a tuple holding it), the list of outputs, its local name and sys.getrefcount's
# argument; and to the output's storage: the tensor's and the local UntypedStorage's.
# More, and something else holds the output (a dispatch mode of the user's below
# outcore's sees the repeat's op and may keep what it returns): its memory is not taken,
# it is copied.
_OWN_TENSOR_REFS, _OWN_STORAGE_REFS = 4, 2
# How many remakes took the output's memory and how many copied it, since import (tests
# read it: a spy around `_take` would itself hold a reference).
TAKES = {"taken": 0, "copied": 0}


def _take(storage, nbytes: int, out, index: int, geometry) -> None:
    """Give y's `storage` (empty) the bytes of output `index` of the repeat's result
    `out`: its memory itself where that output is held by nothing else and fills a
    storage of `nbytes` alone in y's `geometry` (size, stride, offset), else a copy into
    memory of y's own (NOTE 3)."""
    outputs = output_tensors(out)
    made = outputs[index]
    own = made.untyped_storage()
    if (aten.SWAPS_DATA_PTR and storage.nbytes() == 0 and own.nbytes() == nbytes
            and own.device == storage.device
            and (tuple(made.size()), tuple(made.stride()), made.storage_offset()) == geometry
            and sys.getrefcount(made) == _OWN_TENSOR_REFS
            and torch._C._storage_Use_Count(own._cdata) == _OWN_STORAGE_REFS):
        storage._swap_data_ptr_(own)        # y's storage holds the output's memory now
        TAKES["taken"] += 1
        return
    if storage.nbytes() != nbytes:
        storage.resize_(nbytes)
    _alias(storage, made.dtype, made.device, geometry).copy_(made)
    TAKES["copied"] += 1


def _no_autocast():
    """Autocast off on every device type: the calls' arguments are already what autocast
    made of them (NOTE 3)."""
    stack = contextlib.ExitStack()
    for device in ("cpu", "cuda"):
        stack.enter_context(torch.autocast(device_type=device, enabled=False))
    return stack


def _unhook(value, key):
    """`value` (an argument tree) with every tensor on the storage `key` (y) replaced by
    its geometry."""
    def leaf(v):
        if isinstance(v, torch.Tensor) and v.untyped_storage()._cdata == key:
            return _InY(v.dtype, v.device, tuple(v.size()), tuple(v.stride()), v.storage_offset())
        return v
    return tree_map(leaf, value)


def _bind(call, value, storage):
    """The arguments for the repeat: fresh copies of what the op writes besides y (NOTE
    1), an alias for y itself (NOTE 3), everything else as it was."""
    def leaf(v):
        if isinstance(v, _InY):
            return _alias(storage, v.dtype, v.device, (v.size, v.stride, v.offset))
        copy = call.copies.get(id(v)) if isinstance(v, torch.Tensor) else None
        return copy.clone() if copy is not None else v
    return tree_map(leaf, value)


def describe(nbytes: int, op: str) -> str:
    return f"an activation of {format_bytes(nbytes)} made by {op}"
