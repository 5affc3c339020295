"""Huge pages for the memory a swap-in reads into (NOTE [Huge pages for reads]).

NOTE [Huge pages for reads]: a swap-in resizes a storage back to its size and reads
its bytes into memory the kernel has not faulted in yet (the storage was resize_(0)'d,
and the "trim" governor gives freed memory back to the kernel): one minor fault and one
zeroed 4 KiB page per page, about 65,000 faults for 256 MiB. Where the kernel hands out
transparent huge pages on request (/sys/kernel/mm/transparent_hugepage/enabled says
[madvise] or [always]), the storage's whole 2 MiB pages are advised MADV_HUGEPAGE
before the read, so the read faults them in 2 MiB at a time. Storages under
MIN_BYTES are left alone. PyTorch's THP_MEM_ALLOC_ENABLE=1 does the same for every
tensor it allocates, but PyTorch reads it once, at its first tensor, before outcore
can set it. OUTCORE_HUGE_READS=0 in the environment turns this off (for comparisons).
"""
from __future__ import annotations

import ctypes
import os

HUGE = 2 << 20
MIN_BYTES = 4 << 20
MADV_HUGEPAGE = 14          # linux/mman.h


def _available() -> bool:
    if os.environ.get("OUTCORE_HUGE_READS", "1") == "0":
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


ENABLED = _available()
_madvise = ctypes.CDLL(None, use_errno=True).madvise if ENABLED else None
if _madvise is not None:
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def advise_huge(address: int, nbytes: int) -> bool:
    """Ask for huge pages on the whole 2 MiB pages of [address, address + nbytes) before
    anything touches them; False when not asked (small, disabled, or refused: harmless,
    the read then faults in small pages)."""
    if _madvise is None or nbytes < MIN_BYTES:
        return False
    lo = -(-address // HUGE) * HUGE
    hi = (address + nbytes) // HUGE * HUGE
    return hi > lo and _madvise(lo, hi - lo, MADV_HUGEPAGE) == 0
