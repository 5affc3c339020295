"""The disk mover: copies storage bytes between RAM and a private swap file.

One worker thread per direction (one link each way, as the planner and simulator
assume). The file is opened with O_DIRECT where the filesystem allows it: what is on disk
is then really off RAM, not parked in the page cache. O_DIRECT wants the memory address,
the file offset and the length aligned to the block size (a page covers every common one),
and tensor memory is not page-aligned (large CPU tensors sit 64 bytes past a page
boundary), so:

* a write puts the tensor's bytes at the same offset within a page as in memory (its
  `head`, recorded per extent) and sends the tensor's whole pages straight from its
  memory; its partial first and last pages, shared with other memory that may change
  meanwhile, go from a snapshot in a page-aligned staging buffer;
* a read into memory with that same page offset reads the tensor's whole interior pages
  straight into it, and the partial first and last pages through the staging buffer,
  copying out only the tensor's own bytes (memory around a tensor belongs to
  others); into memory with another page offset, everything goes through the staging
  buffer.

Where the filesystem refuses O_DIRECT (some network filesystems) the mover falls back to
buffered I/O straight between tensor memory and the file, and asks the kernel to drop the
written pages.

The swap file is created in a fresh private directory (0700, file 0600) and unlinked at
once: the space lives exactly as long as the open descriptor, so nothing is left behind
on exit, on an exception, on SIGINT/SIGTERM, or even on SIGKILL.
"""
from __future__ import annotations

import ctypes
import errno
import os
import tempfile
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

from ...errors import OutcoreError
from ...memory import ALIGNMENT, AlignedBuffer, Extent, ExtentAllocator, round_up
from ...units import format_bytes

CHUNK_BYTES = 8 * 2**20
# Smaller transfers go through the staging buffer in one request each: copying them costs
# less than the two extra page-sized requests a direct transfer needs for its partial first
# and last pages (about 25 us of CPU and 60 us of latency each here, against ~7 GB/s memcpy).
DIRECT_MIN_BYTES = 2**20
# Direct transfers from or to memory the kernel cannot pin for I/O fall back to staging.
_NOT_DIRECT = (errno.EINVAL, errno.EFAULT)


_PyBUF_WRITE = 0x200
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.restype = ctypes.py_object
_memory_view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)


def _memory(address: int, nbytes: int) -> memoryview:
    """A writable memoryview over `nbytes` of raw memory at `address`, for os.pwrite and
    os.preadv (which release the GIL while the kernel copies). It does not keep the
    memory alive: the transfer's `keepalive` does."""
    return _memory_view(address, nbytes, _PyBUF_WRITE)


def _filesystem_type(path: str) -> str:
    """The type of the filesystem holding `path` ('' when unknown)."""
    best, kind = "", ""
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


