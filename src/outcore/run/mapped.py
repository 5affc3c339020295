"""State between iterations: storages left on the slow tier, usable in place.

When an iteration ends, a storage the schedule leaves on the slow tier is not read
back: it is MAPPED. Its memory becomes a private (copy-on-write) mapping of its bytes
in the swap file, so every tensor, view, `param.grad` and optimizer reference to it
reads the right values, and the process holds only the pages that are touched.

NOTE [Mapped state]
  1. Map: the extent is mapped from its aligned start (the bytes begin `head` into it)
     and wrapped in a storage by `torch.frombuffer`; `UntypedStorage._swap_data_ptr_`
     then gives that memory, size and (non-)resizability to the user's storage, which
     hands its empty memory over. Python identity, views and version counters stay.
  2. Read: a page fault brings a clean page of the file (page cache). It counts in the
     resident set and the kernel may drop it at will; the Pager pages such pages out
     (MADV_PAGEOUT) when they grow past what the budget leaves free (plus a slack), or
     past a floor while the whole resident set is above its ceiling, so a `torch.save`
     of the whole state streams through memory instead of holding it. The first time
     the process is over the ceiling, the Pager has the heap's free pages handed back
     first (`relieve`, `_Governor.trim_above`): only when state is read, never in a loop
     that reads none (the next step would fault that memory in again).
  3. Write: copy-on-write moves the written page to anonymous memory. Nothing here ever
     calls MADV_DONTNEED on a mapping (it would discard such a write); MADV_PAGEOUT
     leaves anonymous pages alone (or swaps them out, never drops them).
  4. Unmap (before the next iteration, `building()` block or save runs an op):
     /proc/self/pagemap says whether a page was written (present without bit 61 "file
     page", or swapped: bit 62). Unwritten: the storage takes back empty memory (SLOW,
     clean: nothing moves). Written, or pagemap unreadable: its bytes are copied into
     fresh memory (FAST, dirty: the next eviction writes them out). Either way the
     mapping is closed.
  5. No transfer touches an extent while it is mapped: mapping follows `settle()` and
     unmapping precedes any transfer.
  6. A mapped storage's memory moves when it is unmapped: a pointer taken between
     iterations (`.numpy()`, `data_ptr()`) is valid until the next iteration starts.
  7. `close()` leaves mapped storages mapped: the mapping keeps the unnamed swap file
     alive until the storage dies, so closing never needs the whole state in memory.
     Such an orphan is copied into memory of its own when another OutOfCore first meets
     it (`adopt_orphan`), since that file is no longer anyone's swap space.
  8. A mapping holds no file descriptor (`_Region`: libc's mmap). Python 3.11's
     `mmap.mmap` dup()s the descriptor for each mapping: with a thousand storages
     mapped the process reached its limit on open files (1024 by default), the user's
     own `open()` and `torch.save` between iterations failed, and the storages the
     kernel then refused to map were read back into memory, over the budget.
     The region is unmapped when the last reference to its buffer goes: the storage
     that took its memory over (rule 1) holds the only one, so a storage never outlives
     its memory, and a storage freed between iterations takes its mapping (and the
     pages written to it) with it; `advise` takes the region's lock, and does nothing
     once it is unmapped.
  9. A process forked between iterations inherits the mappings, and a private mapping
     reads the file's current bytes wherever it was not written: had the parent written
     those extents again as it trained, the child's copy of the state would change
     under it (helper-77). So each fork leases the extents mapped at that moment
     (`ooc._before_fork`, `DiskMover.set_leased`): the parent writes elsewhere and reuses
     none of them while the lease lives. A lease lives while any process holds the
     write end of a pipe made at the fork: the child and whatever it forks (a
     grandchild maps the same pages), until they exit or exec (the end is O_CLOEXEC);
     at each block's start the parent reads end of file on the read end
     (`OutOfCore._end_leases`). Each fork's lease ends on its own, so a DataLoader that
     forks new workers every epoch while the last epoch's exit holds about one copy
     more, and a long-lived child (persistent workers) what was mapped at its fork.

NOTE [Loaded by mapping]
  1. A model loaded by mapping its file holds its weights in a private (copy-on-write)
     mapping of that file: transformers' `from_pretrained` (safetensors), `torch.load(
     mmap=True)` with `load_state_dict(..., assign=True)`, `UntypedStorage.from_file(
     shared=False)` (which says `is_shared()`, though no other process sees it).
     PyTorch cannot resize such a storage, so outcore cannot move it: every weight
     stays in RAM for good, outside the plan (a Llama loaded so was refused at a
     budget its copy built from the config trained at bitwise, helper-147).
  2. Whether anything else sees those bytes cannot be told: a numpy array taken before
     the OutOfCore (PyTorch's own `.numpy()`), a copy-on-write `np.memmap` under
     `torch.from_numpy`, a second `safe_open(...).get_tensor` of the same name (another
     storage over the same bytes). Giving such a storage memory of its own on first
     sight broke each of them (helper-151: the numpy array then read unmapped memory, a
     segmentation fault; the others stopped aliasing the weight, and training differed
     from plain PyTorch). So it is done only where the user asks, as `.clone()` would:
     `outcore.integrations.make_movable(model, ooc)` names the module's storages that
     lie wholly in private mappings of files (`/proc/self/maps`: a file's inode, "p";
     two of them over the same bytes are refused), and a Residency gives each one, when
     the step first uses it (`track`), a copy of its bytes in memory of its own,
     resizable, as an orphan's (rule 7): one storage at a time, so the plan moves it
     like any and the model never needs the RAM to hold it whole. Every tensor and view
     of the storage follows (`_swap_data_ptr_`, rule 1); the file is never written.
  3. The mapped memory a storage gave up stays mapped while the storage lives
     (`_given_up`): a view taken past the storage before (a numpy array, a DLPack
     capsule) reads the bytes as loaded, never unmapped memory. Its pages are given back
     as soon as it is copied (MADV_PAGEOUT, `_page_out`): clean file pages, the kernel
     would reclaim them only under pressure, and until then the resident set counted
     the whole file beside the budget (helper-164: 76 MiB of GPT-2's weights, every
     iteration flagged past the process's bound).
"""
from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import threading
import weakref

