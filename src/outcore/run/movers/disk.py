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

The swap file never has a name anyone could leave behind. It is opened with O_TMPFILE
(plus O_EXCL, so it can never be linked into the directory either): an unnamed 0600 inode
in `swap_dir`'s filesystem whose space lives exactly as long as the descriptor, so
nothing is left on exit, on an exception, on SIGINT/SIGTERM, or on SIGKILL at any moment,
construction included. O_DIRECT is then switched on for the open descriptor
(fcntl F_SETFL) and probed with one page-aligned write, truncated away again; a
filesystem that refuses the flag or the write gets buffered I/O (O_DIRECT cleared again).

Where O_TMPFILE is refused (filesystems without it, such as some network and FUSE ones,
and kernels before 3.11) the file is created in a fresh private directory
`outcore-swap-<pid>-<8 hex digits>` (0700, file 0600, O_CREAT|O_EXCL) and the file and the
directory are removed at once, before any write or probe. Only a SIGKILL inside those four
system calls can leave the directory (at most holding an empty `swap`) behind; every
DiskMover sweeps such leftovers of dead processes from its swap directory before making
its own file, and those of earlier versions (no pid in the name) once an hour old: see
`_sweep`.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import secrets
import stat
import tempfile
import threading
import time
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor

from ...errors import OutcoreError, SwapSpaceExhausted, file_too_large, no_room
from ...memory import ALIGNMENT, AlignedBuffer, Extent, ExtentAllocator, round_up
from ..mapped import Mapping
from ...units import format_bytes

CHUNK_BYTES = 8 * 2**20
# Smaller transfers go through the staging buffer in one request each: copying them costs
# less than the two extra page-sized requests a direct transfer needs for its partial first
# and last pages (docs/executor.md, "The disk mover").
DIRECT_MIN_BYTES = 2**20
# Direct transfers from or to memory the kernel cannot pin for I/O fall back to staging.
_NOT_DIRECT = (errno.EINVAL, errno.EFAULT)

# How a filesystem or kernel says "no O_TMPFILE here": EOPNOTSUPP from filesystems without
# it, EISDIR from kernels before 3.11 (which see O_DIRECTORY|O_RDWR), EINVAL for flags the
# kernel does not know, ENOENT from some FUSE filesystems. Anything else (EACCES, EROFS,
# ENOSPC...) would fail the named fallback too, and is reported as it is.
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT)
# How a filesystem refuses O_DIRECT, at fcntl or at the first write.
_NO_DIRECT = (errno.EINVAL, errno.EOPNOTSUPP)

# The fallback's private directories: outcore-swap-<pid>-<8 hex digits>. Directories of
# earlier versions were tempfile.mkdtemp(prefix="outcore-swap-"): 8 characters of
# [a-z0-9_], never a "-", so the two patterns cannot match the same name.
_SWAP_DIR = "outcore-swap-{pid}-{tag}"
_SWAP_DIR_RE = re.compile(r"outcore-swap-([1-9][0-9]{0,9})-[0-9a-f]{8}")
_OLD_SWAP_DIR_RE = re.compile(r"outcore-swap-[a-z0-9_]{8}")
OLD_SWAP_DIR_AGE_S = 3600.0
# The most a leftover `swap` may hold for the sweep to remove it: the fallback unlinks it
# before any write; earlier versions wrote one probe page before.
_LEFTOVER_BYTES = {"fallback": 0, "old": ALIGNMENT}


_PyBUF_WRITE = 0x200
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.restype = ctypes.py_object
_memory_view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)


def _memory(address: int, nbytes: int) -> memoryview:
    """A writable memoryview over `nbytes` of raw memory at `address`, for os.pwrite and
    os.preadv (which release the GIL while the kernel copies). It does not keep the
    memory alive: the transfer's `keepalive` does."""
    return _memory_view(address, nbytes, _PyBUF_WRITE)


