"""Child processes for the tests, without paying `import torch` in each.

Many tests run a child (`python -c CODE ARGS`, `-m MODULE ARGS` or a script) to kill
it, interrupt it or resume after it. Each fresh interpreter spends about 3.7 s on this
machine importing torch and outcore, and torch._dynamo when it builds its first
optimizer, and those children were a good part of the suite's time. A *zygote* imports
them once and then only forks: each
child here is a fork of it that runs its code as a fresh interpreter would.

What a child gets, as from `subprocess.Popen([sys.executable, *argv], ...)`:
  1. its own pid (signals, SIGKILL included, reach it alone), its own session if asked
     (`start_new_session`), the caller's cwd and environment;
  2. stdout and stderr as the caller asked (pipes or files), stdin from /dev/null;
  3. `__name__ == "__main__"`, sys.argv as Python sets it, Python's own SIGINT handler;
  4. an exit status as Python's: the code of SystemExit, 1 after an uncaught exception
     (traceback on stderr), death by SIGINT after an uncaught KeyboardInterrupt, the
     negated signal number when a signal killed it; atexit handlers and non-daemon
     threads run at exit as they would.

What it does not get (NOTE [What a fork cannot redo]): whatever the interpreter, glibc or
OpenMP read when the process started. Their environment variables (MALLOC_*, OMP_*,
THP_MEM_ALLOC_ENABLE, LD_*, PYTHON*) are refused in `env`, and a test that measures the
resident set, page sizes or import order must start a real process (`subprocess`).
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

# The zygote itself: import what every child imports first, then fork on request.
SERVER = r"""
import json, os, select, signal, socket, sys, traceback
import torch, outcore
import torch._dynamo        # the first optimizer a process builds imports it (1.8 s here)

ctl = socket.socket(fileno=int(sys.argv[1]))
signal.signal(signal.SIGINT, signal.SIG_IGN)       # a Ctrl-C to pytest is not for the zygote
children = {}                                      # pid -> status socket


def run_child(request, out, err, status):
    # NOTE [What a fork cannot redo]: everything below is what a fresh interpreter sets
    # up after startup; anything read before it (environment of the C libraries) stays
    # the zygote's.
    ctl.close()
    for s in children.values():
        s.close()
    status.close()
    if request["new_session"]:
        os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import io, random
    random.seed()
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=False)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), errors="backslashreplace",
                                  line_buffering=True)
    argv = request["argv"]
    code = 0
    try:
        if argv[0] == "-c":                      # sys.path[0] is "" already, as for -c
            import types
            sys.argv = ["-c", *argv[2:]]
            main = sys.modules["__main__"] = types.ModuleType("__main__")
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)
        elif argv[0] == "-m":                    # runpy sets sys.argv[0] to the module's file
            import runpy
            sys.argv = ["-m", *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            import runpy
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:                                    # sys.exit("message"), as Python does
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        import threading, atexit
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        if code == -signal.SIGINT:            # as Python: die by the signal itself
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code & 0xFF)


def reap():
    while children:
        pid, st = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        s = children.pop(pid, None)
        if s is not None:
            code = -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
            try:
                s.sendall(json.dumps(code).encode())
            except OSError:                    # nobody waits for it any more
                pass
            s.close()


while True:
    ready, _, _ = select.select([ctl], [], [], 0.02)
    reap()
    if not ready:
        continue
    msg, fds, _, _ = socket.recv_fds(ctl, 1 << 18, 3)
    if not msg:
        break                                  # the tests are done
    out, err, status_fd = fds
    status = socket.socket(fileno=status_fd)
    pid = os.fork()
    if pid == 0:
        try:                                   # never back into this loop
            run_child(json.loads(msg), out, err, status)
        finally:
            os._exit(1)
    os.close(out)
    os.close(err)
    children[pid] = status
    ctl.sendall(json.dumps(pid).encode())
