"""Fault injection, the fast versions of benchmarks/faults.py (docs/faults.md).

Every trial runs in a fresh child process, two at a time: SIGINT and SIGKILL come from
outside; a failing swap write, read or growth and a raising user hook come from inside.
Each trial checks what the harness checks: the exception the user sees, every tensor
at full size and finite, the state right after the fault, three more iterations
bitwise equal to a plain twin continued from that state, `close()`, and an empty swap
directory. A trial that could not run its checks (the fault never fired, the child
died) fails; nothing is skipped.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from .. import zygote

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("faults", ROOT / "benchmarks" / "faults.py")
faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faults)
faults.start_child = zygote.Child          # forks of one process that imported torch once

# The built-in MLP at a quarter of its width: the same ops, a fraction of the time.
SGD, ADAM = faults.parse_cfg("mlp@256:sgd:32"), faults.parse_cfg("mlp@256:adam:32")


def explain(trial: dict) -> str:
    """The trial as the harness reports it, tracebacks included."""
    trial = dict(trial)
    exc = dict(trial.get("exception") or {})
    text = exc.pop("traceback", "")
    trial["exception"] = exc
    return json.dumps(trial, indent=1, default=str)[:6000] + ("\n" + text if text else "")


def ok(trial: dict, *allowed: str) -> None:
    assert trial["outcome"] in ("ok", *allowed), explain(trial)


@pytest.fixture(scope="module")
def budgets():
    """A quarter of each step's in-core peak (data really moves)."""
    return {name: faults.budget_for(cfg, 0.25)["budget"] for name, cfg in (("sgd", SGD), ("adam", ADAM))}


SIGINT_SEEDS = range(5)
SIGKILL_SEEDS = range(5)
KILL_POINTS = [("train-pwrite", False), ("construct-1", False), ("construct-1", True), ("construct-2", True)]
# (syscall, errno, iteration, which call of it): iterations 1-2 record, 3-4 replay; "end":
# the first call after the step body returned (the reads that bring everything back).
IO_CASES = [("pwrite", "EIO", 1, 1), ("pwrite", "ENOSPC", 3, 10), ("preadv", "EIO", 2, 5),
            ("preadv", "EIO", 3, 10), ("preadv", "EIO", 3, "end"), ("posix_fallocate", "ENOSPC", 1, 1)]
HOOK_CASES = [("forward", 3), ("backward", 1), ("tensor", 4), ("opt-pre", 2), ("opt-post", 3)]


