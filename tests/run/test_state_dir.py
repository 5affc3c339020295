"""`OutOfCore(..., state_dir=...)` (NOTE [Durable state]): a process killed at any
moment resumes from its last completed iteration and ends bitwise equal to plain
PyTorch trained without interruption."""
from __future__ import annotations

import contextlib
import copy
import os
import random
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import outcore
from outcore.errors import OutcoreError
from outcore.states import MAPPED

from .. import zygote


def _linear4():
    """Four Linear layers and Adam, the same each call."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


_X = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))


def _step(model, opt):
    model(_X).sum().backward()
    opt.step()
    opt.zero_grad()

TOTAL = 10

CHILD = textwrap.dedent("""
    import hashlib, os, signal, sys, threading
    import torch, outcore
    import outcore.run.checkpoint as checkpoint
    directory, total, kill = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    # One thread: the digests of separate processes are compared, and on two plain
    # PyTorch now and then differs from itself (docs/executor.md; a clean-clone run
    # saw the plain child's digest differ from the uninterrupted one's, 2026-12-06).
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Dropout(0.1),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    commits = {"n": 0}
    def at_commit(n, what):
        commits["n"] += 1
        if commits["n"] == n:
            what()

    if kill.startswith("after:"):                  # a moment in seconds
        threading.Timer(float(kill[6:]), die).start()
    elif kill == "mid-pickle":                     # half of the manifest written, then killed
        save = torch.save
        def partial(obj, f):
            def half():
                import io
                buf = io.BytesIO(); save(obj, buf)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush(); die()
            if "format" in obj:
                at_commit(3, half)
            save(obj, f)
        checkpoint.torch.save = partial
    elif kill == "before-rename":
        replace = os.replace
        def replace_then(a, b):
            if b.endswith("manifest.pt"):
                at_commit(3, die)
            replace(a, b)
        checkpoint.os.replace = replace_then
    elif kill == "after-link":
        link = checkpoint._link_unnamed
        def link_then(fd, target):
            link(fd, target)
            at_commit(3, die)
        checkpoint._link_unnamed = link_then

    ooc = outcore.OutOfCore("1200KiB", state_dir=directory) if directory != "-" else None
    start = ooc.resume(model, opt) if ooc else 0
    for it in range(start, total):
        g = torch.Generator().manual_seed(it)
        x, y = torch.randn(32, 256, generator=g), torch.randn(32, 256, generator=g)
        if ooc:
            with ooc.iteration():
                loss = (model(x) - y).square().mean(); loss.backward(); opt.step(); opt.zero_grad()
        else:
            loss = (model(x) - y).square().mean(); loss.backward(); opt.step(); opt.zero_grad()
    h = hashlib.sha256()
    for v in model.state_dict().values():
        h.update(v.numpy().tobytes())
    for s in opt.state.values():
        for v in s.values():
            h.update(v.numpy().tobytes())
    print(start, h.hexdigest())
""")


def run(directory, kill="none", total=TOTAL):
    return zygote.run(["-c", CHILD, str(directory), str(total), kill], timeout=300)


def finished(out):
    """(iteration resumed from, digest) of a run to the end (resuming from its directory,
    or plain PyTorch for "-")."""
    assert out.returncode == 0, out.stderr
    start, digest = out.stdout.split()
    return int(start), digest


KILLS = ["mid-pickle", "before-rename", "after-link"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every child process of the tests below, in order within each test, two tests at a
    time; each child is a fork of one process that imported torch (tests/zygote.py).
    Each test has its own state directory: {test: (directory, [its runs])}."""
    root = tmp_path_factory.mktemp("state")

    def random_kills(directory):
        rng = random.Random(11)
        outs = []
        for _ in range(4):
            outs.append(run(directory, f"after:{rng.uniform(0.2, 1.6):.2f}"))
            if outs[-1].returncode != -9:     # finished before the moment came, or failed
                break
        return outs + [run(directory)]

    chains = {"random": random_kills,
              "plain": lambda directory: [run("-")],
              "uninterrupted": lambda directory: [run(directory), run(directory)]}
    for kill in KILLS:
        chains[kill] = lambda directory, kill=kill: [run(directory, kill), run(directory)]
    for name in chains:
        (root / name).mkdir()             # as tmp_path: the state directory itself is new
    with ThreadPoolExecutor(2) as pool:
        futures = {name: (root / name / "s", pool.submit(chain, root / name / "s"))
                   for name, chain in chains.items()}
        return {name: (directory, f.result()) for name, (directory, f) in futures.items()}


@pytest.fixture(scope="module")
def plain_digest(runs):
    return finished(runs["plain"][1][0])[1]


def assert_tidy(directory):
    names = sorted(os.listdir(directory))
    assert names[0] == "manifest.pt" and len(names) == 2 and names[1].endswith(".swap"), names


def test_uninterrupted_run_is_plain_pytorch(runs, plain_digest):
    directory, (first, again) = runs["uninterrupted"]
    assert finished(first) == (0, plain_digest)
    assert finished(again) == (TOTAL, plain_digest)     # nothing left to do
    assert_tidy(directory)


def test_killed_at_random_moments_resumes_bitwise(runs, plain_digest):
    directory, (*attempts, last) = runs["random"]
    kills = 0
    for out in attempts:
        if out.returncode == 0:           # finished before the moment came
            break
        assert out.returncode == -9, out.stderr
        kills += 1
    assert kills >= 1
    start, digest = finished(last)
    assert digest == plain_digest
    assert_tidy(directory)


@pytest.mark.parametrize("kill", KILLS)
def test_killed_while_switching_the_manifest(runs, plain_digest, kill):
    """Killed in the third commit: the manifest of the second iteration holds."""
    directory, (out, last) = runs[kill]
    assert out.returncode == -9, out.stderr
    start, digest = finished(last)
    assert start == 2 and digest == plain_digest
    assert_tidy(directory)          # a temporary name left by "after-link" is swept


def test_bad_uses_are_refused(tmp_path):
    model = torch.nn.Linear(256, 256)
    with outcore.OutOfCore("1MiB") as ooc:
        with pytest.raises(OutcoreError, match="needs OutOfCore"):
            ooc.resume(model)
    with outcore.OutOfCore("1MiB", state_dir=tmp_path / "s") as ooc:
        with pytest.raises(OutcoreError, match="call ooc.resume"):
            with ooc.iteration():
                model(torch.ones(2, 256)).sum().backward()
        assert ooc.resume(model) == 0
        with ooc.iteration():
            model(torch.ones(2, 256)).sum().backward()
        with pytest.raises(OutcoreError, match="once, before the first iteration"):
            ooc.resume(model)
    other = torch.nn.Linear(256, 128)
    with outcore.OutOfCore("1MiB", state_dir=tmp_path / "s") as ooc:
        with pytest.raises(OutcoreError, match=r"holds weight as \(256, 256\)"):
            ooc.resume(other)
    with outcore.OutOfCore("1MiB", state_dir=tmp_path / "s") as ooc:
        with pytest.raises(OutcoreError, match="does not match this model"):
            ooc.resume(torch.nn.Sequential(model))
    with outcore.OutOfCore("1MiB", state_dir=tmp_path / "s") as ooc:
        with pytest.raises(OutcoreError, match="in use by another OutOfCore"):
            from outcore.run.durable import Durable
            Durable(tmp_path / "s")
        assert ooc.resume(model) == 1
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "manifest.pt").write_bytes(b"not a manifest")
    with pytest.raises(OutcoreError, match="cannot be read"):
        outcore.OutOfCore("1MiB", state_dir=tmp_path / "t")
    (tmp_path / "f").write_bytes(b"")          # makedirs said only "File exists"
    for path in (tmp_path / "f", tmp_path / "f" / "sub" / "dir"):
        with pytest.raises(OutcoreError, match=f"{tmp_path / 'f'} is a file, not a directory"):
            outcore.OutOfCore("1MiB", state_dir=path)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")      # helper-155
    with pytest.raises(OutcoreError, match="dangling is a link to .*nowhere, which does not"):
        outcore.OutOfCore("1MiB", state_dir=tmp_path / "dangling")


def test_a_live_model_resumed_keeps_no_gradient_the_commit_did_not(tmp_path):
    """helper-154, a notebook: an iteration stopped after its backward (Ctrl-C), then the
    cell run again: close, a new OutOfCore, resume(model, opt) on the same live objects.
    The commit held no gradients (zero_grad after step), yet resume left the stopped
    iteration's on every parameter, and the next backward added to them."""
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, 10))
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss(model, i):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(32, 256, generator=g), torch.randint(0, 10, (32,), generator=g)
        return torch.nn.functional.cross_entropy(model(x), y)

    def step(model, opt, i):
        loss(model, i).backward()
        opt.step()
        opt.zero_grad()
    model, opt = make()
    with outcore.OutOfCore("4MiB", state_dir=tmp_path) as ooc:
        ooc.resume(model, opt)
        for i in range(3):
            with ooc.iteration():
                step(model, opt, i)
        with pytest.raises(KeyboardInterrupt):
            with ooc.iteration():
                loss(model, 3).backward()
                raise KeyboardInterrupt
    assert all(p.grad is not None for p in model.parameters())
    with outcore.OutOfCore("4MiB", state_dir=tmp_path) as ooc:
        assert ooc.resume(model, opt) == 3
        assert all(p.grad is None for p in model.parameters())
        for i in range(3, 6):
            with ooc.iteration():
                step(model, opt, i)
    plain, plain_opt = make()
    for i in range(6):
        step(plain, plain_opt, i)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters()))