class DiskMover:
    """Moves whole storages to and from extents of one swap file."""

    name = "disk"

    def __init__(self, swap_dir: str | None = None, *, chunk_bytes: int = CHUNK_BYTES,
                 direct: bool = True, direct_min_bytes: int = DIRECT_MIN_BYTES):
        """`direct=False` uses buffered I/O even where O_DIRECT works; transfers under
        `direct_min_bytes` are staged whole."""
        base = os.path.abspath(swap_dir or tempfile.gettempdir())
        if not os.path.isdir(base):
            raise OutcoreError(f"swap directory {base} does not exist; create it or pass "
                               "swap_dir= a directory on a local disk with free space")
        try:
            self._dir = tempfile.mkdtemp(prefix="outcore-swap-", dir=base)   # mode 0700
        except OSError as exc:
            raise OutcoreError(f"cannot create a swap directory in {base}: {exc.strerror}; pass "
                               "swap_dir= a writable directory on a local disk") from exc
        path = os.path.join(self._dir, "swap")
        try:
            self._fd, self.direct = self._open(path, direct)
        except OSError as exc:
            raise OutcoreError(f"cannot create a swap file in {base}: {exc.strerror}; pass "
                               "swap_dir= a writable directory on a local disk") from exc
        finally:
            # Unlinked at once: the space lives exactly as long as the descriptor.
            if os.path.exists(path):
                os.unlink(path)
            os.rmdir(self._dir)
        self.location = base
        self.filesystem = _filesystem_type(base)
        if self.filesystem == "tmpfs":
            warnings.warn(f"swap directory {base} is on tmpfs, which is RAM: evicted tensors "
                          "will still occupy memory. Pass swap_dir= a directory on a disk.",
                          stacklevel=3)
        self.chunk_bytes = round_up(chunk_bytes)
        self.direct_min_bytes = direct_min_bytes
        self.allocator = ExtentAllocator()
        self._heads: dict[int, int] = {}   # extent offset -> where in its first page the bytes start
        self._file_size = 0
        self._write_buffer = AlignedBuffer(self.chunk_bytes)
        self._read_buffer = AlignedBuffer(self.chunk_bytes)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="outcore-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="outcore-read")
        self.busy_write_s = 0.0          # time each worker spent moving bytes
        self.busy_read_s = 0.0
        self.closed = False

    @staticmethod
    def _open(path: str, direct: bool = True) -> tuple[int, bool]:
        """Open the swap file with O_DIRECT if the filesystem really supports it (some
        accept the flag at open and refuse the first write), else buffered."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
        if not direct:
            return os.open(path, flags, 0o600), False
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            return os.open(path, flags, 0o600), False
        probe = AlignedBuffer(ALIGNMENT)
        try:
            os.pwrite(fd, probe.view, 0)
            os.ftruncate(fd, 0)
            return fd, True
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            os.unlink(path)
            return os.open(path, flags, 0o600), False
        finally:
            probe.close()

    # -- space -------------------------------------------------------------------------
    def allocate(self, nbytes: int) -> Extent:
        """Reserve swap space for `nbytes`, growing the file; raises OutcoreError (and
        reserves nothing) when the disk is full. With O_DIRECT the extent has a page more,
        for the tensor's offset within its first page."""
        extent, needed = self.allocator.allocate(nbytes + (ALIGNMENT if self.direct else 0))
        if needed > self._file_size:
            try:
                os.posix_fallocate(self._fd, self._file_size, needed - self._file_size)
            except OSError as exc:
                self.allocator.free(extent)
                self.allocator.truncate(self._file_size)
                raise OutcoreError(
                    f"swap space in {self.location} is exhausted: could not grow the swap file "
                    f"from {format_bytes(self._file_size)} to {format_bytes(needed)} "
                    f"({exc.strerror}). Nothing was lost: the tensor stays in memory. Free disk "
                    "space, pass swap_dir= a larger disk, or raise the budget.") from exc
            self._file_size = needed
        return extent

    def free(self, extent: Extent) -> None:
        self._heads.pop(extent.offset, None)
        self.allocator.free(extent)

    @property
    def file_bytes(self) -> int:
        return self._file_size

    # -- transfers ---------------------------------------------------------------------
    def write(self, address: int, nbytes: int, extent: Extent, keepalive) -> Future:
        """Copy `nbytes` at `address` (a storage's memory) to `extent`, asynchronously.
        `keepalive` (the storage) is held until the copy is done."""
        head = 0
        if self.direct and round_up(address % ALIGNMENT + nbytes) <= extent.length:
            head = address % ALIGNMENT      # else (a reused extent too short): staged, at 0
        self._heads[extent.offset] = head
        return self._writer.submit(self._write, address, nbytes, extent, head, keepalive)

    def read(self, address: int, nbytes: int, extent: Extent, keepalive) -> Future:
        """Copy `nbytes` from `extent` to `address`, asynchronously."""
        head = self._heads.get(extent.offset, 0)
        return self._reader.submit(self._read, address, nbytes, extent, head, keepalive)

    def _write(self, address, nbytes, extent, head, keepalive):
        start = time.perf_counter()
        try:
            if nbytes == 0:
                return
            if not self.direct:
                self._pwrite_memory(address, nbytes, extent.offset)
                os.fdatasync(self._fd)
                os.posix_fadvise(self._fd, extent.offset, extent.length, os.POSIX_FADV_DONTNEED)
            elif head or address % ALIGNMENT == 0:
                # The pages covering the tensor: its whole pages straight from its memory,
                # the partial first and last ones (shared with other memory, which may
                # change meanwhile) from a snapshot in the staging buffer.
                lo, end = address - head, address + nbytes
                inner = round_up(address)
                outer = max(inner, end - end % ALIGNMENT)
                if outer == inner or nbytes < self.direct_min_bytes:
                    self._pwrite_staged(lo, round_up(end) - lo, extent.offset)
                else:
                    self._pwrite_staged(lo, inner - lo, extent.offset)
                    self._pwrite_pages(inner, outer - inner, extent.offset + inner - lo)
                    self._pwrite_staged(outer, round_up(end) - outer, extent.offset + outer - lo)
            else:
                self._pwrite_staged(address, nbytes, extent.offset)
        finally:
            self.busy_write_s += time.perf_counter() - start

    def _read(self, address, nbytes, extent, head, keepalive):
        start = time.perf_counter()
        try:
            at = extent.offset + head            # where the tensor's first byte is in the file
            if nbytes == 0:
                return
            if not self.direct:
                self._pread_memory(address, nbytes, at)
                os.posix_fadvise(self._fd, extent.offset, extent.length, os.POSIX_FADV_DONTNEED)
                return
            first = min(nbytes, -address % ALIGNMENT)                      # partial first page
            last = max(first, (address + nbytes) // ALIGNMENT * ALIGNMENT - address)
            if (address - at) % ALIGNMENT or last == first or nbytes < self.direct_min_bytes:
                self._pread_staged(address, nbytes, at)       # no whole page lines up
                return
            self._pread_staged(address, first, at)
            self._pread_pages(address + first, last - first, at + first)
            self._pread_staged(address + last, nbytes - last, at + last)  # partial last page
        finally:
            self.busy_read_s += time.perf_counter() - start

    # Each helper loops on short transfers; an error propagates as OSError (the Residency
    # turns it into an OutcoreError and keeps the fast copy of a failed write).
    def _pwrite_all(self, data, offset: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)

    def _pread_all(self, data, offset: int) -> None:
        done = 0
        while done < len(data):
            got = os.preadv(self._fd, [data[done:]], offset + done)
            if got == 0:
                raise OSError(errno.EIO, "unexpected end of swap file")
            done += got

    def _pwrite_memory(self, address: int, nbytes: int, offset: int) -> None:
        """Buffered: any address, offset and length will do."""
        for off in range(0, nbytes, self.chunk_bytes):
            self._pwrite_all(_memory(address + off, min(self.chunk_bytes, nbytes - off)),
                             offset + off)

    def _pread_memory(self, address: int, nbytes: int, offset: int) -> None:
        for off in range(0, nbytes, self.chunk_bytes):
            self._pread_all(_memory(address + off, min(self.chunk_bytes, nbytes - off)),
                            offset + off)

    def _pwrite_pages(self, address: int, nbytes: int, offset: int) -> None:
        """O_DIRECT from page-aligned memory (`address`, `nbytes`, `offset` aligned);
        memory the kernel will not do direct I/O on goes through the staging buffer."""
        for off in range(0, nbytes, self.chunk_bytes):
            n = min(self.chunk_bytes, nbytes - off)
            try:
                self._pwrite_all(_memory(address + off, n), offset + off)
            except OSError as exc:
                if exc.errno not in _NOT_DIRECT:
                    raise
                self._pwrite_staged(address + off, nbytes - off, offset + off)
                return

    def _pwrite_staged(self, address: int, nbytes: int, offset: int) -> None:
        """O_DIRECT through the staging buffer (`offset` aligned; the last page is padded)."""
        buf = self._write_buffer
        for off in range(0, nbytes, self.chunk_bytes):
            n = min(self.chunk_bytes, nbytes - off)
            ctypes.memmove(buf.address, address + off, n)
            self._pwrite_all(buf.view[:round_up(n)], offset + off)

    def _pread_pages(self, address: int, nbytes: int, offset: int) -> None:
        """O_DIRECT into whole pages of the tensor (`address`, `nbytes`, `offset` aligned)."""
        for off in range(0, nbytes, self.chunk_bytes):
            n = min(self.chunk_bytes, nbytes - off)
            try:
                self._pread_all(_memory(address + off, n), offset + off)
            except OSError as exc:
                if exc.errno not in _NOT_DIRECT:
                    raise
                self._pread_staged(address + off, nbytes - off, offset + off)
                return

    def _pread_staged(self, address: int, nbytes: int, offset: int) -> None:
        """O_DIRECT through the staging buffer: reads the pages holding file bytes
        [offset, offset + nbytes) and copies exactly those bytes to `address`."""
        buf, end = self._read_buffer, offset + nbytes
        while offset < end:
            page = offset - offset % ALIGNMENT
            n = min(self.chunk_bytes, round_up(end) - page)
            self._pread_all(buf.view[:n], page)
            take = min(end, page + n) - offset
            ctypes.memmove(address, buf.address + (offset - page), take)
            address += take
            offset += take

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        os.close(self._fd)
        self._write_buffer.close()
        self._read_buffer.close()

    def __repr__(self) -> str:
        mode = "O_DIRECT" if self.direct else "buffered + drop cache"
        return (f"DiskMover({self.location}, {self.filesystem or 'unknown fs'}, {mode}, "
                f"file {format_bytes(self._file_size)}, in use {format_bytes(self.allocator.in_use)})")