@pytest.fixture(scope="module")
def campaign(budgets):
    """Every trial of this file, each in a fresh child process, two at a time (the I/O
    error and hook trials share one child per kind), longest first."""
    cfgs = {"mlp@256:sgd:32": budgets["sgd"]}
    io = [{"cfg": "mlp@256:sgd:32", "io": f, "errno": e, **({"end_of": i} if o == "end" else
                                                            {"iteration": i, "offset": o})}
          for f, e, i, o in IO_CASES]
    hooks = [{"cfg": "mlp@256:sgd:32", "hook": k, "at": at} for k, at in HOOK_CASES]
    jobs = {"io": lambda: faults.specs_trial(io, cfgs), "hooks": lambda: faults.specs_trial(hooks, cfgs)}
    for seed in SIGINT_SEEDS:
        cfg, name = (SGD, "sgd") if seed % 2 == 0 else (ADAM, "adam")
        early = 0.15 if seed >= 3 else None      # aims at the recordings (about 0.1 s here)
        jobs[("sigint", seed)] = (lambda c=cfg, n=name, s=seed, e=early:
                                  faults.sigint_trial(c, budgets[n], 1000 + s, span_iterations=6, early_span_s=e))
    for seed in SIGKILL_SEEDS:
        jobs[("sigkill", seed)] = (lambda s=seed: faults.sigkill_trial(SGD, budgets["sgd"], 2000 + s,
                                                                       construct_s=0.7, train_s=1.3))
    for point in KILL_POINTS:
        jobs[("kill-at", point)] = (lambda p=point: faults.kill_at_trial(SGD, budgets["sgd"], p[0],
                                                                         no_tmpfile=p[1]))
    with ThreadPoolExecutor(2) as pool:
        futures = {key: pool.submit(job) for key, job in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


@pytest.mark.parametrize("seed", SIGINT_SEEDS)
def test_sigint_at_a_random_moment_loses_nothing(campaign, seed):
    trial = campaign[("sigint", seed)]
    ok(trial)
    # The checks ran on a child that was interrupted (past its recordings, but for seeds 3-4).
    assert trial["exception"]["type"] == "KeyboardInterrupt", explain(trial)
    assert trial["early"] or trial["iterations_done"] >= 3, explain(trial)


@pytest.mark.parametrize("seed", SIGKILL_SEEDS)
def test_sigkill_at_a_random_moment_leaves_no_swap(campaign, seed):
    trial = campaign[("sigkill", seed)]
    ok(trial)
    assert trial["rc"] == -9, explain(trial)


@pytest.mark.parametrize("point", KILL_POINTS, ids=lambda p: f"{p[0]}{'-no-tmpfile' if p[1] else ''}")
def test_sigkill_at_a_fixed_point_leaves_no_swap(campaign, point):
    """Right after a filesystem call of the swap file's creation, or inside a write.
    Without O_TMPFILE a named file exists for a moment whatever the code does; what a
    kill leaves there must go with the next OutOfCore over that directory."""
    trial = campaign[("kill-at", point)]
    assert trial["killed"], explain(trial)
    ok(trial, *(["leftover-swept"] if point[1] else []))


@pytest.mark.parametrize("case", range(len(IO_CASES)), ids=lambda i: "-".join(map(str, IO_CASES[i])))
def test_swap_io_error_raises_outcore_error_and_loses_nothing(campaign, case):
    func, err, iteration, offset = IO_CASES[case]
    trial = campaign["io"][case]
    # A failed read that outcore tried again and got (with a RuntimeWarning) needs no
    # exception; anything else must reach the user as OutcoreError.
    ok(trial, *(["retried"] if func == "preadv" else []))
    # Nothing is read back when an iteration ends (state stays mapped between iterations),
    # so the first read after iteration 3's step body is iteration 4's.
    fired_in = iteration + 1 if offset == "end" else iteration
    assert trial["fired"] and trial["fired"]["iteration"] == fired_in, explain(trial)
    assert trial["mode"] == ("record" if iteration <= 2 else "replay"), explain(trial)
    if trial["outcome"] == "retried":
        assert trial["warnings"] and not trial["exception"], explain(trial)
    else:
        assert trial["exception"]["is_outcore_error"], explain(trial)


@pytest.mark.parametrize("case", range(len(HOOK_CASES)), ids=lambda i: "-".join(map(str, HOOK_CASES[i])))
def test_user_hook_exception_reaches_the_user_and_loses_nothing(campaign, case):
    kind, at = HOOK_CASES[case]
    trial = campaign["hooks"][case]
    ok(trial)
    assert trial["exception"]["type"] == "HookError", explain(trial)
    assert trial["mode"] == ("record" if at <= 2 else "replay"), explain(trial)


# -- the harness's own checks can fail ----------------------------------------------------
def test_the_checks_catch_what_they_look_for(tmp_path):
    w = faults.build(SGD)
    assert faults.integrity(w) == []
    before = faults.snapshot(w)
    p = next(w.model.parameters())
    saved = p.detach().clone()
    p.untyped_storage().resize_(0)                                   # an evicted storage left behind
    assert any("storage holds 0 bytes" in x for x in faults.integrity(w))
    p.untyped_storage().resize_(saved.numel() * saved.element_size())
    with torch.no_grad():
        p.copy_(saved)
        p.view(-1)[0] = float("nan")
    assert any("non-finite" in x for x in faults.integrity(w))
    with torch.no_grad():
        p.copy_(saved)
        p.view(-1)[0] += 1e-6
    assert faults.compare(before, faults.snapshot(w), "x")             # one changed value

    class Drifting:
        """Stands in for an OutOfCore whose iterations are subtly wrong."""
        def iteration(self):
            import contextlib

            @contextlib.contextmanager
            def cm():
                yield
                with torch.no_grad():
                    next(w.model.parameters()).view(-1)[1] += 1e-6
            return cm()

        def close(self):
            pass
    outcome, problems = faults.continue_and_compare(w, SGD, Drifting(), iterations=1)
    assert outcome == "continue-mismatch" and problems
    (tmp_path / "swap").write_text("x")
    assert faults.close_and_check(Drifting(), str(tmp_path))[0] == "leftover"
    assert faults._finish({}, [("leftover", ["a"]), ("corrupted", ["b"])])["outcome"] == "corrupted"
    os.unlink(tmp_path / "swap")