def _two_adam_iterations(model, state_dir):
    """Train `model` (on 256 features) two iterations with Adam under a state_dir; the
    optimizer."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with outcore.OutOfCore("1MiB", state_dir=state_dir) as ooc:
        ooc.resume(model, opt)
        for _ in range(2):
            with ooc.iteration():
                model(torch.ones(2, 256)).sum().backward()
                opt.step()
                opt.zero_grad()
    return opt


def test_resume_refuses_another_optimizer_before_changing_anything(tmp_path):
    """State kept with Adam: resume() without an optimizer (the next commit would drop
    Adam's moments for good) or into another class (torch failed later, in step(), with
    a KeyError) is refused before any tensor is copied, and the directory still resumes
    with Adam."""
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    opt = _two_adam_iterations(model, tmp_path)
    kept = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fresh = torch.nn.Linear(256, 256)
    before = {k: v.detach().clone() for k, v in fresh.state_dict().items()}
    for other, match in ((None, "kept with an optimizer, and resume.. got none"),
                         (torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9),
                          r"kept by a torch.optim.adam.Adam, and resume.. got a "
                          r"torch.optim.sgd.SGD"),
                         # Adamax's hyper-parameters are a subset of Adam's: accepted
                         # before, then its step() raised KeyError 'exp_inf'
                         (torch.optim.Adamax(fresh.parameters()), "got a torch.optim.adamax"),
                         # The same class over other parameter groups: torch's own
                         # load_state_dict refused it, after the model had been copied.
                         (torch.optim.Adam([fresh.weight]), r"groups of \[2\] parameters, "
                          r"and resume.. got one with \[1\]"),
                         (torch.optim.Adam([{"params": [fresh.weight]}, {"params": [fresh.bias]}]),
                          r"got one with \[1, 1\]")):
        with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
            with pytest.raises(OutcoreError, match=match):
                ooc.resume(fresh, other)
        assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    adam = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        assert ooc.resume(fresh, adam) == 2
        assert all(torch.equal(v, kept[k]) for k, v in fresh.state_dict().items())
        assert torch.equal(adam.state[fresh.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])


def test_a_state_dir_that_cannot_be_changed_is_a_clear_error(tmp_path, monkeypatch):
    """A state_dir on a filesystem mounted read-only since (seen by a new user): the
    leftover of an earlier run could not be removed, and the OSError came out bare."""
    import errno
    torch.manual_seed(0)
    _two_adam_iterations(torch.nn.Linear(256, 256), tmp_path)
    (tmp_path / "state-9.swap").write_bytes(b"")        # a file no manifest names
    before = sorted(p.name for p in tmp_path.iterdir())

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    monkeypatch.setattr(os, "unlink", read_only)
    with pytest.raises(OutcoreError, match=r"cannot use state_dir=.*Read-only file system "
                                           r"\(.*state-9.swap\); pass a writable directory"):
        outcore.OutOfCore("1MiB", state_dir=tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    model = torch.nn.Linear(256, 256)
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:     # and the lock was let go
        assert ooc.resume(model, torch.optim.Adam(model.parameters())) == 2


def test_a_read_only_state_dir_is_a_clear_error(tmp_path, monkeypatch):
    """helper-154: on a read-only filesystem the state file cannot be made, and giving
    back what was taken unlinked the file that was never made: EROFS, not ENOENT, came
    out as a bare OSError in place of the error that says what to do."""
    import errno
    real_open = os.open

    def read_only_open(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, *args)

    def read_only_unlink(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    monkeypatch.setattr(os, "open", read_only_open)
    monkeypatch.setattr(os, "unlink", read_only_unlink)
    with pytest.raises(OutcoreError, match="cannot create the state file .*Read-only file "
                                           "system; pass state_dir= a writable") as err:
        outcore.OutOfCore("1MiB", state_dir=tmp_path)
    assert not getattr(err.value, "__notes__", None)
    monkeypatch.undo()
    outcore.OutOfCore("1MiB", state_dir=tmp_path).close()
    assert list(tmp_path.iterdir()) == []


def test_a_full_state_dir_disk_says_so_and_resume_can_be_tried_again(tmp_path, monkeypatch):
    """The state directory's disk full: at construction (the probe write of the new state
    file) and while resume() copies the kept state into the new file. Both errors are
    SwapSpaceExhausted naming state_dir, not swap_dir; the kept state is untouched, no new
    file is left, and resume() on the same OutOfCore succeeds once there is room."""
    import errno
    from outcore.errors import SwapSpaceExhausted
    from outcore.run.movers import disk

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(8, 256)

    def step():
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()

    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        ooc.resume(model, opt)
        for _ in range(2):
            with ooc.iteration():
                step()
    kept = sorted(os.listdir(tmp_path))

    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_probe = disk._enable_direct
    monkeypatch.setattr(disk, "_enable_direct", full)
    with pytest.raises(SwapSpaceExhausted, match="cannot write the state file .* pass state_dir="):
        outcore.OutOfCore("1MiB", state_dir=tmp_path)
    assert sorted(os.listdir(tmp_path)) == kept
    monkeypatch.setattr(disk, "_enable_direct", real_probe)

    torch.manual_seed(1)
    fresh = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    opt2 = torch.optim.SGD(fresh.parameters(), lr=1e-3, momentum=0.9)
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        monkeypatch.setattr(disk.os, "posix_fallocate", full)
        with pytest.raises(SwapSpaceExhausted, match="pass state_dir=") as caught:
            ooc.resume(fresh, opt2)
        assert "needs room for both" in "".join(caught.value.__notes__)
        monkeypatch.undo()
        assert sorted(os.listdir(tmp_path))[:2] == kept
        assert ooc.resume(fresh, opt2) == 2
        # The disk full while iteration 3's state is made durable: the iteration itself
        # completed, the directory still holds iteration 2, and iteration 4 commits as 4.
        from outcore.run.durable import Durable
        real_commit = Durable.commit

        def commit_on_a_full_disk(self, res, shield, iterations):
            def allocate(nbytes):
                raise SwapSpaceExhausted("swap space is exhausted (injected)")
            monkeypatch.setattr(res.mover, "allocate", allocate)
            try:
                real_commit(self, res, shield, iterations)
            finally:
                monkeypatch.undo()      # both patches: only this commit fails

        for it in (3, 4):
            if it == 3:
                monkeypatch.setattr(Durable, "commit", commit_on_a_full_disk)
                with pytest.raises(SwapSpaceExhausted,
                                   match=r"could not be made durable.* that of 2 completed "
                                         r"iterations \(resume\(\) there returns 2\)"):
                    with ooc.iteration():
                        fresh(x).sum().backward()
                        opt2.step()
                        opt2.zero_grad()
            else:
                with ooc.iteration():
                    fresh(x).sum().backward()
                    opt2.step()
                    opt2.zero_grad()
    for _ in range(2):
        step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 fresh.state_dict().values()))
    assert_tidy(tmp_path)
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        assert ooc.resume(fresh, opt2) == 4


def test_a_full_disk_while_the_manifest_is_written_names_no_path_of_the_users(tmp_path,
                                                                               monkeypatch):
    """helper-163: a full disk while the manifest was written said "pass a path in a
    directory you can write to", the advice for a path the user gave (ooc.save, a
    picture): the manifest is outcore's own, in state_dir."""
    import errno

    from outcore.run import checkpoint, durable

    def full(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    model, opt = _linear4()
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        ooc.resume(model, opt)
        with ooc.iteration():
            _step(model, opt)
        monkeypatch.setattr(durable, "atomic_save", lambda obj, path, shield:
                            checkpoint.atomic_write(path, full, shield))
        with pytest.raises(outcore.SwapSpaceExhausted, match=f"could not be made durable in "
                                                     f"{tmp_path}: No space left on device. "
                                                     "Nothing in memory was lost") as caught:
            with ooc.iteration():
                _step(model, opt)
        assert "pass a path" not in str(caught.value)


def test_close_after_a_failed_last_commit_says_the_state_dir_is_behind(tmp_path, monkeypatch,
                                                                      caplog):
    """helper-166: the last iteration's commit failed ("the next iteration tries again"),
    and there was none: close() said nothing and the state_dir stayed one iteration
    behind. It says so now, and what resume() returns. It does not commit there
    (helper-167: the model may have changed since the iteration, and a commit at close
    made durable a state no iteration had)."""
    import logging

    from outcore.run.durable import Durable
    real_commit = Durable.commit
    failing = [False]

    def commit(self, res, shield, iterations):
        if failing[0]:
            raise outcore.SwapSpaceExhausted("swap space is exhausted (injected)")
        real_commit(self, res, shield, iterations)
    monkeypatch.setattr(Durable, "commit", commit)
    model, opt = _linear4()
    ooc = outcore.OutOfCore("1MiB", state_dir=tmp_path)
    ooc.resume(model, opt)
    for it in range(3):
        failing[0] = it == 2
        with contextlib.suppress(outcore.SwapSpaceExhausted):
            with ooc.iteration():
                _step(model, opt)
    failing[0] = False
    with torch.no_grad():
        model[0].weight.fill_(7.0)            # changed after the iteration: never durable
    with caplog.at_level(logging.WARNING, logger="outcore"):
        ooc.close()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("close():")]
    assert len(said) == 1 and (f"{tmp_path} holds the state of 2 of the 3 completed "
                               "iterations" in said[0]), said
    assert "(resume() there returns 2): a commit failed" in said[0]
    fresh, fresh_opt = _linear4()
    plain, plain_opt = _linear4()
    for _ in range(2):
        _step(plain, plain_opt)
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as again:
        assert again.resume(fresh, fresh_opt) == 2
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 fresh.state_dict().values()))