class SwapFileShort(OSError):
    """The swap file is shorter than outcore wrote it: something else truncated it (a
    state_dir's file is a named one). Its bytes past the end are gone: no read is tried
    again, and nothing is mapped there (a read of the mapping would be a SIGBUS)."""


def let_go_of_threads(*pools: ThreadPoolExecutor) -> None:
    """Drop shut-down pools' finished threads now. Kept, they wait in a reference cycle
    for the cyclic collector, which then runs concurrent.futures' weakref callback for
    each (`_threads_queues`): a Ctrl-C landing in a long collection is handled in that
    first Python code, where Python swallows it (helper-133: most of the Ctrl-Cs lost
    while a model was dropped after close(); NOTE [Interrupts] rule 8)."""
    for pool in pools:
        getattr(pool, "_threads", set()).clear()


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


def _pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _stale(name: str, entry: os.stat_result, now: float) -> str | None:
    """Which kind of leftover `name` is ('fallback' or 'old'), or None to leave it alone."""
    if not stat.S_ISDIR(entry.st_mode) or entry.st_uid != os.getuid():
        return None
    match = _SWAP_DIR_RE.fullmatch(name)
    if match:
        pid = int(match.group(1))
        if pid != os.getpid() and pid < 2**22 and not _pid_alive(pid):   # 2**22: pid_max
            return "fallback"
        return None
    if _OLD_SWAP_DIR_RE.fullmatch(name) and now - entry.st_mtime > OLD_SWAP_DIR_AGE_S:
        return "old"
    return None


