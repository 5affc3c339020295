"""`share_memory_()` of a storage outcore is moving.

NOTE [Sharing a storage outcore moves]
  1. `Tensor.share_memory_()`, `Module.share_memory()` and a tensor sent through a
     torch.multiprocessing queue all end in `UntypedStorage._share_fd_cpu_` or
     `_share_filename_cpu_`: a new shared mapping takes the storage's bytes and the old
     memory is freed. None of it is an aten op, so no dispatch mode sees it.
  2. Outcore cannot resize a shared storage (PyTorch lets it try and the process
     crashes: Residency NOTE 7). A storage on the slow tier has no bytes in memory: it
     would be shared empty, and the next read back would resize it (seen: a
     segmentation fault inside the step, torch 2.13). A storage being written or read
     would have its transfer's memory freed under it.
  3. So while an OutOfCore is open, the two methods are wrapped (`install`, undone when
     it is released: `uninstall`). On the thread running the block (or with no block
     open), a tracked storage whose bytes are not in its memory (on the slow tier, in
     a transfer, or dropped for a recompute) is made resident first, with room made
     for it as for an op's input (`evict_lru`, `Residency.ready`), then shared. Like
     every shared storage it stays in RAM from then on: the next eviction that meets it
     pins it (Residency NOTE 7), and a plan that counted on moving it deviates and runs
     on demand (correct, slower) until a step of that shape is recorded again.
     Between iterations that includes a storage mapped from the slow tier (NOTE
     [Mapped state]): shared as it is, its shared pages would look unwritten to the next
     iteration's unmap, which would empty the storage again and end the sharing.
  4. The table is only the step's thread's to change (Residency NOTE 2), and that
     thread may evict a resident storage at any moment of a block: from any other
     thread (once a block has run), sharing a tracked storage outcore may move raises
     OutcoreError before anything changes, whatever its state (a resident one shared
     from another thread raced the step's eviction: wrong values, a freed buffer
     read). Storages outcore does not track, or never moves, are shared as PyTorch
     would share them.
  5. PyTorch copies the bytes with aten ops. They are not the step's: with an OutOfCore
     open, sharing runs with the thread's dispatch modes set aside (the step's trace
     never holds them, so a step that shares is the same step each time, and nothing
     moves between `ready` and the copy; `ready` may remake a dropped storage, whose
     ops must not reach the step either). Without an open OutOfCore the wrappers only
     call PyTorch's methods.
  6. The share is a held section (NOTE [Interrupts]): a Ctrl-C during the read back or
     the copy lands after the share is complete. Between iterations signals are not
     held; a read left waiting there is finished by the next iteration's start
     (`Replayer.start`).
"""
from __future__ import annotations

import functools
import threading

import torch
from torch.utils._python_dispatch import _disable_current_modes

from ..errors import OutcoreError
from .interrupts import critical
from ..states import FAST
from ..units import format_bytes

_METHODS = ("_share_fd_cpu_", "_share_filename_cpu_")
_originals: dict = {}           # method name -> PyTorch's function, while installed
_lock = threading.Lock()


def install(open_outofcore) -> None:
    """Wrap the two sharing methods (NOTE 3); `open_outofcore()` returns the OutOfCore
    open in this process, or None. Idempotent."""
    with _lock:
        if _originals:
            return
        for name in _METHODS:
            original = torch.UntypedStorage.__dict__.get(name)
            if original is None:            # a PyTorch without it: nothing to wrap
                continue
            _originals[name] = original
            setattr(torch.UntypedStorage, name, _wrap(original, open_outofcore))


def uninstall() -> None:
    """Put PyTorch's methods back (where ours are still the ones installed)."""
    with _lock:
        for name, original in list(_originals.items()):
            current = torch.UntypedStorage.__dict__.get(name)
            if getattr(current, "__wrapped__", None) is original:
                setattr(torch.UntypedStorage, name, original)
            del _originals[name]


def _wrap(original, open_outofcore):
    @functools.wraps(original)
    def share(storage, *args, **kwargs):
        ooc = open_outofcore()
        if ooc is None or ooc.closed:
            return original(storage, *args, **kwargs)
        # NOTE 6 (signals reach only the main thread; its shield is its own)
        shield = ooc._shield if threading.current_thread() is threading.main_thread() else None
        if shield is not None:
            shield.enter()
        try:
            with _disable_current_modes():      # NOTE 5
                if not storage.is_shared():
                    _prepare(ooc, storage)
                return original(storage, *args, **kwargs)
        finally:
            if shield is not None:
                shield.exit()
    return critical(share)


def _prepare(ooc, storage) -> None:
    """Make a tracked storage's bytes resident before it is shared (NOTE 3), or refuse
    (NOTE 4)."""
    res = ooc._res
    owner = ooc._active_thread
    if owner is not None and owner != threading.get_ident():
        entry = res.entries.get(storage._cdata)       # a read: no change to the table
        if entry is not None and entry.ref() is storage and not entry.pinned:
            raise OutcoreError(
                f"share_memory_() of a {format_bytes(entry.nbytes)} tensor that outcore moves "
                "between RAM and its swap file, from another thread than the one that runs "
                "ooc.iteration(): only that thread may move it, and outcore may be moving it "
                "right now. Share it from that thread (between iterations or inside the "
                "step), or share a .clone() of it; nothing was changed")
        return
    entry = res.entry_of(storage)
    if entry is None or entry.pinned or entry.elsewhere or entry.owner or entry.state is FAST:
        return
    res.evict_lru(ooc.budget - entry.nbytes, {entry.key})   # room first, as for an op's input
    res.ready(entry)