def test_a_script_that_never_closes_is_told_at_exit_that_the_state_dir_is_behind(tmp_path):
    """helper-167: without close() (the finalizer releases the OutOfCore) nothing said the
    state_dir was an iteration behind after the last commit failed. An atexit hook says
    it now; after close() it says nothing (close() did)."""
    import subprocess
    import sys
    script = textwrap.dedent("""
        import sys, torch, outcore
        from outcore.run.durable import Durable
        real, calls = Durable.commit, [0]
        def commit(self, res, shield, iterations):
            calls[0] += 1
            if calls[0] == 3:
                raise outcore.SwapSpaceExhausted("swap space is exhausted (injected)")
            real(self, res, shield, iterations)
        Durable.commit = commit
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.randn(8, 256)
        ooc = outcore.OutOfCore("1MiB", state_dir=sys.argv[1])
        ooc.resume(model, opt)
        for _ in range(3):
            try:
                with ooc.iteration():
                    model(x).sum().backward(); opt.step(); opt.zero_grad()
            except outcore.SwapSpaceExhausted:
                pass
        if sys.argv[2] == "close":
            ooc.close()
        """)
    said = {}
    for how in ("never", "close"):
        run = subprocess.run([sys.executable, "-c", script, str(tmp_path / how), how],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        said[how] = [line for line in run.stderr.splitlines() if "a commit failed" in line]
    assert len(said["never"]) == 1, said
    assert said["never"][0].startswith("at exit (the OutOfCore was never closed): "), said
    assert "holds the state of 2 of the 3 completed iterations" in said["never"][0], said
    assert len(said["close"]) == 1 and said["close"][0].startswith("close(): "), said


def test_a_commit_that_fails_after_its_manifest_is_in_place_resumes_bitwise(tmp_path, monkeypatch):
    """The directory's fsync fails after the rename in iteration 4's commit: that manifest
    is in place, so the next iteration must not write over the extents it names. They were
    overwritten, and a resume after iteration 5 failed to commit matched no step."""
    import errno
    from outcore.run import checkpoint
    from outcore.run.durable import Durable

    plain = _linear4()
    for _ in range(4):
        _step(*plain)
    real_fsync, calls = os.fsync, []

    def directory_fsync_fails(fd):
        calls.append(fd)
        if len(calls) == 2:               # the manifest's, then the directory's
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)

    def killed_before_commit(*_):         # as if killed before iteration 5's commit
        raise OSError(errno.EIO, "killed (injected)")

    model, opt = _linear4()
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        ooc.resume(model, opt)
        for it in range(1, 6):
            if it == 4:
                monkeypatch.setattr(checkpoint.os, "fsync", directory_fsync_fails)
            if it == 5:
                monkeypatch.setattr(Durable, "commit", killed_before_commit)
            if it < 4:
                with ooc.iteration():
                    _step(model, opt)
                continue
            match = ("manifest is in place all the same" if it == 4
                     else "still that of 4 completed iterations")
            with pytest.raises(OutcoreError, match=match):
                with ooc.iteration():
                    _step(model, opt)
            if it == 4:
                monkeypatch.undo()
        monkeypatch.undo()
    fresh, fresh_opt = _linear4()
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as again:
        assert again.resume(fresh, fresh_opt) == 4
    assert all(torch.equal(a, b) for a, b in zip(plain[0].state_dict().values(),
                                                 fresh.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(plain[1].state[plain[0][0].weight].values(),
                                                 fresh_opt.state[fresh[0].weight].values()))


def test_after_a_failed_fdatasync_no_later_commit_trusts_the_file(tmp_path, monkeypatch):
    """NOTE [Durable state] rule 6: the state file's fdatasync fails in iteration 3's commit.
    The kernel may have dropped the pages it could not write, so iteration 4's commit,
    whose own sync succeeds, must not name them: the last durable state stays iteration
    2's, and a resume from it goes on bitwise."""
    import errno
    from outcore.run.movers.disk import DiskMover

    plain = _linear4()
    for _ in range(2):
        _step(*plain)
    real_sync = DiskMover.sync

    def sync_fails(self):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    model, opt = _linear4()
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        ooc.resume(model, opt)
        for it in range(1, 5):
            monkeypatch.setattr(DiskMover, "sync", sync_fails if it == 3 else real_sync)
            if it < 3:
                with ooc.iteration():
                    _step(model, opt)
                continue
            match = ("Input/output error.*still that of 2 completed iterations .*; no later "
                     "iteration"
                     if it == 3 else "an earlier fdatasync of the state file .* failed")
            with pytest.raises(OutcoreError, match=match):
                with ooc.iteration():
                    _step(model, opt)
    fresh, fresh_opt = _linear4()
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as again:
        assert again.resume(fresh, fresh_opt) == 2
        assert all(torch.equal(a, b) for a, b in zip(plain[0].state_dict().values(),
                                                     fresh.state_dict().values()))
        for _ in range(2):
            _step(*plain)
            with again.iteration():
                _step(fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(plain[0].state_dict().values(),
                                                 fresh.state_dict().values()))
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as third:
        assert third.resume(*_linear4()) == 4


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_state_file_removed_while_training_is_never_committed_to(tmp_path, how, caplog):
    """NOTE [Durable state] rule 12 (helper-203: a clean-up script removed state-0.swap
    between iterations; four more iterations "committed" with no word, close() said
    nothing, and resume() failed). Each commit after it raises, naming the file and
    that no durable state is left; training goes on in memory, bitwise."""
    import logging
    plain = _linear4()
    model, opt = _linear4()
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        ooc.resume(model, opt)
        for _ in range(2):
            _step(*plain)
            with ooc.iteration():
                _step(model, opt)
        (swap,) = [n for n in os.listdir(tmp_path) if n.endswith(".swap")]
        os.remove(tmp_path / swap)
        if how == "replaced":
            (tmp_path / swap).write_bytes(b"\0" * 4096)
        for _ in range(2):
            _step(*plain)
            with pytest.raises(OutcoreError) as info:
                with ooc.iteration():
                    _step(model, opt)
            said = str(info.value)
            assert f"the state file {tmp_path / swap} was removed or replaced" in said, said
            assert "NOTE [Durable state] rule 12" in said, said
            assert (f"{swap}, which the manifest names, was removed or replaced: no durable "
                    "state is left there") in said, said
            assert "resume from the last durable state" not in said, said
        assert all(torch.equal(a, b) for a, b in zip(plain[0].state_dict().values(),
                                                     model.state_dict().values()))
        with caplog.at_level(logging.WARNING, logger="outcore"):
            ooc.close()
        said = [r.getMessage() for r in caplog.records]
        assert any(f"holds no durable state: {swap}, which the manifest names, was removed"
                   in m for m in said), said


def test_every_state_file_removed_before_a_resumed_run_commits_leaves_none(tmp_path):
    """helper-205: a resumed run, before its first commit, has its new file open and the
    manifest naming the kept one; a clean-up of *.swap removes both, and the error said
    the last durable state was still there ("resume() there returns 2")."""
    model, opt = _linear4()
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        ooc.resume(model, opt)
        for _ in range(2):
            with ooc.iteration():
                _step(model, opt)
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        assert ooc.resume(model, opt) == 2
        for name in os.listdir(tmp_path):
            if name.endswith(".swap"):
                os.remove(tmp_path / name)
        with pytest.raises(OutcoreError) as info:
            with ooc.iteration():
                _step(model, opt)
    said = str(info.value)
    assert ("state-0.swap, which the manifest names, is gone: no durable state is left there"
            in said), said
    assert "resume() there returns" not in said, said


def test_a_damaged_state_file_is_a_clear_error_that_says_what_was_loaded(tmp_path):
    """A state file the manifest names gone: a clear error (it was a bare
    FileNotFoundError). Cut short: the error says the model is only partly loaded (the
    parameters before the cut were overwritten already)."""
    import shutil
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    with outcore.OutOfCore("1MiB", state_dir=tmp_path / "s") as ooc:
        ooc.resume(model)
        with ooc.iteration():
            model(torch.ones(2, 256)).sum().backward()
    shutil.copytree(tmp_path / "s", tmp_path / "cut")
    (swap,) = [n for n in os.listdir(tmp_path / "s") if n.endswith(".swap")]
    os.unlink(tmp_path / "s" / swap)
    fresh = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    with outcore.OutOfCore("1MiB", state_dir=tmp_path / "s") as ooc:
        with pytest.raises(OutcoreError, match="cannot read .* which the manifest names") as err:
            ooc.resume(fresh)
        assert not getattr(err.value, "__notes__", None)     # nothing was copied
    kept = torch.load(tmp_path / "cut" / "manifest.pt", weights_only=True)["model"]
    last = max(kept.values(), key=lambda ref: ref["offset"])
    os.truncate(tmp_path / "cut" / swap, last["offset"] + 1)
    with outcore.OutOfCore("1MiB", state_dir=tmp_path / "cut") as ooc:
        with pytest.raises(OutcoreError, match="damaged") as err:
            ooc.resume(fresh)
        assert "only partly loaded" in "".join(err.value.__notes__)


def test_a_manifest_naming_no_dtype_is_a_clear_error(tmp_path):
    """A manifest whose dtype names no torch dtype (damaged, or written by another
    program) was a bare AttributeError from `getattr(torch, ...)`."""
    def made():
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
        return model, torch.optim.Adam(model.parameters())
    model, opt = made()
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        ooc.resume(model, opt)
        with ooc.iteration():
            model(torch.ones(2, 256)).sum().backward()
            opt.step()
            opt.zero_grad()
    manifest = torch.load(tmp_path / "manifest.pt", weights_only=True)
    manifest["optimizer"]["state"][0]["exp_avg"]["dtype"] = "torch.float99"
    torch.save(manifest, tmp_path / "manifest.pt")
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        with pytest.raises(OutcoreError, match="'torch.float99', which is no torch dtype"):
            ooc.resume(*made())


@pytest.mark.parametrize("grown", [False, True])
def test_a_state_file_truncated_between_iterations_is_an_error_not_a_crash(tmp_path, grown):
    """helper-133: something else truncated the state_dir's swap file between
    iterations. Each read was tried three times, the error said the bytes were still
    whole, and the tensors were then mapped past the file's end: the first read of the
    model was a SIGBUS. Now the error says the bytes are lost, the tensors hold 0xFF
    bytes (NaN), and the process reads them and closes (a child: a crash must not take
    pytest with it). `grown`: the file is grown again past the cut before anything
    reads (as an eviction needing a new extent does): the cut is a hole of zeros then,
    which must not be read as the tensors' bytes (helper-135)."""
    child = textwrap.dedent(f"""
        import os, warnings, torch, outcore
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(6)])
        opt = torch.optim.Adam(model.parameters())
        directory = {str(tmp_path / "s")!r}
        ooc = outcore.OutOfCore("4MiB", state_dir=directory)
        ooc.resume(model, opt)
        def step():
            with ooc.iteration():
                model(torch.ones(8, 512)).sum().backward()
                opt.step()
                opt.zero_grad()
        for _ in range(3):
            step()
        (swap,) = [n for n in os.listdir(directory) if n.endswith(".swap")]
        os.truncate(os.path.join(directory, swap), 0)
        if {grown!r}:
            ooc._mover.allocate(64 << 20)
        try:
            step()
        except outcore.OutcoreError as err:
            print("ERROR", err)
        print("READ", [bool(p.detach().isnan().any()) for p in model.parameters()])
        print("ZEROS", [bool((p.detach() == 0).all()) for p in model.parameters()])
        # A loop that goes on after the error: its NaN must never be committed with valid
        # checksums, for a resume to load silently (rule 12, helper-203).
        for _ in range(2):
            try:
                step()
                print("COMMITTED")
            except outcore.OutcoreError as err:
                print("AGAIN", err)
        ooc.close()
        print("CLOSED")
        fresh = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(6)])
        with outcore.OutOfCore("4MiB", state_dir=directory) as new:
            try:
                print("RESUMED", new.resume(fresh, torch.optim.Adam(fresh.parameters())),
                      any(bool(p.detach().isnan().any()) for p in fresh.parameters()))
            except outcore.OutcoreError as err:
                print("REFUSED", err)
    """)
    out = zygote.run(["-c", child], timeout=180)
    assert out.returncode == 0 and "CLOSED" in out.stdout, out.stdout + out.stderr
    error = out.stdout.split("ERROR ", 1)[1].split("\n", 1)[0]
    assert "something else truncated it" in error and "bytes are lost" in error, error
    assert "still whole" not in error
    assert "COMMITTED" not in out.stdout, out.stdout
    again = [line for line in out.stdout.splitlines() if line.startswith("AGAIN ")]
    assert len(again) == 2 and all("the values of a tensor of the state were lost" in a
                                   and "NOTE [Durable state] rule 12" in a for a in again), again
    # The cut took the committed bytes too: resume() says so; it never loads NaN silently.
    assert "REFUSED" in out.stdout and "RESUMED" not in out.stdout, out.stdout
    assert "READ" in out.stdout and "True" in out.stdout.split("READ", 1)[1], out.stdout
    assert "True" not in out.stdout.split("ZEROS", 1)[1], out.stdout


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_a_flipped_bit_in_the_state_file_is_found_by_resume(tmp_path, where):
    """One bit flipped on the disk (a parameter's bytes, or Adam's second moment, whose
    damage changed nothing visible at once): resume() finds it by the checksum the
    manifest keeps (NOTE [Durable state] rule 7) instead of training on from it."""
    torch.manual_seed(0)
    _two_adam_iterations(torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)]),
                         tmp_path)
    manifest = torch.load(tmp_path / "manifest.pt", weights_only=True)
    ref = (manifest["model"]["2.weight"] if where == "model"
           else manifest["optimizer"]["state"][4]["exp_avg_sq"])
    assert ref["crc32"] is not None
    with open(tmp_path / manifest["file"], "r+b") as f:
        f.seek(ref["offset"] + ref["nbytes"] // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
    fresh = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        with pytest.raises(OutcoreError, match=f"offset {ref['offset']:,} .* checksum differs"):
            ooc.resume(fresh, torch.optim.Adam(fresh.parameters(), lr=1e-3))


def test_an_fsdp2_model_resumes_bitwise_and_is_refused_unsharded(tmp_path):
    """FSDP2's parameters and the Adam state made like them are DTensors; state_dir keeps
    their local shards (NOTE [Durable state] rule 9; before, the first commit failed with
    "invalid python storage"). Trained to 2, resumed by a new OutOfCore and trained to 5,
    the shards are bitwise those of 5 plain FSDP2 iterations, and the resumed process's
    first recording is not FSDP's lazy set-up (no deviation). Resumed into the model
    unsharded: refused before anything is loaded."""
    child = textwrap.dedent(f"""
        import hashlib, torch, torch.distributed as dist, outcore
        from torch.distributed.fsdp import fully_shard
        # Plain PyTorch on 2 threads can differ from itself (docs/executor.md): in a full
        # run its 5 plain iterations once gave another digest than in 20 runs alone,
        # which outcore's matched.
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0,
                                world_size=1)
        x = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))

        def make(shard=True):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                        torch.nn.Linear(256, 256))
            if shard:
                fully_shard(model[0]); fully_shard(model[2]); fully_shard(model)
            return model, torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model, opt, it):
            model(x * (it + 1)).square().mean().backward(); opt.step(); opt.zero_grad()

        def digest(model, opt):
            h = hashlib.sha1()
            local = lambda t: t.to_local() if hasattr(t, "to_local") else t
            for p in model.parameters():
                h.update(local(p).detach().numpy().tobytes())
            for state in opt.state.values():
                for v in state.values():
                    h.update(local(v).detach().numpy().tobytes())
            return h.hexdigest()

        def train(model, opt, total):
            with outcore.OutOfCore("2MiB", state_dir={str(tmp_path / "s")!r}) as ooc:
                start = ooc.resume(model, opt)
                for it in range(start, total):
                    with ooc.iteration():
                        step(model, opt, it)
                modes = [(i.mode, i.deviation) for i in ooc.report().iterations]
            return start, modes

        model, opt = make()
        for it in range(5):
            step(model, opt, it)
        print("PLAIN", digest(model, opt))
        model, opt = make()
        print("FIRST", train(model, opt, 2))
        model, opt = make(shard=False)
        try:
            train(model, opt, 4)
        except outcore.OutcoreError as err:
            print("REFUSED", err)
        print("UNCHANGED", all(torch.equal(a, b) for a, b in
                               zip(model.parameters(), make(shard=False)[0].parameters())))
        model, opt = make()
        print("RESUMED", train(model, opt, 5))
        print("OURS", digest(model, opt))
        dist.destroy_process_group()
    """)
    out = zygote.run(["-c", child], timeout=180)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines.get("OURS") == lines.get("PLAIN") is not None, out.stdout + out.stderr
    assert lines["FIRST"].startswith("(0, "), lines["FIRST"]
    start, modes = eval(lines["RESUMED"])           # noqa: S307 - our own child's repr
    assert start == 2 and [m for m, _ in modes] == ["record", "record", "replay"], modes
    assert all(deviation is None for _, deviation in modes), modes
    assert "holds 0.weight as an FSDP2 (DTensor) shard, this model has a plain tensor" in \
        lines["REFUSED"] and "Nothing was loaded" in lines["REFUSED"], out.stdout
    assert lines["UNCHANGED"] == "True"
    assert sorted(os.listdir(tmp_path / "s")) == ["manifest.pt", "state-1.swap"]


@pytest.mark.parametrize("raised", ["after the step", "before the step", "stops after the step",
                                    "interrupt"])
def test_an_iteration_that_raised_counts_as_its_loop_goes_on(tmp_path, raised):
    """NOTE [Durable state] rule 11 (helper-70): a loop that catches an exception from an
    iteration and goes on to the next batch, stopped later and resumed from the count
    resume() returns, ends bitwise equal to the loop run without a stop. Counted only
    where it completed, an iteration that raised after optimizer.step() left its step in
    the next commit under a count one too low, and the resumed loop trained a batch
    twice. A run that stops at the exception (raised after a step that may have spoiled
    the weights, or a Ctrl-C) keeps the last completed iteration's state: the resumed
    loop does that iteration again from before it, as after a kill."""
    total, failing, stop = 7, 2, 4

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, 10))
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(model, opt, i, fail):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(32, 256, generator=g), torch.randint(0, 10, (32,), generator=g)
        if fail and raised == "before the step":
            raise ValueError("the user's check before the step")
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if fail and raised.endswith("after the step"):
            raise ValueError("the user's check after the step (a NaN guard, say)")
        if fail:
            raise KeyboardInterrupt

    def loop(model, opt, start, end, ooc=None, fails=True):
        for i in range(start, end):
            try:
                with (ooc.iteration() if ooc is not None else contextlib.nullcontext()):
                    step(model, opt, i, fails and i == failing)
            except ValueError:
                if raised.startswith("stops"):
                    return i                     # the run ends here
                continue                         # skip that batch, go on
            except KeyboardInterrupt:
                return i                         # stopped: the run ends here

    stops = raised in ("stops after the step", "interrupt")
    plain = make()                               # stopped: as if killed there, so every
    loop(*plain, 0, total, fails=not stops)      # batch steps once from the resume on
    model, opt = make()
    with outcore.OutOfCore("512KiB", state_dir=tmp_path, min_move_bytes=0) as ooc:
        assert ooc.resume(model, opt) == 0
        end = loop(model, opt, 0, stop, ooc)
    count = failing if stops else stop
    assert (end if stops else stop) == count
    model, opt = make()
    with outcore.OutOfCore("512KiB", state_dir=tmp_path, min_move_bytes=0) as ooc:
        assert ooc.resume(model, opt) == count
        loop(model, opt, count, total, ooc, fails=False)
    for a, b in zip(plain[0].parameters(), model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(plain[1].state.values(), opt.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


_SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01,
                                                                  total_steps=TOTAL),
    "SequentialLR": lambda opt: torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL - 3)], milestones=[3]),
    "CosineAnnealingWarmRestarts":
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=3),
}