import torch

from ..memory import ALIGNMENT, round_up
from ..memory.malloc import file_resident_bytes, resident_bytes
from .interrupts import no_raise

MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)     # Linux 5.4+; Python may lack the name
_PAGE = mmap.PAGESIZE
_SWAPPED, _FILE_PAGE = 1 << 62, 1 << 61         # pagemap bits; bit 63 (present) is the sign
_pagemap = None                                  # (pid, descriptor): kept open, as statm is


def _pagemap_fd() -> int:
    global _pagemap
    if _pagemap is None or _pagemap[0] != os.getpid():
        _pagemap = (os.getpid(), os.open("/proc/self/pagemap", os.O_RDONLY))
    return _pagemap[1]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_MAP_FAILED = ctypes.c_void_p(-1).value


class KernelRefused(OSError):
    """libc's mmap failed (ENOMEM: past vm.max_map_count or RLIMIT_AS, `why_refused`; a
    filesystem without mmap):
    the state is read back instead, over the budget, and the user is told once
    (`Residency.map_slow`); refusals by design (a host tier's spilled extent) are not
    this."""


def why_refused(exc: OSError) -> str:
    """What stopped mmap with ENOMEM, as far as this process can tell: the number of
    mappings (/proc/self/maps) near vm.max_map_count, an address-space limit
    (RLIMIT_AS, `ulimit -v`), or neither (memory for the kernel's own bookkeeping).
    A refusal of another kind: "" (its strerror says it)."""
    import errno
    import resource
    if exc.errno != errno.ENOMEM:
        return ""
    maps, most = _mappings()
    if most and maps >= 0.9 * most:
        return (f"; the process has {maps} mappings of the {most} vm.max_map_count "
                "allows (raise it: sysctl vm.max_map_count)")
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        return (f"; the process's address space is limited to {limit / 2**20:.0f} MiB "
                "(RLIMIT_AS, `ulimit -v`): raise that limit")
    return "; the kernel is out of memory for new mappings"


