"""Make the C allocator give freed memory back to the operating system.

glibc serves large allocations from its heap once its dynamic mmap threshold has grown,
and keeps freed heap memory for reuse: a process that streams gigabytes of activations
through a small budget then sits far above that budget in resident memory (measured in
docs/results-run.md). Fixing the mmap threshold makes every large tensor its own
mapping, returned on free. The price is page faults when memory is touched again.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim
        return libc
    except (OSError, AttributeError):
        return None


def return_freed_memory(threshold: int = 64 * 1024) -> bool:
    """Ask glibc to map allocations >= `threshold` on their own and trim freed memory.
    Returns False where the C library is not glibc (nothing changes then)."""
    libc = _libc()
    if libc is None:
        return False
    ok = (libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1
          and libc.mallopt(_M_TRIM_THRESHOLD, threshold) == 1)
    libc.malloc_trim(0)
    return ok
