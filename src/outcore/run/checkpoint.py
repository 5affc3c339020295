"""Checkpoints (and any file outcore writes) that are whole or absent: `ooc.save(obj, path)`.

NOTE [Atomic save]
  1. The checkpoint is written to a file with no name (O_TMPFILE) in the directory of
     `path`, flushed and fsync'ed, given a temporary name, and renamed over `path`; the
     directory is fsync'ed last. A crash or Ctrl-C before the rename leaves `path` as
     it was and nothing else (an unnamed file vanishes with its descriptor).
  2. Between the link and the rename (two system calls, held from signals) a kill can
     leave the temporary name `.<name>.outcore-<pid>`; the next save to that directory
     removes such files of dead processes.
  3. Where O_TMPFILE is refused, the file is created under the temporary name at once
     and removed on any exception; a kill then leaves it for rule 2's sweep.
"""
from __future__ import annotations

import ctypes
import errno
import os

import torch

from .interrupts import Shield
from .movers.disk import _NO_TMPFILE, _pid_alive

_TAG = ".outcore-"
_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400
_libc = ctypes.CDLL(None, use_errno=True)


def _link_unnamed(fd: int, target: str) -> None:
    """Give the unnamed file `fd` the name `target`. linkat(2) must follow the
    /proc/self/fd link, which os.link does not ask for (it fails with EXDEV)."""
    if _libc.linkat(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), _AT_FDCWD,
                    os.fsencode(target), _AT_SYMLINK_FOLLOW) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def _temporary(directory: str, name: str, pid: int) -> str:
    return os.path.join(directory, f".{name}{_TAG}{pid}")


def _sweep(directory: str, name: str) -> None:
    """Remove temporary names of this checkpoint left by dead processes (rule 2)."""
    prefix = f".{name}{_TAG}"
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for other in names:
        if not other.startswith(prefix):
            continue
        pid = other[len(prefix):]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue                     # ours, or alive: its save may still be running
        try:
            os.unlink(os.path.join(directory, other))
        except OSError:
            pass


def _cannot_save(path: str, exc: OSError) -> OSError:
    """`exc`, from making or writing the file for `path`, said of `path` (not of outcore's
    unnamed or temporary file) with what to do; the same OSError subclass
    (PermissionError...). `reason`: `exc`'s own words, for a caller whose user gave no
    path (the state_dir's manifest)."""
    error = OSError(exc.errno, f"cannot save to {path}: {exc.strerror or exc}; pass a path "
                    "in a directory you can write to, on a disk with room")
    error.reason = exc.strerror or str(exc)
    return error


def _open_unnamed(directory: str, path: str) -> int | None:
    try:
        return os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o644)
    except OSError as exc:
        if exc.errno in _NO_TMPFILE:
            return None
        raise _cannot_save(path, exc) from None


def atomic_save(obj, path, shield: Shield | None) -> None:
    """torch.save(obj, path) so that `path` is never half-written (NOTE [Atomic save])."""
    atomic_write(path, lambda f: torch.save(obj, f), shield)


def atomic_write_json(path, obj, indent: int | None = None) -> None:
    """Write `obj` as JSON to `path` by `atomic_write`: compact, or indented by `indent`."""
    import json
    separators = (",", ":") if indent is None else None
    data = json.dumps(obj, indent=indent, separators=separators).encode()
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path, write, shield: Shield | None = None) -> None:
    """Call `write(f)` on a binary file that becomes `path` whole, or not at all (NOTE
    [Atomic save]); timelines and reports are written so too."""
    shield = Shield() if shield is None else shield
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            raise NotADirectoryError(errno.ENOTDIR, f"cannot save to {path}: {directory} is a "
                                     "file, not a directory")
        raise FileNotFoundError(errno.ENOENT, f"cannot save to {path}: the directory {directory} "
                                "does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"cannot save to {path}: it is a directory; name "
                                "a file")
    _sweep(directory, name)
    temporary = _temporary(directory, name, os.getpid())
    fd = _open_unnamed(directory, path)
    named = fd is None
    if named:
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:       # name the user's path, not outcore's temporary one
            raise _cannot_save(path, exc) from None
    try:
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                try:
                    write(f)
                except RuntimeError as err:
                    # A Ctrl-C or a write error (a full disk) inside torch.save's zip
                    # writer comes out as the writer's RuntimeError ("unexpected pos"),
                    # the cause only as its context: what happened is the cause, so that
                    # is raised.
                    cause = err.__context__
                    if isinstance(cause, KeyboardInterrupt):
                        raise cause from None
                    if isinstance(cause, OSError):
                        raise cause from err
                    raise
                f.flush()
            os.fsync(fd)
        except OSError as exc:      # a full disk says no file: name the user's path
            raise _cannot_save(path, exc) from exc
        shield.enter()
        try:
            shield.install()
            try:
                if not named:
                    if os.path.lexists(temporary):
                        os.unlink(temporary)      # ours, from a save that failed to link
                    _link_unnamed(fd, temporary)
                    named = True
                os.replace(temporary, path)
                named = False
            finally:
                shield.uninstall()
        finally:
            shield.exit()
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(fd)
        if named:
            try:
                os.unlink(temporary)
            except OSError:
                pass
