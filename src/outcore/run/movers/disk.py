"""The disk mover: copies storage bytes between RAM and a private swap file.

One worker thread per direction (one link each way, as the planner and simulator
assume). Bytes go through page-aligned staging buffers so the file can be opened with
O_DIRECT: what is on disk is then really off RAM, not parked in the page cache. Where
the filesystem refuses O_DIRECT (tmpfs, some network filesystems) the mover falls back to
buffered I/O and asks the kernel to drop the written pages.

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

    def __init__(self, swap_dir: str | None = None, *, chunk_bytes: int = CHUNK_BYTES):
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
            self._fd, self.direct = self._open(path)
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
        self.allocator = ExtentAllocator()
        self._file_size = 0
        self._write_buffer = AlignedBuffer(self.chunk_bytes)
        self._read_buffer = AlignedBuffer(self.chunk_bytes)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="outcore-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="outcore-read")
        self.busy_write_s = 0.0          # time each worker spent moving bytes
        self.busy_read_s = 0.0
        self.closed = False

    @staticmethod
    def _open(path: str) -> tuple[int, bool]:
        """Open the swap file with O_DIRECT if the filesystem really supports it (some
        accept the flag at open and refuse the first write), else buffered."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
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
        reserves nothing) when the disk is full."""
        extent, needed = self.allocator.allocate(nbytes)
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
        self.allocator.free(extent)

    @property
    def file_bytes(self) -> int:
        return self._file_size

    # -- transfers ---------------------------------------------------------------------
    def write(self, address: int, nbytes: int, extent: Extent, keepalive) -> Future:
        """Copy `nbytes` at `address` (a storage's memory) to `extent`, asynchronously.
        `keepalive` (the storage) is held until the copy is done."""
        return self._writer.submit(self._write, address, nbytes, extent, keepalive)

    def read(self, address: int, nbytes: int, extent: Extent, keepalive) -> Future:
        """Copy `nbytes` from `extent` to `address`, asynchronously."""
        return self._reader.submit(self._read, address, nbytes, extent, keepalive)

    def _write(self, address, nbytes, extent, keepalive):
        start = time.perf_counter()
        buf = self._write_buffer
        try:
            for off in range(0, nbytes, self.chunk_bytes):
                n = min(self.chunk_bytes, nbytes - off)
                ctypes.memmove(buf.address, address + off, n)
                padded = round_up(n)
                done = 0
                while done < padded:
                    done += os.pwrite(self._fd, buf.view[done:padded], extent.offset + off + done)
            if not self.direct:
                os.fdatasync(self._fd)
                os.posix_fadvise(self._fd, extent.offset, extent.length, os.POSIX_FADV_DONTNEED)
        finally:
            self.busy_write_s += time.perf_counter() - start

    def _read(self, address, nbytes, extent, keepalive):
        start = time.perf_counter()
        buf = self._read_buffer
        try:
            for off in range(0, nbytes, self.chunk_bytes):
                n = min(self.chunk_bytes, nbytes - off)
                padded = round_up(n)
                done = 0
                while done < padded:
                    got = os.preadv(self._fd, [buf.view[done:padded]], extent.offset + off + done)
                    if got == 0:
                        raise OSError(errno.EIO, "unexpected end of swap file")
                    done += got
                ctypes.memmove(address + off, buf.address, n)
            if not self.direct:
                os.posix_fadvise(self._fd, extent.offset, extent.length, os.POSIX_FADV_DONTNEED)
        finally:
            self.busy_read_s += time.perf_counter() - start

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
