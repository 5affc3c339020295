"""SIGKILL while the disk mover builds its swap file: does anything stay behind?

Worker processes build and close a DiskMover over a swap directory in a tight loop, and
each is SIGKILLed a random 0-`max_delay` seconds after it says READY, `parallel` of them
running at a time, until `kills` have been killed. Then it counts what is left in the
swap directory, builds one more DiskMover there (which sweeps what killed fallback
constructions left) and counts again.

    .venv/bin/python benchmarks/sigkill_construction.py [N] [--fallback] [--own-dirs]

The workers are forked from one `sys.executable -c` process that imported torch and
outcore first, so a kill never lands in an import and a kill costs a fork, not a 1.6 s
interpreter start; the forker ignores SIGCHLD, so a killed worker is reaped at once (an
unreaped one would still look alive to the sweep). `--fallback` makes every O_TMPFILE open
fail with EOPNOTSUPP in the workers, as on a filesystem without it, so the named fallback
(private directory, removed at once) runs. Workers share one directory by default, so a
live worker sweeps what a killed one left; `--own-dirs` gives each its own, so every kill
that landed inside the fallback's window is counted. Prints one line: "N kills, K
leftovers (S after the next construction)". tests/run/test_swap_file.py runs
`kill_during_construction` with a few kills.
"""
from __future__ import annotations

import argparse
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

FORKER = r"""
import ctypes, errno, os, signal, sys, traceback
import torch  # noqa: F401  (imported before any READY: a kill must not land in the import)
from outcore.run.movers.disk import DiskMover
if sys.argv[1] == "fallback":
    real_open = os.open
    def refuse_tmpfile(path, flags, mode=0o777, *, dir_fd=None):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real_open(path, flags, mode, dir_fd=dir_fd)
    os.open = refuse_tmpfile
signal.signal(signal.SIGCHLD, signal.SIG_IGN)      # workers are reaped as they die
libc = ctypes.CDLL(None, use_errno=True)
forker = os.getpid()
while True:
    where = sys.stdin.readline().strip()            # one line per worker wanted
    if not where:
        break
    if os.fork() == 0:
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            libc.prctl(1, signal.SIGKILL)           # PR_SET_PDEATHSIG: never outlive the forker
            if os.getppid() != forker:
                os._exit(1)
            os.write(1, f"READY {os.getpid()} {where}\n".encode())
            while True:
                DiskMover(swap_dir=where).close()
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(1)
"""


@dataclass
class Result:
    """What was left in the swap directory (or each worker's), one entry per thing left
    at its top (a directory counts once, with what it holds in `contents`)."""
    kills: int
    leftovers: list[str] = field(default_factory=list)     # right after the kills
    after_sweep: list[str] = field(default_factory=list)   # after one more construction
    contents: dict[str, list[str]] = field(default_factory=dict)   # leftover dir -> names

    def summary(self) -> str:
        return (f"{self.kills} kills, {len(self.leftovers)} leftovers "
                f"({len(self.after_sweep)} after the next construction)")


def _contents(path: str, under: str = "", inside: dict | None = None) -> list[str]:
    """The names in `path`, prefixed by `under`; what each directory among them holds
    goes to `inside`."""
    found = []
    for name in sorted(os.listdir(path)):
        found.append(os.path.join(under, name))
        if inside is not None and os.path.isdir(os.path.join(path, name)):
            inside[found[-1]] = sorted(os.listdir(os.path.join(path, name)))
    return found


