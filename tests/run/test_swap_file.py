"""The swap file's construction leaves nothing behind, whatever ends the process: with
O_TMPFILE nothing ever appears in the swap directory; where O_TMPFILE is refused, the
named file and its private directory are gone before anything is written, and what a
kill inside that window leaves is swept by the next construction (and nothing else is).
O_DIRECT is switched on only once the file has no name, and a filesystem refusing it
gets buffered I/O that still round-trips."""
import ctypes
import errno
import fcntl
import importlib.util
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest
import torch

from outcore.errors import OutcoreError
from outcore.run.movers import disk
from outcore.run.movers.disk import DiskMover

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _benchmark():
    """benchmarks/sigkill_construction.py, which is no package."""
    name = "sigkill_construction"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, ROOT / "benchmarks" / "sigkill_construction.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module       # its dataclass looks its module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def refuse_tmpfile(monkeypatch, code: int) -> None:
    """The disk mover's open(O_TMPFILE) fails with `code`; other opens work."""
    real_open = os.open

    def opener(path, flags, mode=0o777, *, dir_fd=None):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(code, os.strerror(code))
        return real_open(path, flags, mode, dir_fd=dir_fd)
    monkeypatch.setattr(disk.os, "open", opener)


@pytest.fixture
def no_tmpfile(monkeypatch):
    """O_TMPFILE refused with EOPNOTSUPP, as on a filesystem without it."""
    refuse_tmpfile(monkeypatch, errno.EOPNOTSUPP)


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """The order of the file system calls construction makes (those on tmp_path, and
    every write, truncate and fcntl)."""
    log = []

    def spy(name, on_path):
        real = getattr(os, name)

        def call(*args, **kwargs):
            if not on_path or str(args[0]).startswith(str(tmp_path)):
                tmpfile = name == "open" and args[1] & os.O_TMPFILE == os.O_TMPFILE
                log.append(("open O_TMPFILE" if tmpfile else name, None))
            return real(*args, **kwargs)
        monkeypatch.setattr(os, name, call)
    for name in ("mkdir", "open", "unlink", "rmdir"):
        spy(name, on_path=True)
    for name in ("pwrite", "ftruncate"):
        spy(name, on_path=False)
    real_fcntl = fcntl.fcntl

    def fcntl_call(fd, cmd, *args):
        log.append(("fcntl", cmd))     # the command, to tell F_SETFL from F_GETFL
        return real_fcntl(fd, cmd, *args)
    monkeypatch.setattr(disk.fcntl, "fcntl", fcntl_call)
    return log


class Creations:
    """Watches a directory with inotify for anything created in or moved into it."""
    IN_CREATE, IN_MOVED_TO = 0x100, 0x80

    def __init__(self, path):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, os.fsencode(path),
                                                 self.IN_CREATE | self.IN_MOVED_TO) < 0:
            pytest.skip("inotify is not available")

    def seen(self) -> bool:
        try:
            return len(os.read(self.fd, 4096)) > 0
        except BlockingIOError:
            return False

    def close(self):
        os.close(self.fd)


def _nbytes(t):
    return t.numel() * t.element_size()


def _round_trip(mover):
    """A small tensor's bytes out to the swap file and back, as the Residency moves them."""
    src = torch.arange(3000, dtype=torch.float64)
    extent = mover.allocate(_nbytes(src))
    mover.write(src.data_ptr(), _nbytes(src), extent, src).result()
    dst = torch.zeros_like(src)
    mover.read(dst.data_ptr(), _nbytes(dst), extent, dst).result()
    assert torch.equal(src, dst)
    mover.free(extent)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_unnamed_file_never_appears(tmp_path, calls):
    watch = Creations(tmp_path)
    try:
        mover = DiskMover(swap_dir=str(tmp_path))
        try:
            st = os.fstat(mover._fd)
            assert st.st_nlink == 0 and st.st_dev == os.stat(tmp_path).st_dev
            assert oct(st.st_mode & 0o777) == oct(0o600)
            names = [name for name, _ in calls]
            assert names[0] == "open O_TMPFILE" and "mkdir" not in names   # no name at all
            for n in (1, 5000, 3 * 2**20):
                src = torch.randint(0, 255, (n,), dtype=torch.uint8)
                extent = mover.allocate(n)
                mover.write(src.data_ptr(), n, extent, src).result()
                dst = torch.zeros_like(src)
                mover.read(dst.data_ptr(), n, extent, dst).result()
                assert torch.equal(src, dst)
            assert list(tmp_path.iterdir()) == []
        finally:
            mover.close()
        assert not watch.seen()                  # not even for a moment
    finally:
        watch.close()
    assert list(tmp_path.iterdir()) == []
    assert (mover.location, mover.filesystem) == (str(tmp_path), disk._filesystem_type(str(tmp_path)))