@pytest.mark.parametrize("name", sorted(_SCHEDULERS))
def test_the_readmes_scheduler_recipe_resumes_the_schedule_bitwise(tmp_path, name):
    """README, "With state_dir": a scheduler made after resume() from the optimizer's
    initial learning rates and stepped `start` times goes on as if never stopped. The
    recipe before (`sched.last_epoch = start - 1; sched.step()`) gave SequentialLR past
    its milestone another learning rate (helper-160: the active scheduler's own count
    was never set)."""
    import warnings
    make = _SCHEDULERS[name]
    model, opt = _linear4()
    sched = make(opt)
    plain = []
    for _ in range(TOTAL):
        _step(model, opt)
        sched.step()
        plain.append(opt.param_groups[0]["lr"])
    kept, lrs = dict(model.state_dict()), []
    for stop in (6, TOTAL):
        fresh, fresh_opt = _linear4()
        with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
            start = ooc.resume(fresh, fresh_opt)
            # The recipe, as the README gives it (without extra=).
            for group in fresh_opt.param_groups:
                group["lr"] = group.get("initial_lr", group["lr"])
            with warnings.catch_warnings():   # "lr_scheduler.step() before optimizer.step()"
                warnings.simplefilter("ignore", UserWarning)
                fresh_sched = make(fresh_opt)
                for _ in range(start):
                    fresh_sched.step()
            for _ in range(start, stop):
                with ooc.iteration():
                    _step(fresh, fresh_opt)
                fresh_sched.step()
                lrs.append(fresh_opt.param_groups[0]["lr"])
    assert lrs == plain
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in kept.items())


def _mlp_and_adamw(lr=1e-3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


def _mlp_step(model, opts, i):
    """One step on batch `i`, stepping each optimizer of `opts`."""
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(i))
    model(x).square().mean().backward()
    for opt in opts:
        opt.step()
        opt.zero_grad()


