"""The storages an op touches, in the order the recorder numbers them."""
from __future__ import annotations

import torch


def storage_of(t: torch.Tensor):
    """The tensor's storage, or None for tensors without one (sparse, wrapper subclasses)."""
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def storages(tensors) -> list:
    """Distinct storages of `tensors` in order of first appearance."""
    seen, out = set(), []
    for t in tensors:
        s = storage_of(t)
        if s is not None and s._cdata not in seen:
            seen.add(s._cdata)
            out.append(s)
    return out