@pytest.mark.parametrize("direct", [True, False])
def test_fallback_removes_the_name_before_any_write(tmp_path, no_tmpfile, calls, direct):
    mover = DiskMover(swap_dir=str(tmp_path), direct=direct)
    try:
        assert list(tmp_path.iterdir()) == []
        assert os.fstat(mover._fd).st_nlink == 0
        names = [name for name, _ in calls]
        assert names[0] == "open O_TMPFILE"                           # refused, so:
        assert names[1:5] == ["mkdir", "open", "unlink", "rmdir"]     # removed at once...
        if direct:                                                    # ...then probed
            assert names[5:8] == ["fcntl", "fcntl", "pwrite"]         # F_GETFL, F_SETFL
            assert calls[6] == ("fcntl", fcntl.F_SETFL)
        else:
            assert names[5:] == [] and not mover.direct
        _round_trip(mover)
    finally:
        mover.close()
    assert list(tmp_path.iterdir()) == []


def test_fallback_sweeps_dead_leftovers_and_nothing_else(tmp_path, no_tmpfile):
    dead, live = _dead_pid(), os.getppid()
    stale = []
    for tag, swap in (("0123abcd", b""), ("89abcdef", None)):      # a killed fallback's
        d = tmp_path / f"outcore-swap-{dead}-{tag}"
        d.mkdir(mode=0o700)
        if swap is not None:
            (d / "swap").write_bytes(swap)
        stale.append(d)
    old = tmp_path / "outcore-swap-ab_12cd3"                          # an earlier version's
    old.mkdir()
    (old / "swap").write_bytes(b"\0" * 4096)
    old_empty = tmp_path / "outcore-swap-zz9_zz9z"
    old_empty.mkdir()
    two_hours_ago = time.time() - 7200
    for d in (old, old_empty):
        os.utime(d, (two_hours_ago, two_hours_ago))
    stale += [old, old_empty]

    kept = {}
    def keep(path, swap=b"", extra=None, age=None):
        path.mkdir()
        if swap is not None:
            (path / "swap").write_bytes(swap)
        if extra:
            (path / extra).write_text("mine")
        if age:
            os.utime(path, (time.time() - age,) * 2)
        kept[path.name] = sorted(p.name for p in path.iterdir())
    keep(tmp_path / f"outcore-swap-{live}-00000000")                 # a live process's
    keep(tmp_path / f"outcore-swap-{os.getpid()}-11111111")          # our own
    keep(tmp_path / f"outcore-swap-{dead}-22222222", extra="notes")  # holds something else
    keep(tmp_path / f"outcore-swap-{dead}-33333333", swap=b"data")   # written to: not ours
    keep(tmp_path / f"outcore-swap-{dead}-nothex00")                 # another name
    keep(tmp_path / "outcore-swap-recent00", age=60)                 # old style, too recent
    keep(tmp_path / "outcore-swap-big00000", swap=b"\0" * 8192, age=7200)
    keep(tmp_path / "outcore-swap-other000", extra="notes", age=7200)
    keep(tmp_path / f"outcore-swap-{2**22 + 5}-44444444")            # no such pid can be
    target = tmp_path / "elsewhere"
    keep(target)
    (tmp_path / f"outcore-swap-{dead}-55555555").symlink_to(target)  # a symlink: not followed
    (tmp_path / "outcore-swap-notes.txt").write_text("unrelated")
    (tmp_path / "unrelated").mkdir()
    if os.getuid() == 0:                                              # another user's
        other = tmp_path / f"outcore-swap-{dead}-66666666"
        keep(other)
        os.chown(other, 12345, 12345)

    DiskMover(swap_dir=str(tmp_path)).close()

    assert not any(d.exists() for d in stale)
    for name, contents in kept.items():
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == contents, name
    assert (tmp_path / f"outcore-swap-{dead}-55555555").is_symlink()
    assert (tmp_path / "outcore-swap-notes.txt").read_text() == "unrelated"
    assert (tmp_path / "unrelated").is_dir()


def test_concurrent_sweeps_race_silently(tmp_path):
    dead = _dead_pid()
    for i in range(300):
        d = tmp_path / f"outcore-swap-{dead}-{i:08x}"
        d.mkdir()
        if i % 2:
            (d / "swap").touch()
    errors = []

    def sweep():
        try:
            disk._sweep(str(tmp_path))
        except BaseException as exc:             # noqa: BLE001 (reported below)
            errors.append(exc)
    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and list(tmp_path.iterdir()) == []


def test_fallback_survives_its_directory_being_swept_meanwhile(tmp_path, no_tmpfile, monkeypatch):
    """A sweeper that takes the fallback's directory for a dead pid's (another pid
    namespace sharing the swap directory) makes it try another name, not fail."""
    real_mkdir, swept = os.mkdir, []

    def mkdir_then_swept(path, mode=0o777):
        real_mkdir(path, mode)
        if not swept:
            swept.append(path)
            os.rmdir(path)
    monkeypatch.setattr(disk.os, "mkdir", mkdir_then_swept)
    mover = DiskMover(swap_dir=str(tmp_path))
    _round_trip(mover)
    mover.close()
    assert swept and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("refuse", ["probe write", "fcntl"])
