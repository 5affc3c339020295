"""The executor's side of recompute (plan/recompute.py): keep a producer's call, drop
its output's bytes where the plan frees it, and make them again before backward.

NOTE [Replaying a recompute]
  1. Capture. When the step runs a function some repeat runs again (a producer, or its
     in-place follower), the replayer keeps the op and its arguments (`Call`). What the
     op writes besides the recomputed array (batch norm's running statistics) is copied
     first, so that the repeat runs on their values from before the op and the step's
     own update stays the only one (recompute rule 4). A call whose output does not
     fill its storage densely, or whose arguments are not plain tensors, is not kept:
     its array is then not discarded, and the repeat only makes it ready (slower,
     never wrong).
  2. Discard. Where the plan frees a recomputed array y, the storage autograd still holds
     is `resize_(0)`d without a copy: DISCARDED, in no counter (Residency.discard). The
     kept calls go with the entry (`Entry.remake`), and so does the version of every
     tensor they hold.
  3. Remake. At the repeat, or whenever anything reads y first (Residency.ready: after
     a deviation, on-demand), the calls' inputs are made ready, every version is checked
     against the one noted at the discard (a change means the repeat would not give
     the same bytes: OutcoreError, nothing computed), the producer runs again, and its
     output's bytes are copied into y's storage; then the follower runs on y in place.
     The writes go through an alias of y's storage with its own version counter, so
     autograd's saved-tensor checks see y unchanged, as after a swap-in.
  4. Whatever is still DISCARDED and alive when the iteration ends, however it ends (a
     Ctrl-C included), is remade then: user code never meets an empty tensor. The kept
     calls are let go at the remake, or when y's storage dies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..aten import _PLAIN, iter_tensors, output_tensors, written_tensors
from ..errors import OutcoreError
from ..units import format_bytes


@dataclass
class Call:
    """One op of the step, kept to be run again (NOTE 1)."""
    func: object
    args: tuple
    kwargs: dict
    copies: dict            # id(argument) -> its value from before the op
    out_index: int = -1     # a producer's: the position of y among its outputs
    geometry: tuple = ()    # (size, stride, storage offset) of that output


def capture(func, args, kwargs, *, producer: bool) -> Call | None:
    """Before the op runs: the Call to keep, or None if it cannot be repeated (NOTE 1)."""
    tensors = list(iter_tensors(args)) + list(iter_tensors(kwargs.values()))
    if any(type(t) not in _PLAIN for t in tensors):
        return None
    copies = {}
    if producer:
        for t in written_tensors(func, args, kwargs):
            copies[id(t)] = t.detach().clone()
    return Call(func, args, dict(kwargs), copies)


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


def _alias(storage, like, geometry=None) -> torch.Tensor:
    """A tensor over `storage` with `like`'s geometry (or `geometry`) and a version
    counter of its own (NOTE 3)."""
    size, stride, offset = geometry or (like.size(), like.stride(), like.storage_offset())
    return torch.empty(0, dtype=like.dtype, device=like.device).set_(storage, offset, size, stride)


class Remake:
    """The calls that make one array again, from its discard on (NOTE 2 and 3)."""

    def __init__(self, res, calls: list[Call], label: str):
        self.res = res
        self.calls = calls
        self.label = label
        self.versions = [(t, t._version) for call in calls for t in self._held(call)]

    @staticmethod
    def _held(call: Call):
        for t in list(iter_tensors(call.args)) + list(iter_tensors(call.kwargs.values())):
            if id(t) not in call.copies:
                yield t

    def __call__(self, storage) -> None:
        """Write the array's bytes into `storage` (already of its size)."""
        res, key = self.res, storage._cdata
        for t, version in self.versions:
            if t._version != version:
                raise OutcoreError(
                    f"outcore cannot recompute {self.label}: an input of it was changed in place "
                    "after it was computed, so recomputing would not give the same values. The "
                    "step changed since it was recorded; the next iteration records it again. "
                    "Pass recompute=False to OutOfCore to never recompute")
        for t, _ in self.versions:                       # inputs first (chains included)
            s = t.untyped_storage()
            entry = res.entries.get(s._cdata)
            if s._cdata != key and entry is not None:
                res.ready(entry)
        for call in self.calls:
            args = self._bind(call, call.args, storage)
            kwargs = self._bind(call, call.kwargs, storage)
            out = call.func(*args, **kwargs)
            if call.out_index >= 0:
                made = output_tensors(out)[call.out_index]
                _alias(storage, made, call.geometry).copy_(made)
        self.calls, self.versions = [], []

    def _bind(self, call, value, storage):
        """The arguments for the repeat: copies for what the op writes besides y (fresh
        ones, NOTE 1), an alias for y itself (NOTE 3), everything else as it was."""
        if isinstance(value, torch.Tensor):
            copy = call.copies.get(id(value))
            if copy is not None:
                return copy.clone()
            if value.untyped_storage()._cdata == storage._cdata:
                return _alias(storage, value)
            return value
        if isinstance(value, (list, tuple)):
            return type(value)(self._bind(call, v, storage) for v in value)
        if isinstance(value, dict):
            return {k: self._bind(call, v, storage) for k, v in value.items()}
        return value


def describe(nbytes: int, op: str) -> str:
    return f"an activation of {format_bytes(nbytes)} made by {op}"
