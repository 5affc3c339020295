"""Huge pages for the memory a swap-in reads into (NOTE [Huge pages for reads]).

NOTE [Huge pages for reads]: a swap-in resizes a storage back to its size and reads
its bytes into memory the kernel has not faulted in yet (the storage was resize_(0)'d,
and the "trim" governor gives freed memory back to the kernel): one minor fault and one
zeroed 4 KiB page per page, about 65,000 faults for 256 MiB. Where the kernel hands out
transparent huge pages on request (/sys/kernel/mm/transparent_hugepage/enabled says
[madvise] or [always]), the storage's whole 2 MiB pages are advised MADV_HUGEPAGE
before the read, so the read faults them in 2 MiB at a time. Storages under
MIN_BYTES are left alone. PyTorch's THP_MEM_ALLOC_ENABLE=1 does the same for every
tensor it allocates (NOTE [Huge pages by default]); this covers the storages a swap-in
refills where PyTorch's is off. OUTCORE_HUGE_READS=0 in the environment turns this off
(for comparisons).

NOTE [Huge pages by default]
PyTorch's CPU allocator asks for huge pages (MADV_HUGEPAGE, page-aligned) on every
tensor of 2 MiB or more when THP_MEM_ALLOC_ENABLE=1, and reads that variable once, at
the first tensor it allocates in the process (c10 `is_thp_alloc_enabled`, a function
static). Under a tight budget the allocator governor gives freed memory back and the
next tensors fault it in again: 2 MiB per fault with huge pages, 4 KiB without
(docs/executor.md, "Huge pages", measures what that saves). So:
  1. `import outcore` sets THP_MEM_ALLOC_ENABLE=1 in os.environ (`ask_torch_for_huge_pages`)
     before it imports torch, unless the environment already names it: a user's
     THP_MEM_ALLOC_ENABLE=0 keeps PyTorch's default. Importing torch makes no tensor, so
     this holds whenever outcore is imported before the first tensor is made.
  2. Where a tensor came first (outcore imported late), PyTorch has already read the
     variable: nothing outcore does now can change it. `torch_huge_pages()` finds out
     by the tensors themselves (their start is page-aligned only when PyTorch asked for
     huge pages) and says why not; `ooc.report()` prints it, and a plan that moves
     bytes logs it as a warning (logger "outcore") when the import order is the cause.
  3. Processes started from this one inherit the variable, as with any environment
     setting. Every process that stands for plain PyTorch beside outcore (the baselines
     of `outcore bench`, `outcore demo`'s plain run, the benchmarks' plain children)
     runs with `plain_environment()`: the user's own setting, or PyTorch's default 0,
     what a user without outcore runs. Such a child imports outcore too, and then
     finds the variable named.
"""
from __future__ import annotations

import ctypes
import os
import sys

TORCH_ENV = "THP_MEM_ALLOC_ENABLE"
HUGE = 2 << 20
MIN_BYTES = 4 << 20
MADV_HUGEPAGE = 14          # linux/mman.h


def _kernel_mode() -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or None
    where it has none."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _available() -> bool:
    if os.environ.get("OUTCORE_HUGE_READS", "1") == "0":
        return False
    return _kernel_mode() in ("always", "madvise")


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


# -- PyTorch's own huge pages (NOTE [Huge pages by default]) ---------------------------
_asked: list[bool] = []         # [True] once this process set TORCH_ENV itself
_torch_status: list[str] = []   # what torch_huge_pages() found (PyTorch decides once)


def ask_torch_for_huge_pages() -> bool:
    """Set THP_MEM_ALLOC_ENABLE=1 unless the environment names it already (rule 1). True
    when this call set it. Run by `import outcore`, before torch is imported."""
    if TORCH_ENV in os.environ:
        return False
    os.environ[TORCH_ENV] = "1"
    _asked.append(True)
    return True


def plain_environment(base=None) -> dict:
    """`base` (default os.environ) with THP_MEM_ALLOC_ENABLE as plain PyTorch runs it, for
    a child process that stands for plain PyTorch (rule 3): the user's own setting, or
    PyTorch's default "0" where only outcore set it."""
    value = None if _asked else os.environ.get(TORCH_ENV)
    return {**(os.environ if base is None else base), TORCH_ENV: "0" if value is None else value}


def torch_huge_pages() -> str:
    """Whether PyTorch asks for huge pages on its tensors of 2 MiB or more in this process,
    and why: "on (...)" or "off: ... what to do". Found once, by three empty 2 MiB tensors
    (no memory is touched): PyTorch page-aligns them only when it asks for huge pages,
    and 64-byte aligns them otherwise (one in 64 page-aligned by chance, so all three
    are page-aligned by chance once in 262,144 processes)."""
    if not _torch_status:
        import torch
        probes = [torch.empty(HUGE, dtype=torch.uint8) for _ in range(3)]
        aligned = all(t.data_ptr() % 4096 == 0 for t in probes)
        del probes
        mode = _kernel_mode()
        value = os.environ.get(TORCH_ENV)
        if not aligned and not sys.platform.startswith("linux"):
            status = f"off: PyTorch asks for huge pages only on Linux, not on {sys.platform}"
        elif not aligned and value != "1":
            status = (f"off ({TORCH_ENV}={value} in the environment)" if value is not None
                      else f"off ({TORCH_ENV} unset)")
        elif not aligned:
            status = (f"off: PyTorch read {TORCH_ENV} at its first tensor, before "
                      + ("outcore was imported" if _asked else "it was set")
                      + "; import outcore first, before any tensor is made (some libraries "
                      "make tensors as they are imported, lightning among them), or set "
                      f"{TORCH_ENV}=1 before Python starts (under a tight budget, freed memory "
                      "then faults back in 2 MiB at a time instead of 4 KiB)")
        elif mode not in ("always", "madvise"):
            status = (f"off: PyTorch asks ({TORCH_ENV}=1), but the kernel gives none "
                      f"(/sys/kernel/mm/transparent_hugepage/enabled: {mode or 'absent'})")
        else:
            status = (f"on ({TORCH_ENV}=1, " + ("set by outcore at import)" if _asked
                                                else "from the environment)"))
        _torch_status.append(status)
    return _torch_status[0]