@pytest.mark.parametrize("tmpfile", [True, False])
def test_o_direct_refused_falls_back_to_buffered(tmp_path, monkeypatch, request, refuse, tmpfile):
    if not tmpfile:
        request.getfixturevalue("no_tmpfile")
    real_pwrite, real_fcntl = os.pwrite, fcntl.fcntl

    def pwrite(fd, data, offset):
        if real_fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_pwrite(fd, data, offset)

    def no_direct_fcntl(fd, cmd, *args):
        if cmd == fcntl.F_SETFL and args[0] & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_fcntl(fd, cmd, *args)
    if refuse == "probe write":
        monkeypatch.setattr(disk.os, "pwrite", pwrite)
    else:
        monkeypatch.setattr(disk.fcntl, "fcntl", no_direct_fcntl)
    mover = DiskMover(swap_dir=str(tmp_path))
    try:
        assert not mover.direct
        assert not real_fcntl(mover._fd, fcntl.F_GETFL) & os.O_DIRECT
        assert os.fstat(mover._fd).st_size == 0
        for n in (1, 4097, 2**20 + 3):
            src = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32)
            extent = mover.allocate(_nbytes(src))
            mover.write(src.data_ptr(), _nbytes(src), extent, src).result()
            dst = torch.empty_like(src)
            mover.read(dst.data_ptr(), _nbytes(dst), extent, dst).result()
            assert torch.equal(src, dst)
            mover.free(extent)
        assert "buffered" in repr(mover)
    finally:
        mover.close()
    assert list(tmp_path.iterdir()) == []


def test_direct_false_never_sets_o_direct(tmp_path, calls):
    mover = DiskMover(swap_dir=str(tmp_path), direct=False)
    assert not mover.direct and not fcntl.fcntl(mover._fd, fcntl.F_GETFL) & os.O_DIRECT
    assert ("fcntl", fcntl.F_SETFL) not in calls and ("pwrite", None) not in calls
    _round_trip(mover)
    mover.close()


def _open_fds() -> set:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("tmpfile", [True, False])
def test_errors_are_clear_and_leak_nothing(tmp_path, monkeypatch, request, tmpfile):
    if not tmpfile:
        request.getfixturevalue("no_tmpfile")
    real_pwrite = os.pwrite

    def disk_full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(disk.os, "pwrite", disk_full)
    before = _open_fds()
    with pytest.raises(OutcoreError, match="swap file.*No space left"):
        DiskMover(swap_dir=str(tmp_path))
    assert _open_fds() == before and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(disk.os, "pwrite", real_pwrite)
    with pytest.raises(OutcoreError, match="swap directory .* does not exist"):
        DiskMover(swap_dir=str(tmp_path / "missing"))
    (tmp_path / "a file").write_bytes(b"")
    with pytest.raises(OutcoreError, match="swap directory .* is a file, not a directory"):
        DiskMover(swap_dir=str(tmp_path / "a file"))


def test_tmpfile_refused_for_other_reasons_is_reported(tmp_path, monkeypatch):
    """EACCES, EROFS... would fail the named fallback too: reported, not retried."""
    refuse_tmpfile(monkeypatch, errno.EROFS)
    with pytest.raises(OutcoreError, match="cannot create a swap file .*Read-only.*swap_dir="):
        DiskMover(swap_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_tmpfs_still_warns(tmp_path):
    if not os.path.isdir("/dev/shm") or disk._filesystem_type("/dev/shm") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    with pytest.warns(UserWarning, match="tmpfs"):
        mover = DiskMover(swap_dir="/dev/shm")
    assert mover.filesystem == "tmpfs"
    mover.close()


@pytest.mark.parametrize("fallback", [False, True], ids=["tmpfile", "fallback"])
def test_sigkill_during_construction_leaves_nothing(tmp_path, fallback):
    """Workers build and close DiskMovers in a loop over one swap directory and are
    SIGKILLed at random moments. With O_TMPFILE nothing is ever there to leave; in the
    fallback only a kill inside its four system calls leaves a directory, which live
    workers sweep, and the next construction sweeps the last one's."""
    result = _benchmark().kill_during_construction(str(tmp_path), kills=10, fallback=fallback,
                                                   parallel=10, seed=os.getpid())
    if fallback:
        # Only a dead worker's fallback directory, holding at most its empty file.
        for name in result.leftovers:
            match = disk._SWAP_DIR_RE.fullmatch(name)
            assert match and not disk._pid_alive(int(match.group(1))), name
            assert result.contents[name] in ([], ["swap"]), name
    else:
        assert result.leftovers == []
    assert result.after_sweep == [] and list(tmp_path.iterdir()) == []