def _mappings() -> tuple[int, int]:
    """(the process's mappings, vm.max_map_count); (0, 0) where /proc does not say."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            most = int(f.read())
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f), most
    except (OSError, ValueError):
        return 0, 0


class _Region:
    """A private, writable mapping of `length` bytes of `fd` from `offset`, made by
    libc's mmap: it keeps no descriptor (rule 8). `buffer()` is its memory as a Python
    buffer; the region is unmapped when the last reference to that buffer goes."""

    __slots__ = ("addr", "length", "_lock", "_open")

    def __init__(self, fd: int, length: int, offset: int):
        addr = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE,
                          fd, offset)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise KernelRefused(err, f"mmap of {length} bytes of the swap file: "
                                     f"{os.strerror(err)}")
        self.addr, self.length = addr, length
        # Reentrant: the cyclic GC may free the last holder of the buffer (and so run
        # `_unmap`) in the pager's thread while it is inside `advise`; a madvise of a
        # range just unmapped only fails (a hint: never a lost byte).
        self._lock, self._open = threading.RLock(), True

    def buffer(self):
        buf = (ctypes.c_char * self.length).from_address(self.addr)
        # Not at exit: a tensor still alive then may be read by another finalizer.
        weakref.finalize(buf, self._unmap).atexit = False
        return buf

    @no_raise     # a finalizer, also between iterations (NOTE [Interrupts] rules 6, 8)
    def _unmap(self) -> None:
        with self._lock:
            if self._open:
                self._open = False
                _libc.munmap(self.addr, self.length)

    def advise(self, advice: int) -> None:
        with self._lock:
            if self._open:
                _libc.madvise(self.addr, self.length, advice)


class Mapping:
    """One storage's private mapping of its extent (NOTE [Mapped state], rule 1)."""

    __slots__ = ("region", "head", "nbytes")

    def __init__(self, fd: int, offset: int, head: int, nbytes: int, storage):
        self.region = _Region(fd, round_up(head + nbytes, ALIGNMENT), offset)
        self.head, self.nbytes = head, nbytes
        # Only the storage holds the buffer (rule 8): a storage freed between iterations
        # (a model deleted) unmaps its region at once, not at the next iteration.
        view = torch.frombuffer(self.region.buffer(), dtype=torch.uint8, count=nbytes,
                                offset=head)
        try:
            storage._swap_data_ptr_(view.untyped_storage())
        finally:
            del view            # on failure the region goes with it

    def written(self, address: int) -> bool:
        """Whether any page of the storage at `address` was written since it was mapped
        (rule 4). True when pagemap cannot be read: a copy is never wrong."""
        first = address // _PAGE
        count = (address + self.nbytes - 1) // _PAGE - first + 1 if self.nbytes else 0
        if not count:
            return False
        try:
            raw = os.pread(_pagemap_fd(), count * 8, first * 8)
        except OSError:
            return True
        if len(raw) != count * 8:
            return True
        flags = torch.frombuffer(bytearray(raw), dtype=torch.int64)
        present = flags < 0
        anonymous = (flags & _FILE_PAGE) == 0
        swapped = (flags & _SWAPPED) != 0
        return bool(((present & anonymous) | swapped).any())

    def unmap(self, storage, *, copy: bool = False) -> bool:
        """Give `storage` back memory of its own; returns whether it was written (then it
        holds a copy of the mapped bytes, else it is empty). Rule 4. With `copy`, it
        holds a copy whatever was written (rule 7: the file is no longer swap space)."""
        written = copy or self.written(storage.data_ptr())
        if written:
            own = torch.empty(self.nbytes, dtype=torch.uint8).untyped_storage()
            own.copy_(storage)
        else:
            own = torch.UntypedStorage(0)
        storage._swap_data_ptr_(own)      # `own` now holds the mapping's memory
        del own                           # ... and lets go of it, unmapping it (rule 8)
        return written

    def page_out(self) -> None:
        """Hand the clean pages read since mapping back to the kernel (rule 2); written
        pages stay. Safe from any thread: nothing once the region is unmapped (rule 8;
        an old kernel without MADV_PAGEOUT refuses it: only a hint)."""
        self.region.advise(MADV_PAGEOUT)

    def close(self) -> None:
        """Nothing to let go of: the region is unmapped when the storage that holds its
        memory lets go of it (`unmap`) or is freed (rule 7)."""


_orphans: dict[int, tuple[weakref.ref, Mapping]] = {}
_orphans_lock = threading.RLock()   # `forget` may run in a collection while it is held


def _while_alive(table: dict, lock, storage, value) -> None:
    """table[storage's key] = (a weak reference to it, value), dropped when it dies."""
    key = storage._cdata

    @no_raise     # a weakref callback: a signal landing here is noted (NOTE [Interrupts] 6)
    def forget(_ref, key=key):
        with lock:
            table.pop(key, None)
    with lock:
        table[key] = (weakref.ref(storage, forget), value)


def orphan(storage, mapping: Mapping) -> None:
    """Keep `storage` mapped after its OutOfCore closed (rule 7)."""
    _while_alive(_orphans, _orphans_lock, storage, mapping)


def private_file_spans() -> list[tuple[int, int]]:
    """The address ranges of this process's private mappings of files (NOTE [Loaded by
    mapping] rule 2: a file's inode, "p" in /proc/self/maps), adjacent ones merged, in
    address order; none where /proc cannot be read (then nothing is taken)."""
    spans: list[tuple[int, int]] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                span, perms, _offset, _dev, inode = line.split(None, 5)[:5]
                if perms[3] != "p" or inode == "0":
                    continue                   # anonymous or shared memory
                lo, hi = (int(x, 16) for x in span.split("-"))
                if spans and spans[-1][1] == lo:
                    spans[-1] = (spans[-1][0], hi)
                else:
                    spans.append((lo, hi))
    except OSError:
        return []
    return spans