def _gone(pid: int, timeout: float = 10.0) -> None:
    """Wait until no process `pid` exists (the sweep's own test of a dead pid)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.001)
    raise RuntimeError(f"worker {pid} still exists {timeout} s after SIGKILL")


def kill_during_construction(swap_dir: str, kills: int = 200, *, fallback: bool = False,
                             parallel: int = 10, max_delay: float = 0.3, own_dirs: bool = False,
                             seed: int = 0) -> Result:
    """SIGKILL `kills` workers building DiskMovers over `swap_dir` (see the module
    docstring); raises RuntimeError if a worker dies of anything but the kill."""
    rng = random.Random(seed)
    result = Result(kills)
    dirs = ([os.path.join(swap_dir, f"worker-{i:04d}") for i in range(kills)] if own_dirs
            else [swap_dir] * kills)
    for d in set(dirs):
        os.makedirs(d, exist_ok=True)
    err = tempfile.TemporaryFile()
    forker = subprocess.Popen([sys.executable, "-c", FORKER, "fallback" if fallback else "tmpfile"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    out = forker.stdout.fileno()
    pending: dict[int, tuple[float, int, str]] = {}    # pid -> (kill at, pidfd, swap dir)
    requested = killed = 0
    buffered = b""

    def fail(what):
        forker.kill()
        forker.wait()
        err.seek(0)
        raise RuntimeError(f"{what}:\n{err.read().decode(errors='replace')}")

    try:
        while killed < kills:
            while requested - killed < parallel and requested < kills:
                forker.stdin.write(f"{dirs[requested]}\n".encode())
                forker.stdin.flush()
                requested += 1
            now = time.monotonic()
            wait = max(0.0, min(p[0] for p in pending.values()) - now) if pending else None
            if select.select([out], [], [], wait)[0]:
                chunk = os.read(out, 65536)
                if not chunk:
                    fail("the forker died")
                buffered += chunk
                while b"\n" in buffered:
                    line, buffered = buffered.split(b"\n", 1)
                    _, pid, where = line.decode().split(" ", 2)
                    try:
                        pidfd = os.pidfd_open(int(pid))
                    except ProcessLookupError:
                        fail(f"worker {pid} died before it was killed")
                    pending[int(pid)] = (time.monotonic() + rng.uniform(0, max_delay), pidfd, where)
            now = time.monotonic()
            for pid, (at, pidfd, where) in sorted(pending.items(), key=lambda p: p[1][0]):
                if at > now:
                    break
                del pending[pid]
                if select.select([pidfd], [], [], 0)[0]:
                    fail(f"worker {pid} died before it was killed")
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                select.select([pidfd], [], [], 10)
                os.close(pidfd)
                _gone(pid)
                killed += 1
                if own_dirs:
                    result.leftovers += _contents(where, os.path.basename(where), result.contents)
    finally:
        for pid, (_, pidfd, _) in pending.items():
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
        forker.stdin.close()
        forker.wait()
        forker.stdout.close()
        err.close()

    from outcore.run.movers.disk import DiskMover
    if not own_dirs:
        result.leftovers = _contents(swap_dir, inside=result.contents)
    for d in sorted(set(dirs)):
        DiskMover(swap_dir=d).close()                  # sweeps what dead workers left
        if own_dirs:
            result.after_sweep += _contents(d, os.path.basename(d))
            if not os.listdir(d):
                os.rmdir(d)
    if not own_dirs:
        result.after_sweep = _contents(swap_dir)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kills", nargs="?", type=int, default=200)
    parser.add_argument("--fallback", action="store_true",
                        help="refuse O_TMPFILE in the workers (the named fallback)")
    parser.add_argument("--own-dirs", action="store_true",
                        help="one swap directory per worker (count every kill's leftovers)")
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--max-delay", type=float, default=0.3)
    parser.add_argument("--dir", help="where to make the swap directory (default: the temp "
                        "directory)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sigkill-construction-", dir=args.dir) as where:
        result = kill_during_construction(where, args.kills, fallback=args.fallback,
                                          parallel=args.parallel, max_delay=args.max_delay,
                                          own_dirs=args.own_dirs, seed=args.seed)
    shown = result.leftovers[:4] + (["..."] if len(result.leftovers) > 4 else [])
    print(result.summary() + (f": {', '.join(shown)}" if shown else ""))


if __name__ == "__main__":
    main()