def test_a_replaced_optimizer_is_never_committed_as_the_old_one(tmp_path):
    """helper-208 (NOTE [Durable state] rule 13): a loop that replaced its optimizer (a
    new AdamW with another learning rate) went on committing the old one's state, and a
    resume gave the model that one, without a word (41 tensors off). Now the commits
    after it are refused until ooc.keep() names the new one, and a resume from the
    commits after that is the live run's optimizer, bitwise."""
    model, opt = _mlp_and_adamw()
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        ooc.resume(model, opt)
        for i in range(2):
            with ooc.iteration():
                _mlp_step(model, [opt], i)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
        for i in (2, 3):          # refused each time until named
            with pytest.raises(OutcoreError, match=r"another torch.optim.adamw.AdamW stepped, "
                               r"with optimizer state.*ooc.keep\(model, optimizer\)") as err:
                with ooc.iteration():
                    _mlp_step(model, [opt], i)
            assert "resume() there returns 2" in str(err.value)
        with pytest.raises(OutcoreError, match="between iterations"):
            with ooc.iteration():
                ooc.keep(model, opt)
        ooc.keep(model, opt)
        with ooc.iteration():
            _mlp_step(model, [opt], 4)
    fresh, _ = _mlp_and_adamw()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=2e-4)
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        assert ooc.resume(fresh, fresh_opt) == 6       # blocks that raised count (rule 11)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
        assert fresh_opt.param_groups[0]["lr"] == 2e-4
        for p, q in zip(model.parameters(), fresh.parameters()):
            assert all(torch.equal(opt.state[p][k], fresh_opt.state[q][k]) for k in opt.state[p])


class _Wrapped:
    """An optimizer wrapper as accelerate's and Lightning's are: it shares the wrapped
    one's `state` and `param_groups`, and the step hooks see the wrapped one."""

    def __init__(self, optimizer):
        self.optimizer, self.state = optimizer, optimizer.state
        self.param_groups, self.defaults = optimizer.param_groups, optimizer.defaults

    def step(self):
        self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad()

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state)


class _Lookahead(torch.optim.Optimizer):
    """A wrapper that is an optimizer of its own, with a state of its own, whose
    state_dict() is the wrapped one's (as timm's Lookahead keeps it)."""

    def __init__(self, base):
        super().__init__(base.param_groups, {})
        self._base_optimizer = base

    def step(self, closure=None):
        self._base_optimizer.step()

    def state_dict(self):
        return self._base_optimizer.state_dict()

    def load_state_dict(self, state):
        self._base_optimizer.load_state_dict(state)


class _Nested(_Lookahead):
    """A wrapper whose state_dict() nests the wrapped one's whole (helper-211: the first
    form of rule 13 looked only under "state" and refused it)."""

    def state_dict(self):
        return {"inner": self._base_optimizer.state_dict(), "n": 1}

    def load_state_dict(self, state):
        self._base_optimizer.load_state_dict(state["inner"])


class _WithMore(torch.optim.Optimizer):
    """A wrapper that shares the wrapped one's `state` and whose state_dict() holds more
    (PostLocalSGDOptimizer's holds its averager's step; helper-211: seen through, that
    was lost at a resume)."""

    def __init__(self, inner):       # no Optimizer.__init__, as torch's wrapper
        self.optim, self.steps, self.defaults = inner, 0, inner.defaults

    @property
    def state(self):
        return self.optim.state

    @property
    def param_groups(self):
        return self.optim.param_groups

    def step(self, closure=None):
        self.optim.step()
        self.steps += 1

    def zero_grad(self, set_to_none=True):
        self.optim.zero_grad(set_to_none)

    def state_dict(self):
        return {**self.optim.state_dict(), "steps": self.steps}

    def load_state_dict(self, state):
        state = dict(state)
        self.steps = state.pop("steps")
        self.optim.load_state_dict(state)


def test_a_wrapper_whose_state_dict_holds_more_is_kept_whole(tmp_path):
    model, opt = _mlp_and_adamw()
    wrapper = _WithMore(opt)
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        ooc.resume(model, wrapper)
        for i in range(3):
            with ooc.iteration():
                _mlp_step(model, [wrapper], i)
    fresh, fresh_opt = _mlp_and_adamw()
    resumed = _WithMore(fresh_opt)
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        assert ooc.resume(fresh, resumed) == 3
    assert resumed.steps == 3
    assert torch.equal(fresh_opt.state[fresh[0].weight]["exp_avg"],
                       opt.state[model[0].weight]["exp_avg"])


class _Unhashable(torch.optim.SGD):
    def __eq__(self, other):            # defines no __hash__: instances are unhashable
        return self is other


@pytest.mark.parametrize("case", ["wrapper", "lookahead", "nested", "none-and-plain-sgd",
                                  "none-and-momentum", "two", "two-one-stateless",
                                  "new-model", "unhashable-between"])
def test_which_other_optimizers_stop_the_commits(tmp_path, case):
    """Rule 13's edges (helper-210): a wrapper named in resume() is the optimizer its
    steps step, whether it shares its state (accelerate, Lightning) or its state_dict()
    is the wrapped one's (a Lookahead); with no optimizer named, plain SGD (no state)
    commits, SGD with momentum does not (its momentum would be lost); two optimizers
    with state (a GAN's) are refused, one with none beside the kept one is not; a new
    model with its own optimizer is refused; an optimizer that cannot be hashed,
    stepped between iterations, is noted (the hook raised TypeError into its step)."""
    model, opt = _mlp_and_adamw()
    other, _ = _mlp_and_adamw()
    named, opts, refused = {
        "wrapper": (_Wrapped(opt), [opt], None),
        "lookahead": (_Lookahead(opt), [opt], None),
        "nested": (_Nested(opt), [opt], None),
        "none-and-plain-sgd": (None, [torch.optim.SGD(model.parameters(), lr=0.1)], None),
        "none-and-momentum": (None, [torch.optim.SGD(model.parameters(), lr=0.1,
                                                     momentum=0.9)], "no optimizer"),
        "two": (opt, [torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9), opt],
                "GAN"),
        "two-one-stateless": (opt, [torch.optim.SGD(model[0].parameters(), lr=0.1), opt], None),
        "new-model": (opt, [torch.optim.AdamW(other.parameters())], "its model"),
        "unhashable-between": (opt, [opt], "GAN")}[case]
    trained = other if case == "new-model" else model
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        ooc.resume(model, named)
        if case == "unhashable-between":
            unhashable = _Unhashable(model.parameters(), lr=0.1, momentum=0.9)
            _mlp_step(model, [unhashable], 9)
        with contextlib.ExitStack() as stack:
            if refused:
                stack.enter_context(pytest.raises(OutcoreError, match=r"(a|another) \S+ "
                                                  rf"stepped, with optimizer state.*{refused}"))
            for i in range(2):
                with ooc.iteration():
                    _mlp_step(trained, opts, i)


def test_a_lightning_optimizer_named_in_resume_is_the_one_that_steps(tmp_path):
    """helper-210: Lightning's LightningOptimizer forwards to the optimizer it wraps and
    keeps a state of its own: resume() loaded the kept state into the wrapper, and the
    optimizer that steps started afresh (a resume after 4 iterations had step 2)."""
    from lightning.pytorch.core.optimizer import LightningOptimizer
    model, opt = _mlp_and_adamw()
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        ooc.resume(model, LightningOptimizer(opt))
        for i in range(2):
            with ooc.iteration():
                _mlp_step(model, [opt], i)
    fresh, fresh_opt = _mlp_and_adamw()
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        assert ooc.resume(fresh, LightningOptimizer(fresh_opt)) == 2
    assert torch.equal(fresh_opt.state[fresh[0].weight]["exp_avg"],
                       opt.state[model[0].weight]["exp_avg"])


def test_resume_keeps_the_dtype_the_optimizer_state_was_kept_with(tmp_path):
    """helper-208 (rule 14): torch's Optimizer.load_state_dict casts floating state to
    its parameter's dtype, so the float32 momentum of a model converted to bfloat16
    came back bfloat16 and the resumed run differed from the uninterrupted one."""
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=False)

    def step(dtype):
        model(torch.ones(2, 256, dtype=dtype)).sum().backward()
        opt.step()
        opt.zero_grad()
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        ooc.resume(model, opt)
        with ooc.iteration():
            step(torch.float32)
        with ooc.building():
            model.to(torch.bfloat16)
        with ooc.iteration():
            step(torch.bfloat16)
    momentum = opt.state[model.weight]["momentum_buffer"]
    assert momentum.dtype == torch.float32
    fresh = torch.nn.Linear(256, 256).to(torch.bfloat16)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9, foreach=False)
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        assert ooc.resume(fresh, fresh_opt) == 2
        kept = fresh_opt.state[fresh.weight]["momentum_buffer"]
        assert kept.dtype == torch.float32 and torch.equal(kept, momentum)


def _muon_and_adamw(model):
    """Muon for the matrices, AdamW for the rest: the usual pair (torch's Muon takes 2-D
    parameters only), as two optimizers with state."""
    matrices = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    return [torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=1e-3)]


def test_several_optimizers_named_in_a_list_resume_bitwise(tmp_path):
    """Rule 13: a loop that steps two optimizers with state (Muon and AdamW) was refused,
    with advice (one optimizer with a parameter group each) that cannot apply to two
    classes. Named in a list, both are kept, a resume in the same order is the live run
    bitwise as it goes on, and another count or order is refused before anything is
    copied."""
    model, _ = _mlp_and_adamw()
    opts = _muon_and_adamw(model)
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        assert ooc.resume(model, opts) == 0
        for i in range(3):
            with ooc.iteration():
                _mlp_step(model, opts, i)
    fresh, _ = _mlp_and_adamw()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh_opts = _muon_and_adamw(fresh)
    for named, match in ((fresh_opts[::-1], r"kept by a torch.optim.Muon \(optimizer 1 "
                          r"of 2\), and resume.. got a torch.optim.adamw.AdamW"),
                         (fresh_opts[0], r"kept with 2 optimizers \(torch.optim.Muon, "
                          r"torch.optim.adamw.AdamW\), and resume.. got 1"),
                         (None, "kept with an optimizer, and resume.. got none"),
                         ([fresh_opts[0], fresh_opts[0]], "named twice")):
        with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
            with pytest.raises(OutcoreError, match=match):
                ooc.resume(fresh, named)
        assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        assert ooc.resume(fresh, tuple(fresh_opts)) == 3
        for i in (3, 4):
            with ooc.iteration():
                _mlp_step(fresh, fresh_opts, i)
    for i in (3, 4):
        _mlp_step(model, opts, i)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    for opt, fresh_opt in zip(opts, fresh_opts):
        for p, q in zip([p for g in opt.param_groups for p in g["params"]],
                        [q for g in fresh_opt.param_groups for q in g["params"]]):
            assert opt.state[p].keys() == fresh_opt.state[q].keys()
            assert all(torch.equal(torch.as_tensor(opt.state[p][k]),
                                   torch.as_tensor(fresh_opt.state[q][k])) for k in opt.state[p])