def _sweep(base: str) -> int:
    """Remove the swap directories killed processes left in `base`; returns how many.

    Only directories owned by this user are considered (symlinks never), and only:

    * `outcore-swap-<pid>-<8 hex>` (this version's fallback) whose pid is no live process,
      and only when empty or holding just an empty regular file `swap` (the fallback
      never writes before unlinking it): a directory holding more is someone else's
      and stays.
    * `outcore-swap-<8 chars>` (earlier versions, which carried no pid) last modified
      over OLD_SWAP_DIR_AGE_S (an hour) ago, and only when empty or holding just a regular
      file `swap` of at most one page (all those versions ever wrote before unlinking
      it: the O_DIRECT probe). The age stands in for the missing pid: the window those
      versions left the directory in lasted microseconds.

    Everything else in `base` is left alone. Any error (a race with another process
    sweeping or creating, a permission, a vanished entry) skips that entry silently:
    sweeping is housekeeping and must never stop a swap file being made. A killed process
    its parent has not reaped yet still counts as alive: its directory waits for the next
    construction after that.

    Every construction sweeps, O_TMPFILE or not, for one scandir of `base`: earlier
    versions left their directories exactly where O_TMPFILE now works, and a swap
    directory may be shared with processes (other kernels, other pid namespaces) that
    take the fallback. Such sharing can also make a live process's fallback directory
    look dead for the microseconds it exists; `_open_named` then just tries another name.
    """
    swept, now = 0, time.time()
    try:
        entries = [e for e in os.scandir(base) if e.name.startswith("outcore-swap-")]
    except OSError:
        return 0
    for e in entries:
        try:
            kind = _stale(e.name, e.stat(follow_symlinks=False), now)
            if kind is None:
                continue
            # Work through a descriptor of the very directory checked above: a name
            # swapped for a symlink or another directory meanwhile is not followed.
            fd = os.open(e.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                st, seen = os.fstat(fd), e.stat(follow_symlinks=False)
                if (st.st_dev, st.st_ino, st.st_uid) != (seen.st_dev, seen.st_ino, os.getuid()):
                    continue
                names = os.listdir(fd)
                if names not in ([], ["swap"]):
                    continue
                if names:
                    swap = os.stat("swap", dir_fd=fd, follow_symlinks=False)
                    if not stat.S_ISREG(swap.st_mode) or swap.st_size > _LEFTOVER_BYTES[kind]:
                        continue
                    os.unlink("swap", dir_fd=fd)
            finally:
                os.close(fd)
            os.rmdir(e.path)
            swept += 1
        except OSError:
            continue
    return swept


def _open_unnamed(base: str) -> int | None:
    """An unnamed swap file in `base` (O_TMPFILE), or None where that is refused."""
    if not hasattr(os, "O_TMPFILE"):
        return None
    try:
        return os.open(base, os.O_TMPFILE | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError as exc:
        if exc.errno in _NO_TMPFILE:
            return None
        raise OutcoreError(f"cannot create a swap file in {base}: {exc.strerror}; pass "
                           "swap_dir= a writable directory on a local disk") from exc


def _open_named(base: str) -> int:
    """A swap file created in a fresh private directory in `base`, the file and the
    directory removed again before this returns (and before anything is written)."""
    for _ in range(100):
        path = os.path.join(base, _SWAP_DIR.format(pid=os.getpid(), tag=secrets.token_hex(4)))
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        except OSError as exc:
            # A directory that exists but takes no entries (/proc, /sys) says ENOENT.
            why = ("the file system there takes no new files"
                   if exc.errno == errno.ENOENT and os.path.isdir(base) else exc.strerror)
            raise OutcoreError(f"cannot create a swap directory in {base}: {why}; "
                               "pass swap_dir= a writable directory on a local disk") from exc
        swap, fd = os.path.join(path, "swap"), -1
        try:
            fd = os.open(swap, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:
            pass        # the directory was swept meanwhile (see below): try another name
        except OSError as exc:
            raise OutcoreError(f"cannot create a swap file in {base}: {exc.strerror}; pass "
                               "swap_dir= a writable directory on a local disk") from exc
        finally:
            # Whatever happened, KeyboardInterrupt included, both names go at once. In a
            # directory made 0700 a moment ago `swap` can only be the file just created.
            # Either may already be gone: a sweeper in another pid namespace sharing
            # `base` can take this pid for a dead one. Errors are checked below.
            for remove, name in ((os.unlink, swap), (os.rmdir, path)):
                try:
                    remove(name)
                except OSError:
                    pass
        if fd < 0:
            continue
        if os.fstat(fd).st_nlink:
            os.close(fd)
            raise OutcoreError(f"cannot remove the swap file {swap} after creating it; remove "
                               "it, and pass swap_dir= a directory of your own on a local disk")
        return fd
    raise OutcoreError(f"cannot create a swap directory in {base}: every name tried was taken "
                       "or vanished at once; pass swap_dir= a directory of your own")


def _too_large(location: str, size: int, needed: int, flag: str) -> str:
    """EFBIG growing the file: the limit that said no (errors.file_too_large)."""
    return (f"could not grow the swap file in {location} from {format_bytes(size)} to "
            f"{format_bytes(needed)} (File too large): {file_too_large(needed, flag)}. "
            "Nothing was lost: the tensor stays in memory.")


# A state directory's swap file (run/durable.py) lives in state_dir, not swap_dir.
_KEPT_ADVICE = ("With state_dir the swap file is kept in that directory, and its disk holds the "
                "model's and optimizer's state twice, plus what a step moves out, plus one more "
                "copy after a resume until the first commit, and one more under a process group "
                "(NOTE [Durable state], docs/state.md): free space there, or pass state_dir= a "
                "directory on a larger disk.")


def _enable_direct(fd: int) -> bool:
    """Switch O_DIRECT on for `fd` if the filesystem really supports it; returns whether
    it did. Some filesystems accept the flag and refuse the first write, so one aligned
    page is written (and truncated away): a refusal at either step clears the flag again
    and leaves buffered I/O. Other errors (a full disk...) propagate as OSError."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError as exc:
        if exc.errno not in _NO_DIRECT:
            raise
        return False
    probe = AlignedBuffer(ALIGNMENT)
    try:
        os.pwrite(fd, probe.view, 0)
        os.ftruncate(fd, 0)
        return True
    except OSError as exc:
        if exc.errno not in _NO_DIRECT:
            raise
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        os.ftruncate(fd, 0)
        return False
    finally:
        probe.close()


class DiskMover:
    """Moves whole storages to and from extents of one swap file."""

    name = "disk"
    device_type = "cpu"      # the fast tier it moves from (Residency NOTE 6)

    def __init__(self, swap_dir: str | None = None, *, chunk_bytes: int = CHUNK_BYTES,
                 direct: bool = True, direct_min_bytes: int = DIRECT_MIN_BYTES,
                 path: str | None = None):
        """`direct=False` uses buffered I/O even where O_DIRECT works; transfers under
        `direct_min_bytes` are staged whole. `path`: a named swap file that is kept (the
        state directory's, run/durable.py) instead of an unnamed one in `swap_dir`."""
        base = os.path.abspath(os.path.dirname(path) if path else swap_dir or tempfile.gettempdir())
        if not os.path.isdir(base):
            what = ("is a file, not a directory; pass" if os.path.exists(base) else
                    "does not exist; create it or pass")
            raise OutcoreError(f"swap directory {base} {what} swap_dir= a directory on a local "
                               "disk with free space (the swap file is made in it)")
        self._fd, self.direct = self._open_kept(path, direct) if path else self._open(base, direct)
        try:
            self._setup(base, path, chunk_bytes, direct_min_bytes)
        except BaseException:
            os.close(self._fd)
            raise

    def _setup(self, base: str, path: str | None, chunk_bytes: int, direct_min_bytes: int) -> None:
        self.location = base
        self.kept = path is not None
        self.where = f"the swap file in {base}"      # for messages
        self.filesystem = _filesystem_type(base)
        if self.filesystem == "tmpfs":
            warnings.warn(f"swap directory {base} is on tmpfs, which is RAM: evicted tensors "
                          "will still occupy memory. Pass swap_dir= a directory on a disk.",
                          stacklevel=4)
        self.chunk_bytes = round_up(chunk_bytes)
        self.direct_min_bytes = direct_min_bytes
        self.allocator = ExtentAllocator()
        self._heads: dict[int, int] = {}   # extent offset -> where in its first page the bytes start
        # A kept (state) file only: extent offset -> CRC-32 of the bytes last written there,
        # taken from memory by the writer (NOTE [Durable state], rule 7).
        self._crcs: dict[int, int] = {}
        # NOTE [Durable state], rule 2: extents a state manifest refers to, and those of
        # them their owner let go of (freed once no manifest refers to them).
        self._committed: dict[int, Extent] = {}
        self._released: dict[int, Extent] = {}
        # Extents a process forked between iterations may map (NOTE [Mapped state] rule
        # 9): never written again nor reused while it may (`set_leased`).
        self._leased: dict[int, Extent] = {}
        self.sync_error: OSError | None = None    # the first fdatasync that failed (rule 6)
        self._file_size = 0
        # Something else truncated the file (`SwapFileShort`): the least size seen below
        # ours, and {offset: end written} of the extents written above it since, whose
        # bytes are current again. Grown again (by us or a write past the cut), the file
        # reads zeros there: every other extent reaching past the cut is lost (helper-135).
        # outcore never shrinks the file, so any size below the last one seen is a cut
        # (a second one above the first drops the extents written past it: helper-136).
        self._cut: int | None = None
        self._rewritten: dict[int, int] = {}
        self._seen_size = 0
        # One look at a time: a look's fstat, taken before a growth another thread then
        # saw, compared with that thread's larger size read as a cut (a full-suite run:
        # SwapFileShort in a fresh state_dir, nothing truncated). Serialized, each size
        # read is at least the last one kept unless the file really shrank.
        self._seen_lock = threading.Lock()
        self._write_buffer = AlignedBuffer(self.chunk_bytes)
        self._read_buffer = AlignedBuffer(self.chunk_bytes)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="outcore-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="outcore-read")
        self.busy_write_s = 0.0          # time each worker spent moving bytes
        self.busy_read_s = 0.0
        self.cpu_write_s = 0.0           # the CPU time each spent on it (syscalls, copies)
        self.cpu_read_s = 0.0
        self.closed = False

    @staticmethod
    def _open(base: str, direct: bool = True) -> tuple[int, bool]:
        """The swap file's descriptor, and whether it does O_DIRECT: leftovers of killed
        processes swept, then an unnamed file (O_TMPFILE), or where refused a named one
        removed at once; O_DIRECT switched on and probed only once the file has no name."""
        _sweep(base)
        fd = _open_unnamed(base)
        if fd is None:
            fd = _open_named(base)
        try:
            return fd, direct and _enable_direct(fd)
        except OSError as exc:
            os.close(fd)
            raise no_room(exc)(f"cannot create a swap file in {base}: {exc.strerror}; pass "
                               "swap_dir= a writable directory on a local disk with free "
                               "space") from exc
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _open_kept(path: str, direct: bool = True) -> tuple[int, bool]:
        """A named swap file that outlives the process (a state directory's)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise OutcoreError(f"cannot create the state file {path}: {exc.strerror}; pass "
                               "state_dir= a writable directory on a local disk") from exc
        try:
            return fd, direct and _enable_direct(fd)
        except OSError as exc:           # the file itself goes with Durable.close()
            os.close(fd)
            raise no_room(exc)(f"cannot write the state file {path}: {exc.strerror}. "
                               f"{_KEPT_ADVICE}") from exc
        except BaseException:
            os.close(fd)
            raise

    # -- durable state (run/durable.py) ------------------------------------------------
    def is_committed(self, extent: Extent) -> bool:
        """Whether `extent` must not be written again: a state manifest refers to it, or
        a forked child may map it."""
        return extent.offset in self._committed or extent.offset in self._leased

    def set_leased(self, extents: dict) -> None:
        """Processes forked between iterations map `extents` (offset -> Extent, the union
        over the forks still alive): their bytes stay as they are (NOTE [Mapped state]
        rule 9). Released extents no fork maps any more, nor a manifest, are freed."""
        self._leased = dict(extents)
        for offset in list(self._released):
            if offset not in self._committed and offset not in self._leased:
                self.allocator.free(self._released.pop(offset))

    def head(self, extent: Extent) -> int:
        """Where in the extent the bytes last written to it begin."""
        return self._heads.get(extent.offset, 0)

    def sync(self) -> None:
        self._fdatasync()

    def file_stat(self) -> os.stat_result:
        """os.fstat of the open swap file (NOTE [Durable state] rule 12)."""
        return os.fstat(self._fd)

    def _fdatasync(self) -> None:
        """fdatasync the file, noting the first failure (NOTE [Durable state] rule 6: pages
        that failed writeback may be dropped, so no later sync vouches for them)."""
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            if self.sync_error is None:
                self.sync_error = exc
            raise

    def protect(self, extents: dict) -> None:
        """A manifest about to be written refers to `extents`: from now on they are
        never written again, beside those the current manifest refers to."""
        self._committed.update(extents)

    def commit(self, extents: dict) -> None:
        """A new manifest refers to `extents` (offset -> Extent): free the released
        extents the old one referred to and this one does not."""
        for offset in list(self._released):
            if offset not in extents and offset not in self._leased:
                self.allocator.free(self._released.pop(offset))
        self._committed = dict(extents)

    # -- space -------------------------------------------------------------------------
    def allocate(self, nbytes: int) -> Extent:
        """Reserve swap space for `nbytes`, growing the file; raises OutcoreError (and
        reserves nothing) when the disk is full. With O_DIRECT the extent has a page more,
        for the tensor's offset within its first page."""
        self._notice_cut()
        extent, needed = self.allocator.allocate(nbytes + (ALIGNMENT if self.direct else 0))
        if needed > self._file_size:
            try:
                os.posix_fallocate(self._fd, self._file_size, needed - self._file_size)
            except OSError as exc:
                self.allocator.free(extent)
                self.allocator.truncate(self._file_size)
                if exc.errno == errno.EFBIG:
                    raise OutcoreError(_too_large(self.location, self._file_size, needed,
                                                  "state_dir" if self.kept else "swap_dir")) from exc
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise OutcoreError(
                        f"could not grow the swap file in {self.location} from "
                        f"{format_bytes(self._file_size)} to {format_bytes(needed)}: "
                        f"{exc.strerror}. Nothing was lost: the tensor stays in memory.") from exc
                advice = (_KEPT_ADVICE if self.kept else
                          "Free disk space, pass swap_dir= a larger disk, or raise the budget.")
                raise SwapSpaceExhausted(
                    f"swap space in {self.location} is exhausted: could not grow the swap file "
                    f"from {format_bytes(self._file_size)} to {format_bytes(needed)} "
                    f"({exc.strerror}). Nothing was lost: the tensor stays in memory. "
                    f"{advice}") from exc
            self._file_size = needed
        return extent

    def free(self, extent: Extent) -> None:
        if extent.offset in self._committed or extent.offset in self._leased:
            self._released[extent.offset] = extent   # NOTE [Durable state], rule 2;
            return                                   # NOTE [Mapped state], rule 9
        self._heads.pop(extent.offset, None)
        self.allocator.free(extent)

    @property
    def file_bytes(self) -> int:
        return self._file_size

    def synchronize(self) -> None:
        """Before mapped storages are unmapped: CPU writes are done when they return."""

    def promote(self, extent: Extent, nbytes: int) -> Extent:
        """The place to map `extent`'s bytes from: the swap file is the only tier here."""
        return extent

    def map(self, extent: Extent, nbytes: int, storage):
        """Point `storage` (resized to 0) at a private mapping of the `nbytes` it was last
        written to `extent` (run/mapped.py); raises OSError where the kernel refuses."""
        if self.closed:
            raise OSError(errno.EBADF, "the swap file is closed")
        self._notice_cut()
        if self._lost(extent):      # mapped past the file's end: a SIGBUS when read
            raise self._short()
        return Mapping(self._fd, extent.offset, self._heads.get(extent.offset, 0), nbytes, storage)

    # -- transfers ---------------------------------------------------------------------
    def write(self, address: int, nbytes: int, extent: Extent, keepalive) -> Future:
        """Copy `nbytes` at `address` (a storage's memory) to `extent`, asynchronously.
        `keepalive` (the storage) is held until the copy is done."""
        head = 0
        if self.direct and round_up(address % ALIGNMENT + nbytes) <= extent.length:
            head = address % ALIGNMENT      # else (a reused extent too short): staged, at 0
        self._heads[extent.offset] = head
        self._notice_cut()
        if self._cut is not None and extent.offset + extent.length > self._cut:
            self._rewritten[extent.offset] = extent.offset + round_up(head + nbytes)
        if self.kept:
            self._crcs.pop(extent.offset, None)       # until this write has its own
        return self._writer.submit(self._write, address, nbytes, extent, head, keepalive)

    def _notice_cut(self) -> None:
        """Note a truncation by something else (`_cut`): one fstat. Called on the step's
        thread before a transfer is issued, and on the workers' before each transfer
        (a write queued when the file was cut grew it again before the step's thread
        looked, and the cut was taken at the grown size; a read queued then read the
        zeros: helper-136). The step's thread keeps its own checks too: it sees a cut
        that lands while a worker's write runs, which the worker's next check would take
        at the size that write grew the file back to (without them, 3 of 8 seeds of
        helper-136's random truncations read zeros; with them, none of the same 8). A
        cut that lands while a write runs can still be missed.
        Only a kept file has a name something else can cut it by: an unnamed one is
        left alone."""
        if not self.kept:
            return
        with self._seen_lock:
            size = os.fstat(self._fd).st_size
            if size < self._seen_size:
                self._cut = size if self._cut is None else min(self._cut, size)
                self._rewritten = {o: end for o, end in self._rewritten.items() if end <= size}
            self._seen_size = size

    def _lost(self, extent: Extent) -> bool:
        return (self._cut is not None and extent.offset + extent.length > self._cut
                and extent.offset not in self._rewritten)

    def _short(self) -> "SwapFileShort":
        return SwapFileShort(errno.EIO, f"the swap file in {self.location} ends before this "
                             "tensor's bytes: something else truncated it")

    def crc(self, extent: Extent) -> int | None:
        """The CRC-32 of the bytes last written to `extent` of a kept file, else None."""
        return self._crcs.get(extent.offset)

    def read(self, address: int, nbytes: int, extent: Extent, keepalive) -> Future:
        """Copy `nbytes` from `extent` to `address`, asynchronously."""
        head = self._heads.get(extent.offset, 0)
        self._notice_cut()
        if self._lost(extent):          # zeros where the file was grown again: never read
            failed: Future = Future()
            failed.set_exception(self._short())
            return failed
        return self._reader.submit(self._read, address, nbytes, extent, head, keepalive)

    # Synchronous page-aligned transfers on the caller's thread, for the host mover's
    # spill tier (run/movers/host.py): `address` is a page-aligned staging buffer with
    # room for `nbytes` rounded up to a page, `offset` a page-aligned place in an extent.
    def write_at(self, address: int, nbytes: int, offset: int) -> None:
        if self.direct:
            self._pwrite_pages(address, round_up(nbytes), offset)
        else:
            self._pwrite_memory(address, nbytes, offset)

    def read_at(self, address: int, nbytes: int, offset: int) -> None:
        if self.direct:
            self._pread_pages(address, round_up(nbytes), offset)
        else:
            self._pread_memory(address, nbytes, offset)

    def drop_cached(self, offset: int, length: int) -> None:
        """After buffered writes: flush them and let the page cache drop them."""
        if not self.direct:
            self._fdatasync()
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)

    def _write(self, address, nbytes, extent, head, keepalive) -> tuple[float, float]:
        """The copy itself, on the writer thread; returns when it ran (perf_counter
        seconds), for timelines."""
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            if nbytes == 0:
                return start, start
            crc = zlib.crc32(_memory(address, nbytes)) if self.kept else None
            self._notice_cut()          # right before the bytes go: the window is the write's
            self._write_bytes(address, nbytes, extent, head)
            if crc is not None:
                self._crcs[extent.offset] = crc
        finally:
            end = time.perf_counter()
            self.busy_write_s += end - start
            self.cpu_write_s += time.thread_time() - cpu
        return start, end

    def _write_bytes(self, address, nbytes, extent, head) -> None:
        """The bytes of `_write`: O_DIRECT from the pages themselves where it can."""
        if not self.direct:
            self._pwrite_memory(address, nbytes, extent.offset)
            self._fdatasync()
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

    def _read(self, address, nbytes, extent, head, keepalive) -> tuple[float, float]:
        """The copy itself, on the reader thread; returns when it ran, as `_write`."""
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            self._notice_cut()          # issued before a cut was seen: read after it
            if self._lost(extent):
                raise self._short()
            self._read_into(address, nbytes, extent.offset + head, extent)
        finally:
            end = time.perf_counter()
            self.busy_read_s += end - start
            self.cpu_read_s += time.thread_time() - cpu
        return start, end

    def _read_into(self, address, nbytes, at, extent) -> None:
        """`at`: where the tensor's first byte is in the file."""
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
                raise self._short()
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
        let_go_of_threads(self._writer, self._reader)
        os.close(self._fd)
        self._write_buffer.close()
        self._read_buffer.close()

    def __repr__(self) -> str:
        mode = "O_DIRECT" if self.direct else "buffered + drop cache"
        return (f"DiskMover({self.location}, {self.filesystem or 'unknown fs'}, {mode}, "
                f"file {format_bytes(self._file_size)}, in use {format_bytes(self.allocator.in_use)})")