"""

# NOTE [What a fork cannot redo]: read by glibc, OpenMP, PyTorch or Python at startup.
STARTUP_VARIABLES = ("MALLOC_", "GLIBC_TUNABLES", "OMP_", "MKL_", "KMP_", "THP_MEM_ALLOC_ENABLE",
                     "LD_", "PYTHON")

_lock = threading.Lock()
_server: tuple[subprocess.Popen, socket.socket] | None = None


def _zygote() -> socket.socket:
    global _server
    if _server is None:
        # SOCK_SEQPACKET: one request is one message, however long its code and environment.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc = subprocess.Popen([sys.executable, "-c", SERVER, str(theirs.fileno())],
                                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        _server = (proc, ours)
        atexit.register(_stop)
    return _server[1]


def _stop() -> None:
    global _server
    if _server is not None:
        proc, ctl = _server
        ctl.close()                      # the zygote reads end-of-file and exits
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        _server = None


class Child:
    """A forked child, with the part of `subprocess.Popen`'s interface the tests use."""

    def __init__(self, argv: list[str], *, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 env: dict | None = None, text: bool = True, start_new_session: bool = False,
                 bufsize: int = -1):
        if argv[0].startswith("-") and argv[0] not in ("-c", "-m"):
            raise ValueError(f"zygote.Child runs `-c CODE ...`, `-m MODULE ...` or a script, "
                             f"not {argv[0]}")
        env = dict(os.environ if env is None else env)
        changed = sorted(k for k in set(env) | set(os.environ)
                         if env.get(k) != os.environ.get(k) and k.startswith(STARTUP_VARIABLES))
        if changed:
            raise ValueError(f"zygote.Child cannot change {', '.join(changed)}: read when a "
                             f"process starts (NOTE [What a fork cannot redo]); use subprocess")
        ends, self.stdout, self.stderr = [], None, None
        for which, how in (("stdout", stdout), ("stderr", stderr)):
            if how == subprocess.PIPE:
                r, w = os.pipe()
                setattr(self, which, open(r, "r" if text else "rb", buffering=1 if text else -1))
                ends.append((w, True))
            else:
                ends.append((how.fileno(), False))
        self._status, theirs = socket.socketpair()
        request = json.dumps({"argv": argv, "env": env, "cwd": os.getcwd(),
                              "new_session": start_new_session}).encode()
        try:
            with _lock:
                ctl = _zygote()
                socket.send_fds(ctl, [request], [ends[0][0], ends[1][0], theirs.fileno()])
                reply = ctl.recv(64)
                if not reply:
                    raise RuntimeError("the tests' zygote process exited (its traceback is on "
                                       "the tests' stderr)")
                self.pid = json.loads(reply)
        finally:
            theirs.close()
            for fd, ours in ends:
                if ours:
                    os.close(fd)
        self.returncode: int | None = None
        self.args = argv

    def poll(self) -> int | None:
        if self.returncode is None:
            self._status.setblocking(False)
            try:
                self._read_status()
            except BlockingIOError:
                pass
        return self.returncode

    def _read_status(self) -> None:
        data = self._status.recv(64)
        if not data:
            raise RuntimeError(f"the zygote exited before child {self.pid} did")
        self.returncode = json.loads(data)
        self._status.close()

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._status.setblocking(True)
            self._status.settimeout(timeout)
            try:
                self._read_status()
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None):
        """Both pipes read to their end (as Popen: on a thread each), then the status. As
        Popen's, it may be called again after TimeoutExpired (it goes on reading)."""
        if not hasattr(self, "_readers"):
            self._found: dict = {}

            def drain(name, f):
                self._found[name] = f.read()
            pipes = (("out", self.stdout), ("err", self.stderr))
            self._readers = [threading.Thread(target=drain, args=(n, f), daemon=True)
                             for n, f in pipes if f is not None]
            for t in self._readers:
                t.start()
        deadline = None if timeout is None else time.monotonic() + timeout

        def left():
            return None if deadline is None else max(0.0, deadline - time.monotonic())
        for t in self._readers:
            t.join(left())
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(left())
        for f in (self.stdout, self.stderr):
            if f is not None:
                f.close()
        return self._found.get("out"), self._found.get("err")


def run(argv: list[str], *, timeout: float | None = None, env: dict | None = None,
        **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, *argv], capture_output=True, text=True, ...)` as a
    forked child: on timeout the child is killed and TimeoutExpired raised."""
    child = Child(argv, env=env, **kwargs)
    try:
        out, err = child.communicate(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        raise
    return subprocess.CompletedProcess([sys.executable, *argv], child.returncode, out, err)