def in_private_file_mappings(start: int, nbytes: int, spans=None) -> bool:
    """Whether [start, start + nbytes) lies wholly in one run of `spans` (default: read
    now, `private_file_spans`)."""
    spans = private_file_spans() if spans is None else spans
    k = bisect.bisect_right(spans, (start, float("inf"))) - 1
    return k >= 0 and spans[k][0] <= start and start + nbytes <= spans[k][1]


def loaded_by_mapping(storage, spans=None) -> bool:
    """NOTE [Loaded by mapping] rule 2: whether `storage` is a CPU storage PyTorch cannot
    resize whose bytes all lie in private mappings of files (`spans`: as
    `private_file_spans` read them, for many storages at once). Not `is_shared()`:
    shared memory is a shared mapping, never a private one, and a private mapping made
    by `UntypedStorage.from_file(shared=False)` says is_shared() too."""
    nbytes = storage.nbytes()
    return (bool(nbytes) and storage.device.type == "cpu" and not storage.resizable()
            and in_private_file_mappings(storage.data_ptr(), nbytes, spans))


_given_up: dict[int, tuple[weakref.ref, object]] = {}    # NOTE [Loaded by mapping] rule 3
_given_up_lock = threading.Lock()


def adopt_loaded(storage) -> None:
    """NOTE [Loaded by mapping] rule 2: give `storage` (one `make_movable` named) a copy
    of its bytes in memory of its own; the mapped memory stays mapped while it lives."""
    own = torch.empty(storage.nbytes(), dtype=torch.uint8).untyped_storage()
    own.copy_(storage)
    storage._swap_data_ptr_(own)          # `own` now holds the mapped memory (rule 3)
    _while_alive(_given_up, _given_up_lock, storage, own)
    _page_out(own.data_ptr(), own.nbytes())


def _page_out(start: int, nbytes: int) -> None:
    """NOTE [Loaded by mapping] rule 3: ask the kernel to reclaim the pages of a mapping
    given up (MADV_PAGEOUT: clean file pages are dropped, read from the file again if a
    view touches them; a page written since is kept, in swap at worst: unlike
    MADV_DONTNEED, nothing is lost). Only a hint: an old kernel's refusal is ignored."""
    first = start - start % mmap.PAGESIZE
    end = -(-(start + nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE
    _libc.madvise(first, end - first, MADV_PAGEOUT)


def adopt_orphan(storage) -> bool:
    """If `storage` is an orphan (rule 7), give it a copy of its bytes in memory of its
    own (resizable again) and return True."""
    with _orphans_lock:
        item = _orphans.pop(storage._cdata, None)
    if item is None or item[0]() is not storage:
        return False
    item[1].unmap(storage, copy=True)
    return True


class Pager:
    """Between iterations, keeps the pages read from mapped storages within `allowance`
    bytes above what was resident when it started, and within `FLOOR` bytes whenever the
    whole resident set is above `ceiling` (NOTE [Mapped state], rule 2), checking every
    `period` seconds from a daemon thread. The first time it finds more than
    `RELIEVE_AT` bytes read while the process is over the ceiling, it calls `relieve`
    (if given) before it decides to page out. The floor keeps a process whose other
    memory alone is above the ceiling from paging out at every check."""

    FLOOR = 16 * 2**20
    RELIEVE_AT = 4 * 2**20     # a few MiB of file pages come and go anyway (code, libraries)

    def __init__(self, period: float = 0.005):
        self.period = period
        self.page_outs = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self, mappings: list[Mapping], allowance: int, ceiling: int | None = None,
              relieve=None) -> None:
        self.stop()
        if not mappings:
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run,
                                        args=(list(mappings), allowance, ceiling, relieve,
                                              self._stop),
                                        name="outcore-pager", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop paging; returns once the thread no longer touches any mapping."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            if thread.ident is not None:       # started (an interrupted start() may not have)
                thread.join()

    def _run(self, mappings, allowance, ceiling, relieve, stop) -> None:
        try:
            base = file_resident_bytes()
            while not stop.wait(self.period):
                read = file_resident_bytes() - base
                if (relieve is not None and ceiling is not None and read > self.RELIEVE_AT
                        and resident_bytes() > ceiling):
                    relieve()
                    relieve = None             # once per stretch between iterations
                if read > allowance or (ceiling is not None and read > self.FLOOR
                                        and resident_bytes() > ceiling):
                    for mapping in mappings:
                        if stop.is_set():
                            return
                        mapping.page_out()
                    self.page_outs += 1
                    # What stayed (the user's own file mappings, libraries' code) is not
                    # read state: the next page-out waits for growth past it.
                    base = max(base, file_resident_bytes())
        except Exception:          # noqa: BLE001 - /proc gone at exit: paging is a hint
            return
