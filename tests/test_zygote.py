"""tests/zygote.py's children behave as `subprocess` children of a fresh Python would, in
everything the tests that use them look at (its docstring, points 1-4)."""
from __future__ import annotations

import os
import signal
import subprocess
import textwrap

import pytest

from . import zygote


@pytest.mark.parametrize("code, rc, out, err", [
    ("import sys; print(sys.argv[1:]); sys.exit(3)", 3, "['a', 'b']\n", ""),
    ("import sys; sys.exit('no')", 1, "", "no\n"),
    ("raise ValueError('boom')", 1, "", "ValueError: boom\n"),
    ("raise KeyboardInterrupt", -signal.SIGINT, "", "KeyboardInterrupt\n"),
    ("print(__name__)", 0, "__main__\n", ""),
    (textwrap.dedent("""
        import atexit, threading, time
        atexit.register(lambda: print("atexit"))
        threading.Thread(target=lambda: (time.sleep(0.2), print("thread"))).start()
     """), 0, "thread\natexit\n", ""),
])
def test_exit_status_and_output_as_python_gives_them(code, rc, out, err):
    done = zygote.run(["-c", code, "a", "b"], timeout=60)
    assert (done.returncode, done.stdout) == (rc, out), done.stderr
    assert done.stderr.endswith(err)


def test_signals_reach_the_child_alone(tmp_path):
    child = zygote.Child(["-c", textwrap.dedent("""
        import os, time
        try:
            print(os.getpid(), os.getsid(0), flush=True)
            time.sleep(60)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            time.sleep(60)
    """)], start_new_session=True)
    pid, sid = map(int, child.stdout.readline().split())
    assert pid == child.pid == sid != os.getpid()
    child.send_signal(signal.SIGINT)
    assert child.stdout.readline() == "interrupted\n"
    child.kill()
    assert child.wait(10) == -signal.SIGKILL


def test_cwd_environment_and_a_script(tmp_path, monkeypatch):
    script = tmp_path / "s.py"
    script.write_text("import os, sys\n"
                      "print(os.getcwd(), os.environ['OUTCORE_ZYGOTE_TEST'], sys.path[0],"
                      " sys.argv[1])")
    monkeypatch.chdir(tmp_path)
    done = zygote.run([str(script), "x"], env=dict(os.environ, OUTCORE_ZYGOTE_TEST="42"),
                      timeout=60)
    assert done.stdout.split() == [str(tmp_path), "42", str(tmp_path), "x"], done.stderr


def test_a_timeout_kills_the_child(tmp_path):
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    with pytest.raises(subprocess.TimeoutExpired):
        zygote.run(["-c", code], timeout=2)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):        # killed and reaped: no such process
        os.kill(pid, 0)


def test_variables_read_at_startup_are_refused():
    with pytest.raises(ValueError, match="OMP_NUM_THREADS.*use subprocess"):
        zygote.Child(["-c", "pass"], env=dict(os.environ, OMP_NUM_THREADS="1"))