def test_keep_names_several_optimizers_and_refuses_what_is_no_optimizer(tmp_path):
    """ooc.keep() takes several as resume() does; a loop that adds a second optimizer
    with state is refused until both are named, then commits, and a resume with both
    gets the second's state."""
    model, _ = _mlp_and_adamw()
    adamw = torch.optim.AdamW(model[0].parameters())
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        ooc.resume(model, adamw)
        head = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
        with pytest.raises(OutcoreError, match=r"a torch.optim.sgd.SGD stepped.*name them "
                           r"all in a list: ooc.resume\(model, \[opt_a, opt_b\]\)"):
            with ooc.iteration():
                _mlp_step(model, [adamw, head], 0)
        for bad, match in (([adamw, "sgd"], "got str in the list"),
                           ((adamw, head, adamw), "named twice"),
                           (adamw.state_dict(), "got dict")):
            with pytest.raises(OutcoreError, match=match):
                ooc.keep(model, bad)
        ooc.keep(model, [adamw, head])
        with ooc.iteration():
            _mlp_step(model, [adamw, head], 1)
    fresh, _ = _mlp_and_adamw()
    fresh_adamw = torch.optim.AdamW(fresh[0].parameters())
    fresh_head = torch.optim.SGD(fresh[2].parameters(), lr=0.1, momentum=0.9)
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        assert ooc.resume(fresh, [fresh_adamw, fresh_head]) == 2
    assert torch.equal(fresh_head.state[fresh[2].weight]["momentum_buffer"],
                       head.state[model[2].weight]["momentum_buffer"])


def test_an_optimizer_over_parameters_outside_the_model_is_refused(tmp_path):
    """helper-215: an optimizer over a head that is not in the model was accepted; the
    commits kept its moments but not the head's weights, and a resume gave the moments
    to a freshly made head (the run diverged without a word). Refused now, saying where
    the head goes."""
    model, _ = _mlp_and_adamw()
    head = torch.nn.Linear(10, 3)
    opts = [torch.optim.AdamW(model.parameters()), torch.optim.Adam(head.parameters())]
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        with pytest.raises(OutcoreError, match=r"the optimizer 2 of 2 \(Adam\) holds 2 "
                           r"parameters that are not the model's \(\(3, 10\), \(3,\)\).*"
                           r"torch.nn.ModuleDict"):
            ooc.resume(model, opts)
        both = torch.nn.ModuleDict({"body": model, "head": head})
        assert ooc.resume(both, opts) == 0
        with pytest.raises(OutcoreError, match=r"the optimizer \(Adam\) holds 2 parameters"):
            ooc.keep(model, opts[1])
        deep = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(3)])
        with pytest.raises(OutcoreError, match=r"holds 6 parameters that are not the "
                           r"model's \(\(3, 3\), \(3,\), \(3, 3\), \(3,\), \.\.\.\)"):
            ooc.keep(model, torch.optim.SGD(deep.parameters(), lr=0.1))   # four named of six


def test_optimizers_resumed_over_other_parameters_are_refused(tmp_path):
    """helper-214: a GAN's two Adams (generator and discriminator of the same shapes)
    resumed as [opt_d, opt_g] passed the class and group-size checks, and each one's
    moments were loaded into the other's parameters, without a word. The manifest names
    the parameters each optimizer holds; another order, over the same count and shapes,
    is refused before anything is copied, and so is one optimizer over its parameters
    in another order."""
    def gan():
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"g": torch.nn.Linear(64, 64), "d": torch.nn.Linear(64, 64)})
        return model, [torch.optim.Adam(model["g"].parameters()),
                       torch.optim.Adam(model["d"].parameters())]

    def step(model, opts, i):
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(i))
        model["d"](model["g"](x)).square().mean().backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    model, opts = gan()
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        ooc.resume(model, opts)
        for i in range(2):
            with ooc.iteration():
                step(model, opts, i)
    fresh, fresh_opts = gan()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    reversed_g = torch.optim.Adam(list(fresh["g"].parameters())[::-1])
    for named, match in ((fresh_opts[::-1], r"kept by an optimizer \(optimizer 1 of 2\) over 2 "
                          r"parameters, its number 0 g.weight, and resume.. got one over 2, its "
                          r"number 0 d.weight"),
                         ([reversed_g, fresh_opts[1]], r"its number 0 g.weight, and resume.. "
                          r"got one over 2, its number 0 g.bias")):
        with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
            with pytest.raises(OutcoreError, match=match):
                ooc.resume(fresh, named)
        assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
        assert not any(opt.state for opt in fresh_opts + [reversed_g])
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        assert ooc.resume(fresh, fresh_opts) == 2
    assert torch.equal(fresh_opts[1].state[fresh["d"].weight]["exp_avg"],
                       opts[1].state[model["d"].weight]["exp_avg"])


class _Counter:
    """An extra= state of the user's: a sampler's position."""

    def __init__(self, value=0):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


_EXTRAS = {**_SCHEDULERS, "ReduceLROnPlateau": lambda opt: torch.optim.lr_scheduler.
           ReduceLROnPlateau(opt, patience=0, factor=0.5)}


@pytest.mark.parametrize("name", sorted(_EXTRAS))
def test_extra_states_resume_the_schedule_and_the_scale_bitwise(tmp_path, name):
    """Rule 16: a scheduler, a GradScaler and a counter of the user's named in
    extra= are kept at each commit, and a run stopped after 6 iterations and resumed
    into new objects goes on with the learning rates, the scale and the parameters of
    one never stopped. ReduceLROnPlateau (it follows a metric) and the GradScaler's scale
    (it follows the gradients) had no recipe before."""
    def make():
        model, opt = _linear4()
        return (model, opt, _EXTRAS[name](opt),
                torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=2), _Counter())

    def step(model, opt, sched, scaler, counter):
        loss = model(_X).sum()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if name == "ReduceLROnPlateau":
            sched.step(loss.item())
        else:
            sched.step()
        counter.value += 1
        return opt.param_groups[0]["lr"], scaler.get_scale()

    plain = make()
    expected = [step(*plain) for _ in range(TOTAL)]
    got = []
    for stop in (6, TOTAL):
        objs = make()
        model, opt, sched, scaler, counter = objs
        with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
            start = ooc.resume(model, opt, extra={"sched": sched, "scaler": scaler,
                                                  "counter": counter})
            assert counter.value == start
            for _ in range(start, stop):
                with ooc.iteration():
                    got.append(step(*objs))
    assert got == expected
    assert all(torch.equal(a, b) for a, b in zip(plain[0].parameters(), model.parameters()))
    assert len({scale for _, scale in expected}) > 2           # the scale did change


def test_extra_states_that_cannot_be_kept_are_refused(tmp_path, caplog):
    """Rule 16's refusals: not a dict, an object without state_dict(), a model or an
    optimizer (their place is model= and optimizer=); a state_dict() a manifest cannot
    hold, at the commit, before anything is written; other names at resume(), before
    anything is copied; and a state stepped between iterations is told once."""
    model, opt = _linear4()
    counter = _Counter()
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        for extra, match in (([counter], "must be a dict"), ({"c": object()}, "has no state_dict"),
                             ({1: counter}, "names must be strings"),
                             ({"ema": model}, "is a model: pass it as model"),
                             ({"o": opt}, "is an optimizer: pass it as optimizer")):
            with pytest.raises(OutcoreError, match=match):
                ooc.resume(model, opt, extra=extra)
        ooc.resume(model, opt, extra={"counter": counter})
        with ooc.iteration():
            _step(model, opt)
        counter.value = 5                       # between iterations: kept a step behind
        with caplog.at_level("WARNING", logger="outcore"):
            for _ in range(2):
                with ooc.iteration():
                    _step(model, opt)
                counter.value += 1
        told = [r for r in caplog.records if "'counter' changed between iterations" in
                r.getMessage()]
        assert len(told) == 1, caplog.text
        import numpy
        for value, why in ((object(), r"an object made by (builtins\.)?object"),
                           (numpy.zeros(3), r"an object made by numpy.*multiarray"),
                           (lambda: 0, r"Can't (pickle|get local object)")):   # helper-215
            counter.value = value               # no manifest reads that back
            with pytest.raises(OutcoreError, match=r"extra=\{'counter': _Counter\} holds what "
                               rf"a state manifest cannot keep \({why}.*was committed\. "
                               r"Nothing in memory"):
                with ooc.iteration():
                    _step(model, opt)
    fresh, fresh_opt = _linear4()
    for extra, match in ((None, r"keeps extra= states named \['counter'\], and resume.. got "
                          r"\[\]; pass \['counter'\] too"),
                         ({"counter": _Counter(), "sampler": _Counter()}, "keeps none of "
                          r"\['sampler'\]")):
        with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
            with pytest.raises(OutcoreError, match=match):
                ooc.resume(fresh, fresh_opt, extra=extra)
        assert not fresh_opt.state
    again = _Counter()
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        assert ooc.resume(fresh, fresh_opt, extra={"counter": again}) == 3
    assert again.value == 6


class _Tracker:
    """An extra= object of the user's whose state_dict() leaves out a tensor it changes."""

    def __init__(self):
        self.steps, self.loss_sum = 0, torch.zeros(())

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def _unkept_told(tmp_path, caplog, case, iterations=4):
    """`iterations` iterations of `_linear4` (SGD where the case says so: no state of its
    own made at the first step, so only the first iteration records) under a state_dir,
    with what `case` adds to each; the rule-17 warnings said."""
    model, opt = _linear4()
    if "sgd" in case:
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
    kept, extra = model, None
    ema = copy.deepcopy(model).requires_grad_(False)
    scaler, tracker = torch.amp.GradScaler("cpu", init_scale=4.0), _Tracker()
    total, buffer, out = torch.zeros(()), torch.empty(8, 256), torch.empty(8, 256)
    parts, tiles = torch.zeros(8, 256), torch.zeros(8, 256)
    history, best, seen = [], torch.full((), float("inf")), torch.zeros(8, 4)
    norm = torch.nn.BatchNorm1d(256)            # its running statistics: no version moves
    norm.num_batches_tracked = None             # (its counter's would: told at once)
    if case == "ema in a ModuleDict":
        kept = torch.nn.ModuleDict({"model": model, "ema": ema})
    elif case == "scaler in extra":
        extra = {"scaler": scaler}
    elif case == "tracker in extra":
        extra = {"tracker": tracker}

    def step(i, batch):
        if "scaler" in case:
            scaler.scale(model(_X).sum()).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        else:
            _step(model, opt)
        if case.startswith("ema") or (case == "sum, then an ema" and i >= 2):
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 0.01)
        elif case == "timm-style ema":          # timm's ModelEmaV2: detached values
            with torch.no_grad():
                for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
                    e.copy_(e * 0.99 + p * 0.01)
        if case in ("running sum", "sum, then an ema"):
            total.add_(1.0)
        elif case == "sum written through out=":
            torch.add(total, 1.0, out=total)        # reads what it writes
        elif case == "tracker in extra":
            tracker.loss_sum.add_(1.0)
            tracker.steps += 1
        elif case == "buffers overwritten":
            buffer.copy_(_X)                        # a batch copied into a buffer
            torch.mul(buffer, 2.0, out=out)         # an out= argument
            torch.randn(8, 256, out=out)            # resize_, then normal_
            buffer[:4].copy_(_X[4:])                # halves, one by one
            buffer[4:].copy_(_X[:4])
            out.normal_()
            parts[:4].copy_(_X[:4])                 # a piece, read, then the rest
            parts[:4].sum()
            parts[4:].copy_(parts[:4] * 2)
            tiles[:4].copy_(_X[:4])                 # the rest copied from the piece
            tiles[4:].copy_(tiles[:4])
            total.bernoulli_(0.5)
        elif case == "batch changed in place":
            batch[batch > 0] = 0.0
        elif case == "kept once changed":                 # made, changed once, kept
            loss = model(_X).sum().detach()
            loss /= 2
            history.append(loss)
            history.append(model(_X).detach().clamp_(0, 1))
        elif case == "foreach ema":
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 0.01)
        elif case == "best so far":
            best.fill_(torch.minimum(best, model(_X).sum().detach()))   # fill_ with a tensor
        elif case == "rows seen":
            seen[i % 8].fill_(1.0)                  # marks, a row at a time
        elif case == "pieces, the rest read first":
            parts[:4].copy_(_X[:4])                 # a piece overwritten, the rest is read
            parts[4:].add_(parts[:4])
        elif case == "batch norm beside":
            norm(_X)
        elif case == "an ema every 10th" and i % 10 == 0:     # ema-pytorch's default
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 0.01)
        elif case == "sum of the first iteration" and i == 0:
            total.add_(1.0)                         # the recording's only: then constant
        elif case == "running sum reset":
            total.add_(1.0)
            total.zero_()                           # logged and reset at the block's end
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        ooc.resume(kept, opt, **({"extra": extra} if extra else {}))
        with caplog.at_level("WARNING", logger="outcore"):
            for i in range(iterations):
                batch = _X.clone()                  # fetched before the block
                with ooc.iteration():
                    step(i, batch)
    return [r.getMessage() for r in caplog.records if "no commit keeps" in r.getMessage()]


@pytest.mark.parametrize("case", ["ema", "timm-style ema", "scaler", "scaler, sgd",
                                  "running sum", "sum written through out=",
                                  "tracker in extra", "foreach ema", "best so far",
                                  "rows seen", "batch norm beside",
                                  "pieces, the rest read first", "an ema every 10th"])
def test_state_an_iteration_changes_and_no_commit_keeps_is_told_once(tmp_path, caplog, case):
    """Rule 17: an EMA model kept beside the model, a GradScaler left out of extra= (its
    tensors made by the first iteration itself, which is the only one recorded with
    SGD), a running sum in a tensor made before the loop (also as an out= argument that
    is read too), a tensor an extra= object changes beside its state_dict(), an EMA by
    `_foreach_lerp_` (no version moves under a dispatch mode: outcore moves them), a
    best-so-far set with fill_(tensor), marks set row by row by fill_ and a batch norm's
    running statistics beside the model (whose writes move no version: told once
    _UNKEPT_WAIT iterations found its bytes changed), a buffer half overwritten, its
    other half read and added to, and an EMA updated every 10th iteration (its bytes the
    same 8 iterations on, then its version followed: helper-221) are changed in place by
    every iteration and kept by no commit (a resume starts them afresh): one warning
    says so, naming how many, the largest with its shape and the op that wrote it, and
    where an EMA and a GradScaler go."""
    told = _unkept_told(tmp_path, caplog, case,
                        iterations={"batch norm beside": 10, "an ema every 10th": 12}.get(case, 4))
    assert len(told) == 1, told
    expected = {"ema": ("8 tensors", "1.00 MiB", "shape (256, 256)", "aten::lerp_.Scalar",
                        "outside the forward"),
                "scaler": ("1 tensor ", "4 B", "float32 of shape ()", "aten::_amp_update_scale_"),
                "running sum": ("1 tensor ", "4 B", "float32 of shape ()", "aten::add_.Tensor"),
                "sum written through out=": ("1 tensor ", "aten::add.out"),
                "timm-style ema": ("8 tensors", "1.00 MiB", "aten::copy_.default"),
                "foreach ema": ("8 tensors", "1.00 MiB", "lerp_"),
                "best so far": ("1 tensor ", "aten::fill_.Tensor"),
                "rows seen": ("1 tensor ", "float32 of shape (8, 4)", "aten::fill_.Scalar"),
                "pieces, the rest read first": ("1 tensor ", "float32 of shape (8, 256)",
                                                "aten::copy_.default"),
                "an ema every 10th": ("8 tensors", "aten::lerp_.Scalar"),
                "batch norm beside": ("2 tensors", "float32 of shape (256,)",
                                      "aten::native_batch_norm"),
                "tracker in extra": ("1 tensor ", "aten::add_.Tensor")}
    expected["scaler, sgd"] = expected["scaler"]
    for part in expected[case] + ("ModuleDict({'model': model, 'ema': ema})",
                                  "extra={'scaler': scaler}"):
        assert part in told[0], (part, told[0])


@pytest.mark.parametrize("case", ["ema in a ModuleDict", "scaler in extra",
                                  "buffers overwritten", "batch changed in place",
                                  "kept once changed", "running sum reset",
                                  "sum of the first iteration"])
def test_state_a_commit_keeps_or_that_never_matters_is_not_told(tmp_path, caplog, case):
    """Rule 17's silence: an EMA model passed with the model, a GradScaler in extra=
    (its state_dict() holds the scale as a number: its tensors count as kept), buffers
    each iteration overwrites whole before any read (a batch copied in, an out= argument
    as DDP's gradient buckets are written, a factory's out=, halves copied in one by
    one, also with a read of the first between or the second copied from the first,
    random fills), a batch fetched before each block and changed in it (gone when the
    next one ends), tensors an iteration makes, changes once and keeps (a loss halved in
    place, kept in a list: never written again), a sum reset at the block's end and one
    only the first iteration (the recording) adds to, its bytes the same for
    _UNKEPT_WAIT iterations after (as DDP's map of the parameters used with
    static_graph=True), need no warning."""
    iterations = 10 if case == "sum of the first iteration" else 4
    assert _unkept_told(tmp_path, caplog, case, iterations) == []


def test_state_moved_out_and_never_changed_again_is_not_told(tmp_path, caplog):
    """Rule 17 compares the bytes of a storage whose version never moves: a table made
    before the loop and changed by the first iteration only is no state. At a budget
    that moves it out (min_move_bytes=0) it lies mapped between iterations, and was told
    as not comparable (helper-221): its mapped bytes are read."""
    model, opt = _linear4()
    table, states = torch.zeros(256, 256), set()
    with outcore.OutOfCore("1MiB", min_move_bytes=0, state_dir=tmp_path) as ooc:
        ooc.resume(model, opt)
        with caplog.at_level("WARNING", logger="outcore"):
            for i in range(12):
                with ooc.iteration():
                    if i == 0:
                        table.add_(1.0)             # the recording's only write
                    _step(model, opt)
                entry = ooc._res.entry_of(table.untyped_storage())
                states.add(None if entry is None else entry.state)
    assert MAPPED in states, states                 # moved out: what the case is about
    assert not [r for r in caplog.records if "no commit keeps" in r.getMessage()]

def test_state_found_after_the_first_warning_is_told_too(tmp_path, caplog):
    """Rule 17: a warning names each storage once, and what a later recording finds
    changed in place is told then: an EMA that starts at the third iteration (its steps
    deviate from the plan until their shape is recorded, the fifth), after a running
    sum was told, is not hidden by it."""
    told = _unkept_told(tmp_path, caplog, "sum, then an ema", iterations=7)
    assert len(told) == 2, told
    assert "1 tensor " in told[0] and "aten::add_.Tensor" in told[0], told
    assert "8 tensors" in told[1] and "aten::lerp_.Scalar" in told[1], told


def _lazy_mlp():
    """An MLP of lazy layers (their parameters get a shape at the first forward), Adam."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LazyLinear(256), torch.nn.ReLU(),
                                torch.nn.LazyLinear(10))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def _qat_cnn():
    """A convolution and a linear layer prepared for quantization-aware training: their
    per-channel fake quantizers hold a scale and zero point of shape (1,) until the first
    forward, their observers empty statistics. SGD with momentum."""
    import warnings
    from torch.ao import quantization
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(16 * 14 * 14, 10))
    model.qconfig = quantization.get_default_qat_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # torch.ao.quantization's deprecation
        quantization.prepare_qat(model, inplace=True)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


@pytest.mark.parametrize("make, shape", [(_lazy_mlp, (8, 512)), (_qat_cnn, (8, 3, 16, 16))],
                         ids=["lazy layers", "qat fake quantizers"])
def test_tensors_a_module_shapes_as_it_loads_them_resume_bitwise(tmp_path, make, shape):
    """Rule 9 (helper-223): resume() copies kept tensors into the model's in place and
    refused one of another shape, but a lazy module's parameters have no shape before
    its first forward, and a per-channel fake quantizer's scale is (1,) until then:
    such a model, rebuilt to resume, was refused (a QAT run could not resume; a lazy one
    failed in a RuntimeError). Their modules' own load_state_dict() shapes them, as
    plain PyTorch's does; the resumed run is the live one bitwise as it goes on."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (shape[0],), generator=torch.Generator().manual_seed(2))

    def step(model, opt):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    def train(model, opt, done, iterations):
        with outcore.OutOfCore("2MiB", state_dir=tmp_path) as ooc:
            assert ooc.resume(model, opt) == done
            for _ in range(iterations):
                with ooc.iteration():
                    step(model, opt)
    model, opt = make()
    train(model, opt, 0, 3)
    for _ in range(2):
        step(model, opt)                    # the live run goes on, plain
    fresh, fresh_opt = make()
    train(fresh, fresh_opt, 3, 2)           # a fresh model, resumed
    live, resumed = model.state_dict(), fresh.state_dict()
    assert live.keys() == resumed.keys()
    assert all(torch.equal(live[k], resumed[k]) for k in live)


def test_a_placeholder_its_module_cannot_shape_is_refused_clearly(tmp_path):
    """Rule 9: a kept tensor loaded by its module's own load_state_dict() that leaves it
    another shape than kept is an error naming both, not a model trained on a wrong
    one; a batch norm of other features than kept is refused before anything is
    copied, as before."""
    model, opt = _qat_cnn()
    x = torch.randn(8, 3, 16, 16)
    with outcore.OutOfCore("2MiB", state_dir=tmp_path) as ooc:
        ooc.resume(model, opt)
        with ooc.iteration():
            model(x).sum().backward()
            opt.step()
    fresh, fresh_opt = _qat_cnn()
    quantizer = fresh[0].weight_fake_quant
    original = type(quantizer)._load_from_state_dict

    def refuses_to_resize(self, state_dict, prefix, *args):
        torch.nn.Module._load_from_state_dict(self, {}, prefix, *args)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(quantizer), "_load_from_state_dict", refuses_to_resize)
        with outcore.OutOfCore("2MiB", state_dir=tmp_path) as ooc:
            with pytest.raises(OutcoreError, match=r"holds 0\.weight_fake_quant\.scale as "
                               r"\(16,\) torch\.float32, and this model's "
                               r"FusedMovingAvgObsFakeQuantize\.load_state_dict\(\) left it "
                               r"\(1,\)") as raised:
                ooc.resume(fresh, fresh_opt)
    assert "partly loaded" in "".join(getattr(raised.value, "__notes__", []))
    assert type(quantizer)._load_from_state_dict is original
    other = torch.nn.Sequential(torch.nn.BatchNorm1d(4))
    with outcore.OutOfCore("2MiB", state_dir=tmp_path / "bn") as ooc:
        ooc.resume(other)
        with ooc.iteration():
            other(torch.randn(8, 4)).sum()
    wrong = torch.nn.Sequential(torch.nn.BatchNorm1d(1))
    before = copy.deepcopy(wrong.state_dict())
    with outcore.OutOfCore("2MiB", state_dir=tmp_path / "bn") as ooc:
        with pytest.raises(OutcoreError, match=r"holds 0\.weight as \(4,\).*this model as "
                           r"\(1,\).*Nothing was loaded"):
            ooc.resume(wrong)
    assert all(torch.equal(before[k], v) for k, v in wrong.state_dict().items())


def _carried_told(tmp_path, caplog, case, budget, stop=5):
    """Iterations of an LSTM read by a linear layer, Adam, under a state_dir, with what
    `case` carries from one iteration to the next, from those the directory kept up to
    `stop`; the rule-17 warnings said, the modes, the losses and the bytes read back."""
    torch.manual_seed(0)
    lstm, head = torch.nn.LSTM(64, 128, batch_first=True), torch.nn.Linear(128, 64)
    model = torch.nn.ModuleDict({"lstm": lstm, "head": head})
    holder = torch.nn.Module()
    holder.register_buffer("h", torch.zeros(1, 4, 128))
    holder.register_buffer("c", torch.zeros(1, 4, 128))
    kept = torch.nn.ModuleDict({"model": model, "state": holder}) if "buffer" in case else model
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if "sgd" in case    # one recording
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    data = torch.randn(64, 16, 64, generator=torch.Generator().manual_seed(0))
    state = {"h": torch.zeros(1, 4, 128), "c": torch.zeros(1, 4, 128), "ema": torch.zeros(4, 64),
             "next": data[:4].clone(), "losses": [],
             "emas": [p.detach().clone() for p in model.parameters()]}

    def step(i):
        if case.startswith("loss logged late") and state["losses"]:
            state["losses"][-1].item()              # the last iteration's, logged now
        x = state["next"] if case == "prefetched batch" else data[4 * i:4 * i + 4]
        hidden = ((state["h"], state["c"]) if case == "hidden state"
                  else (holder.h, holder.c) if "buffer" in case else None)
        out, (h, c) = lstm(x, hidden)
        y = head(out[:, -1])
        loss = y.square().mean()
        if case == "ema out of place":
            state["ema"] = 0.9 * state["ema"] + 0.1 * y.detach()
            loss = loss + state["ema"].sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if case == "hidden state":
            state["h"], state["c"] = h.detach(), c.detach()
        elif "buffer" in case:
            holder.h, holder.c = h.detach(), c.detach()
        elif case == "prefetched batch":
            state["next"] = data[4 * i + 4:4 * i + 8].clone()   # the next batch, fetched
        elif case == "loss kept" or case.startswith("loss logged late"):
            state["losses"].append(loss.detach())
        elif case == "foreach ema out of place":     # read as one op, recorded per tensor
            state["emas"] = torch._foreach_lerp(
                state["emas"], [p.detach() for p in model.parameters()], 0.1)
        return loss.item()
    losses = []
    with outcore.OutOfCore(budget, state_dir=tmp_path) as ooc:
        done = ooc.resume(kept, opt)
        with caplog.at_level("WARNING", logger="outcore"):
            for i in range(done, stop):
                with ooc.iteration():
                    losses.append(step(i))
        modes = [it.mode for it in ooc.report().iterations]
        read = [it.bytes_read for it in ooc.report().iterations]
    told = [r.getMessage() for r in caplog.records if "no commit keeps" in r.getMessage()]
    return told, modes, losses, read


@pytest.mark.parametrize("case, size", [
    (case, size) for case in ["hidden state", "ema out of place",
                              "foreach ema out of place", "prefetched batch", "loss kept",
                              "loss logged late, sgd", "hidden state in a buffer"]
    for size in ["tight", "large"]
    if not (size == "tight" and "sgd" in case)])     # SGD's replays move at no budget here
def test_state_an_iteration_carries_out_of_place_is_told(tmp_path, caplog, case, size):
    """Rule 17, out of place (helper-223): truncated backpropagation through time's
    hidden state (`h.detach()` kept for the next iteration) and an average made anew
    from the one before (`ema = 0.9 * ema + 0.1 * y`, also by `_foreach_lerp`, one op
    the recorder has as a function per tensor) are carried from one iteration to
    the next, and no commit keeps them: a resume started them afresh and the run
    differed from the uninterrupted one, without a word. One warning says so, at a tight
    budget and at a large one (whose replays only follow the plan). A batch fetched by
    one iteration for the next, a loss kept in a list, one logged by `.item()` at the
    next iteration's start (an op the record does not have there: helper-224) and a
    hidden state kept in a module's buffers passed with the model (as the warning
    advises) are not told."""
    budget = {"tight": "3MiB" if "foreach" in case else "2MiB", "large": "64MiB"}[size]
    told, modes, _, read = _carried_told(tmp_path, caplog, case, budget)
    assert modes[0] == "record" and "replay" in modes, modes
    assert (read[-1] > 0) == (size == "tight"), read        # the replays move, or follow
    if "out of place" in case or case.startswith("hidden state") and "buffer" not in case:
        assert len(told) == 1, told
        what = {"hidden state": ("2 tensors", "from one to the next", "shape (1, 4, 128)",
                                 "made by aten::"),
                "ema out of place": ("1 tensor ", "shape (4, 64)", "aten::add.Tensor",
                                     "outside the forward"),
                "foreach ema out of place": ("6 tensors", "aten::_foreach_lerp.Scalar")}[case]
        assert all(part in told[0] for part in what), told[0]
        assert "holder.register_buffer" in told[0]
    else:
        assert told == [], told


@pytest.mark.parametrize("case", ["hidden state in a buffer", "hidden state"])
def test_a_hidden_state_kept_as_the_warning_advises_resumes_bitwise(tmp_path, caplog, case):
    """Rule 17, out of place: the warning's advice works. A hidden state kept in a
    module's buffers passed with the model is committed with it: a run stopped after
    three iterations and resumed with a fresh model is the uninterrupted one bitwise.
    One carried beside the model (told) starts afresh on resume: it differs."""
    whole = _carried_told(tmp_path / "whole", caplog, case, "2MiB")[2]
    first = _carried_told(tmp_path / "cut", caplog, case, "2MiB", stop=3)[2]
    rest = _carried_told(tmp_path / "cut", caplog, case, "2MiB")[2]
    assert first == whole[:3] and len(rest) == 2
    assert (rest == whole[3:]) == (case == "hidden state in a buffer"), (rest, whole)


def test_a_hidden_state_that_starts_as_none_is_told(tmp_path, caplog):
    """Rule 17, out of place (helper-224): the usual loop passes `h = None` at first, and
    the GRU makes zeros for it, which the next iterations do not (they are small: the
    replays run on without them); where the record reads those zeros, the replays read
    the hidden state the iteration before made. Told, with SGD (one recording)."""
    torch.manual_seed(0)
    gru, head = torch.nn.GRU(32, 64, batch_first=True), torch.nn.Linear(64, 32)
    model = torch.nn.ModuleDict({"gru": gru, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.randn(64, 8, 32, generator=torch.Generator().manual_seed(0))
    h = None
    with outcore.OutOfCore("64MiB", state_dir=tmp_path) as ooc:
        ooc.resume(model, opt)
        with caplog.at_level("WARNING", logger="outcore"):
            for i in range(5):
                with ooc.iteration():
                    out, hn = gru(data[4 * i:4 * i + 4], h)
                    head(out).square().mean().backward()
                    opt.step()
                    opt.zero_grad()
                    h = hn.detach()
        modes = [it.mode for it in ooc.report().iterations]
    assert modes == ["record"] + ["replay"] * 4, modes
    told = [r.getMessage() for r in caplog.records if "no commit keeps" in r.getMessage()]
    assert len(told) == 1 and "1 tensor " in told[0] and "shape (1, 4, 64)" in told[0], told
