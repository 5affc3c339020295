"""Fault injection for outcore: SIGINT, SIGKILL, swap I/O errors, hook exceptions, a soak.

Each case interrupts, kills, breaks the disk under, or raises from inside a training
step run by `outcore.OutOfCore`, then checks that nothing was lost.

Every trial runs in a fresh child process (`python benchmarks/faults.py child-...`) with
its own fresh swap directory; the parent injects the fault (or the child injects it
into itself), collects one JSON line per trial and tallies outcomes.

    .venv/bin/python benchmarks/faults.py sigint 20            # SIGINT at a random moment
    .venv/bin/python benchmarks/faults.py sigkill 20           # SIGKILL at random + at fixed points
    .venv/bin/python benchmarks/faults.py io-errors            # the nth pwrite/preadv/fallocate fails
    .venv/bin/python benchmarks/faults.py hook-exceptions      # user hooks raise, each iteration kind
    .venv/bin/python benchmarks/faults.py soak 1000            # RSS, fds, threads, swap stay flat
    .venv/bin/python benchmarks/faults.py all --out docs/faults.md

`--out FILE` writes (or updates) the results table and the failure details between the
`<!-- faults:... -->` markers of FILE, one row per case; docs/faults.md describes the cases.
Exit status: 0 when every trial came out ok (or retried), 1 otherwise.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import datetime
import errno
import faulthandler
import gc
import json
import os
import random
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings

import torch

import outcore
from outcore import workloads
from outcore.plan.feasibility import min_feasible_budget

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))
OUTCORE_DIR = os.path.dirname(os.path.abspath(outcore.__file__)) + os.sep
MiB = 2**20

# Outcomes, in the order a trial's first failure is reported (the first one that applies
# names the trial; every problem found is kept in its details).
OUTCOMES = ("crash", "hang", "wrong-exception", "swallowed", "corrupted", "fault-state-mismatch",
            "continue-error", "continue-mismatch", "close-failed", "leftover", "leftover-swept",
            "not-reached", "retried", "ok")
# Outcomes that are not failures: "retried" is a failed swap read that outcore tried
# again (with a RuntimeWarning) and got, so that no exception was needed.
PASSING = ("ok", "retried")

DEFAULT_CFGS = ("mlp:sgd:64", "mlp:adam:64")


# ---------------------------------------------------------------------------------------
# Workloads and budgets
# ---------------------------------------------------------------------------------------
def parse_cfg(text: str) -> dict:
    """"mlp:sgd:64" or "resnet18:sgd:8:32" (model, optimizer, batch, image size);
    "mlp@256:sgd:32" is the built-in MLP at width 256 instead of 1024."""
    parts = text.split(":")
    cfg = {"model": parts[0], "optimizer": parts[1] if len(parts) > 1 else "sgd",
           "batch": int(parts[2]) if len(parts) > 2 else 64}
    if len(parts) > 3:
        cfg["image_size"] = int(parts[3])
    elif cfg["model"].startswith("resnet"):
        cfg["image_size"] = 32
    return cfg


def cfg_name(cfg: dict) -> str:
    return ":".join(str(cfg[k]) for k in ("model", "optimizer", "batch", "image_size") if k in cfg)


def build(cfg: dict, seed: int = 0):
    if cfg["model"].startswith("mlp@"):          # as workloads.build("mlp") does, narrower
        torch.manual_seed(seed)
        model = workloads._mlp(width=int(cfg["model"][4:]))
        spec = workloads.SPECS["mlp"]
        batch = spec.make_batch(batch=cfg["batch"], device="cpu",
                                generator=torch.Generator().manual_seed(seed + 1))
        return workloads.Workload(spec=spec, model=model, batch=batch,
                                  optimizer=workloads.OPTIMIZERS[cfg["optimizer"]](model.parameters()))
    sizes = {"image_size": cfg["image_size"]} if "image_size" in cfg else {}
    return workloads.build(cfg["model"], batch=cfg["batch"], optimizer=cfg["optimizer"], seed=seed, **sizes)


def budget_for(cfg: dict, fraction: float) -> dict:
    """A budget of `fraction` of the steady step's in-core peak (never below 1.05x the
    smallest feasible one); `fraction=0` asks for that tight budget itself."""
    w = build(cfg)
    w.step()
    with outcore.record() as rec:
        w.step()
    trace = rec.trace
    peak, low = trace.peak(actual=True)[0], min_feasible_budget(trace)
    return {"budget": max(int(low * 1.05), int(peak * fraction)), "peak": peak, "low": low}


# ---------------------------------------------------------------------------------------
# What a trial checks (run inside the child, or in-process)
# ---------------------------------------------------------------------------------------
def tensors_of(w, *, batch: bool = True) -> dict:
    """Every tensor the user can reach: parameters, buffers, gradients, optimizer state,
    and the batch (live references, not copies)."""
    out = {}
    for k, v in w.model.named_parameters():
        out[f"param.{k}"] = v
    for k, v in w.model.named_buffers():
        out[f"buffer.{k}"] = v
    for k, v in w.model.named_parameters():
        if v.grad is not None:
            out[f"grad.{k}"] = v.grad
    names = {id(p): n for n, p in w.model.named_parameters()}
    for group in w.optimizer.param_groups:
        for p in group["params"]:
            for k, v in w.optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    out[f"opt.{names.get(id(p), '?')}.{k}"] = v
    if batch:
        for i, t in enumerate(w.batch):
            out[f"batch.{i}"] = t
    return out


def snapshot(w) -> dict:
    return {k: v.detach().clone() for k, v in tensors_of(w, batch=False).items()}


def integrity(w, reference_batch=None, ooc=None) -> list[str]:
    """Problems with the tensors the user holds: storages of the wrong size (an evicted
    storage left at zero bytes), non-finite values, a batch that changed, deepcopy or
    repr that fail, a dispatch mode left on the stack, an OutOfCore stuck in an iteration."""
    problems = []
    if torch._C._len_torch_dispatch_stack():
        problems.append(f"{torch._C._len_torch_dispatch_stack()} dispatch mode(s) left on the stack "
                        "after the fault: every later op still runs through outcore")
    if ooc is not None and getattr(ooc, "_active", False):
        problems.append("ooc._active is still True: the OutOfCore thinks an iteration is running")
    for name, t in tensors_of(w).items():
        nbytes, want = t.untyped_storage().nbytes(), t.numel() * t.element_size()
        if nbytes != want:
            problems.append(f"{name}: storage holds {nbytes} bytes, the tensor needs {want}")
            continue
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            problems.append(f"{name}: non-finite values")
        if reference_batch is not None and name.startswith("batch."):
            if not torch.equal(t, reference_batch[int(name.split(".")[1])]):
                problems.append(f"{name}: the input batch changed")
    if not any(p.startswith("param.") and "storage" in p for p in problems):
        try:
            copy.deepcopy(w.model)
        except Exception as exc:  # noqa: BLE001 -- any failure is the finding
            problems.append(f"copy.deepcopy(model) raised {type(exc).__name__}: {exc}")
        try:
            for p in w.model.parameters():
                repr(p)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"repr(parameter) raised {type(exc).__name__}: {exc}")
    return problems


def compare(a: dict, b: dict, what: str) -> list[str]:
    """Bitwise differences between two name -> tensor dicts."""
    problems = []
    if a.keys() != b.keys():
        problems.append(f"{what}: tensors {sorted(a.keys() ^ b.keys())[:6]} exist in only one of them")
    differ = [k for k in a.keys() & b.keys()
              if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    if differ:
        problems.append(f"{what}: {len(differ)} tensors differ bitwise, e.g. {sorted(differ)[:4]}")
    return problems


def twin_from(w, cfg: dict):
    """A plain PyTorch copy of `w`'s exact state: parameters, buffers, gradients,
    optimizer state (deep copies of the state dicts), and the batch."""
    t = build(cfg)
    t.model.load_state_dict(copy.deepcopy(w.model.state_dict()))
    t.optimizer.load_state_dict(copy.deepcopy(w.optimizer.state_dict()))
    for p, q in zip(w.model.parameters(), t.model.parameters()):
        q.grad = None if p.grad is None else p.grad.detach().clone()
    t.batch = tuple(x.detach().clone() for x in w.batch)
    return t


def continue_and_compare(w, cfg: dict, ooc, iterations: int = 3,
                         notes: list | None = None) -> tuple[str | None, list[str]]:
    """Run `iterations` more steps on `w` under `ooc` and on a plain twin of its present
    state; returns (outcome or None, problems). If plain PyTorch itself cannot go on
    from that state (an interrupt inside Adam's lazy state creation leaves `step`
    without `exp_avg`), outcore must fail the same way; that is noted, not a failure."""
    twin = twin_from(w, cfg)
    for i in range(iterations):
        try:
            expected = twin.step().detach().clone()
        except Exception as plain_exc:  # noqa: BLE001
            try:
                with ooc.iteration():
                    w.step()
            except Exception as exc:  # noqa: BLE001
                if type(exc) is type(plain_exc) and str(exc) == str(plain_exc):
                    if notes is not None:
                        notes.append(f"plain PyTorch cannot go on from this state either: "
                                     f"{type(exc).__name__}: {exc}")
                    return None, []
                return "continue-error", [f"plain PyTorch raised {type(plain_exc).__name__}: {plain_exc} "
                                          f"in iteration {i + 1} after the fault; outcore raised "
                                          f"{type(exc).__name__}: {exc}"[:600], _where(exc)]
            return "continue-mismatch", [f"plain PyTorch raised {type(plain_exc).__name__}: {plain_exc} in "
                                         f"iteration {i + 1} after the fault; under outcore it ran"]
        try:
            with ooc.iteration():
                got = w.step()
        except BaseException as exc:  # noqa: BLE001
            return "continue-error", [f"iteration {i + 1} after the fault raised "
                                      f"{type(exc).__name__}: {exc}"[:600], _where(exc)]
        if not torch.equal(expected, got.detach()):
            return "continue-mismatch", [f"iteration {i + 1} after the fault: loss {got.item()!r} "
                                         f"under outcore, {expected.item()!r} plain"]
    problems = compare(snapshot(twin), snapshot(w), f"after {iterations} more iterations")
    return ("continue-mismatch" if problems else None), problems


def close_and_check(ooc, swap_dir: str) -> tuple[str | None, list[str]]:
    try:
        ooc.close()
    except BaseException as exc:  # noqa: BLE001
        return "close-failed", [f"ooc.close() raised {type(exc).__name__}: {exc}"[:600]]
    left = leftovers(swap_dir)
    if left:
        return "leftover", [f"left in swap_dir after close(): {left}"]
    return None, []


def left_after_kill(path: str, what: str) -> list:
    """Outcomes for what a SIGKILL left in `path`: nothing (ok), something the next
    OutOfCore built over the same directory removes (leftover-swept), or something
    that stays (leftover)."""
    left = leftovers(path)
    if not left:
        return []
    try:
        outcore.OutOfCore(budget="1GiB", swap_dir=path).close()
        after = leftovers(path)
    except Exception as exc:  # noqa: BLE001
        after = [f"(the next OutOfCore there raised {type(exc).__name__}: {exc})"]
    if not after:
        return [("leftover-swept", [f"{what} left {left}; the next OutOfCore over that directory removed it"])]
    return [("leftover", [f"{what} left {left}; still there after the next OutOfCore: {after}"])]


def leftovers(path: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(path):
        out += [os.path.relpath(os.path.join(root, n), path) + "/" for n in dirs]
        out += [os.path.relpath(os.path.join(root, n), path) for n in files]
    return sorted(out)


# -- where an exception came from --------------------------------------------------------
def _short(frame) -> str:
    path = frame.filename
    if path.startswith(OUTCORE_DIR):
        path = path[len(OUTCORE_DIR):]
    elif os.sep + "torch" + os.sep in path:
        path = "torch/" + path.rsplit(os.sep + "torch" + os.sep, 1)[1]
    else:
        path = os.path.basename(path)
    return f"{path}:{frame.name}:{frame.lineno}"


def _chain(exc) -> list:
    seen, e = [], exc
    while e is not None and all(e is not s for s in seen):
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _where(exc) -> str:
    """The innermost outcore frame of `exc`'s traceback, file:function:line."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f.filename.startswith(OUTCORE_DIR)]
    return _short(ours[-1]) if ours else "outside outcore"


def describe(exc, target=KeyboardInterrupt) -> dict:
    """Type, message, chain, and where `target` (or `exc`) was raised."""
    chain = _chain(exc)
    source = next((e for e in chain if isinstance(e, target)), exc)
    frames = traceback.extract_tb(source.__traceback__)
    return {"type": type(exc).__name__, "message": str(exc)[:400],
            "chain": [type(e).__name__ for e in chain],
            "location": _where(source), "raised_at": _where(exc),
            "frames": [_short(f) for f in frames],
            "innermost": _short(frames[-1]) if frames else "?",
            "stack": [_short(f) for f in frames if f.filename.startswith(OUTCORE_DIR)][-8:],
            "traceback": "".join(traceback.format_exception(exc))[-3000:]}


def _finish(result: dict, found: list[tuple[str, list[str]]]) -> dict:
    """Name the trial by its first failure and keep every problem."""
    problems = [p for _, ps in found for p in ps]
    outcomes = [o for o, _ in found if o]
    result["outcome"] = min(outcomes, key=OUTCOMES.index) if outcomes else "ok"
    result["failures"] = sorted(set(outcomes), key=OUTCOMES.index)
    result["problems"] = problems
    return result


def _mode(ooc) -> str:
    return "record" if ooc._record_next else "replay"          # internal; fine for a harness


# ---------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------
def _child_setup():
    faulthandler.enable()                                    # a segfault prints a traceback
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks when it hangs


def _emit(tag: str, payload) -> None:
    print(f"{tag} {json.dumps(payload)}", flush=True)


ARRIVED: dict = {}


def _on_sigint(signum, frame):
    """Python's default SIGINT handler, plus a note of where the signal arrived (outcore
    may hold a signal back and call the handler later, with the frame it arrived in)."""
    stack = traceback.extract_stack(frame) if frame is not None else []
    ours = [f for f in stack if f.filename.startswith(OUTCORE_DIR)]
    ARRIVED["arrived"] = _short(ours[-1]) if ours else (
        "outside outcore: " + _short(stack[-1]) if stack else "?")
    here = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(OUTCORE_DIR)
            and not f.filename.endswith(os.sep + "interrupts.py")]
    ARRIVED["delivered"] = _short(here[-1]) if here else "at once (not held back)"
    raise KeyboardInterrupt


def child_sigint(args) -> None:
    """Train until SIGINT, then check everything. Prints STARTED before the first
    iteration and READY <replay seconds> <seconds of the two recordings> after 3
    iterations (SGD's and Adam's lazily created state makes the first two recordings)."""
    _child_setup()
    signal.signal(signal.SIGINT, _on_sigint)
    cfg = json.loads(args.cfg)
    w = build(cfg)
    reference_batch = tuple(t.clone() for t in w.batch)
    ooc = outcore.OutOfCore(budget=args.budget, swap_dir=args.swap_dir, min_move_bytes=0)
    snap = snapshot(w)          # the state before the iteration running now
    inside, mode, done, times = False, "record", 0, []
    caught = None
    try:
        print("STARTED", flush=True)
        while done < 10**6:
            mode = _mode(ooc)
            started = time.perf_counter()
            inside = True
            with ooc.iteration():
                w.step()
            inside = False
            times.append(time.perf_counter() - started)
            done += 1
            if done == 3:       # seconds per replay, and for the two recordings together
                print(f"READY {times[2]:.4f} {times[0] + times[1]:.4f}", flush=True)
            snap = snapshot(w)
    except BaseException as exc:  # noqa: BLE001 -- the type is what we check
        caught = describe(exc)
        caught["is_keyboard_interrupt"] = type(exc) is KeyboardInterrupt
        caught.update(ARRIVED)
    gc.collect()                # the traceback's frames held the step's graph
    result = {"cfg": cfg_name(cfg), "budget": args.budget, "iterations_done": done,
              "region": mode if inside else "between", "exception": caught}
    found = []
    if caught is None or not caught["is_keyboard_interrupt"]:
        found.append(("wrong-exception", [f"caught {caught and caught['type']}: "
                                          f"{caught and caught['message']} (raised at "
                                          f"{caught and caught['raised_at']})"]))
    problems = integrity(w, reference_batch, ooc)
    if not problems:
        # No value lost: each parameter, buffer and optimizer-state tensor holds either its
        # value from before the interrupted step or the one a plain step gives. Only an
        # interrupt inside the optimizer's step may leave a tensor between the two.
        ref = build(cfg)
        ref.model.load_state_dict({k.split(".", 1)[1]: v.clone() for k, v in snap.items()
                                   if k.startswith(("param.", "buffer."))})
        _load_opt_state(ref, snap)
        ref.step()
        after = snapshot(ref)
        in_optimizer = caught is not None and any(f.startswith("torch/optim/") for f in caught["frames"])
        between = []
        for k, v in snapshot(w).items():
            if k.startswith("grad."):
                continue
            b, a = snap.get(k), after.get(k)
            if not ((b is not None and torch.equal(v, b)) or (a is not None and torch.equal(v, a))):
                between.append(k)
        result["mid_optimizer"] = in_optimizer
        result["between_values"] = len(between)
        if between and not in_optimizer:
            problems.append(f"{len(between)} tensors hold neither their value before the interrupted "
                            f"step nor after it (not interrupted inside the optimizer), e.g. {between[:4]}")
    if problems:
        found.append(("corrupted", problems))
        result["intact_after_close"] = _intact_after_close(w, reference_batch, ooc)
    else:
        result["notes"] = []
        found.append(continue_and_compare(w, cfg, ooc, notes=result["notes"]))
    found.append(close_and_check(ooc, args.swap_dir))
    _emit("RESULT", _finish(result, found))


def _load_opt_state(w, snap: dict) -> None:
    """Give a plain workload the optimizer state in `snap` (opt.<param>.<key>)."""
    params = dict(w.model.named_parameters())
    for k, v in snap.items():
        if k.startswith("opt."):
            name, key = k[4:].rsplit(".", 1)
            w.optimizer.state[params[name]][key] = v.clone()


def _refuse_tmpfile() -> None:
    """Make open(O_TMPFILE) fail with EOPNOTSUPP, as on a filesystem without it, so that
    the swap file's named fallback runs."""
    real = os.open
    flag = getattr(os, "O_TMPFILE", None)

    def no_tmpfile(path, flags, *a, **k):
        if flag is not None and flags & flag == flag:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), path)
        return real(path, flags, *a, **k)
    os.open = no_tmpfile


def child_sigkill(args) -> None:
    """Construct and close OutOfCore objects for --construct-s seconds, then train; the
    parent SIGKILLs it somewhere along the way."""
    if args.no_tmpfile:
        _refuse_tmpfile()
    cfg = json.loads(args.cfg)
    w = build(cfg)
    print("READY", flush=True)
    end, n = time.perf_counter() + args.construct_s, 0
    while time.perf_counter() < end:
        outcore.OutOfCore(budget=args.budget, swap_dir=args.swap_dir, min_move_bytes=0).close()
        n += 1
    print(f"TRAIN {n}", flush=True)
    ooc = outcore.OutOfCore(budget=args.budget, swap_dir=args.swap_dir, min_move_bytes=0)
    for i in range(10**6):
        with ooc.iteration():
            w.step()
        print(f"ITER {i + 1}", flush=True)


FS_CALLS = ("mkdir", "open", "pwrite", "write", "ftruncate", "posix_fallocate", "unlink", "rmdir",
            "rename", "replace", "link", "symlink", "close")
TRAINING_POINTS = ("posix_fallocate", "pwrite", "preadv")


def child_kill_at(args) -> None:
    """SIGKILL itself at a fixed point: right after the k-th filesystem call that
    constructing (or closing) an OutOfCore makes (`construct-K`, `close-K`), or right
    after the nth growth/write/read of training (`train-posix_fallocate`, ...). Prints
    what that call was first; `NOT KILLED <calls>` when there are fewer calls."""
    if args.no_tmpfile:
        _refuse_tmpfile()
    cfg = json.loads(args.cfg)
    w = build(cfg)
    phase, _, arg = args.point.partition("-")
    calls = {"n": 0}

    def wrap(name, limit):
        real = getattr(os, name)

        def wrapper(*a, **k):
            out = real(*a, **k)
            calls["n"] += 1
            if calls["n"] == limit:
                shown = ", ".join(repr(x).replace(os.path.realpath(args.swap_dir), "$SWAP_DIR")
                                  .replace(args.swap_dir, "$SWAP_DIR")[:60]
                                  for x in a if not isinstance(x, (bytes, memoryview, list)))
                os.write(1, f"CALL os.{name}({shown})\n".encode())
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        setattr(os, name, wrapper)
        return real

    if phase in ("construct", "close"):
        limit = int(arg)
        if phase == "close":
            ooc = outcore.OutOfCore(budget=args.budget, swap_dir=args.swap_dir, min_move_bytes=0)
        saved = {name: wrap(name, limit) for name in FS_CALLS if hasattr(os, name)}
        if phase == "construct":
            ooc = outcore.OutOfCore(budget=args.budget, swap_dir=args.swap_dir, min_move_bytes=0)
        else:
            ooc.close()
        for name, real in saved.items():
            setattr(os, name, real)
        print(f"NOT KILLED {calls['n']}", flush=True)
        ooc.close()
        return
    ooc = outcore.OutOfCore(budget=args.budget, swap_dir=args.swap_dir, min_move_bytes=0)
    wrap(arg, args.n)
    for _ in range(6):
        with ooc.iteration():
            w.step()
    print(f"NOT KILLED {calls['n']}", flush=True)


# -- io errors ---------------------------------------------------------------------------
IO_FUNCS = ("pwrite", "preadv", "posix_fallocate")


class Fault:
    """Makes `outcore.run.movers.disk.os.<func>` raise OSError(err) on its nth call
    (and, if sticky, every later call) until removed. `disk.os` is the os module: the
    counter sees every caller in the process, which during a step is the mover alone."""

    def __init__(self, func: str, err: int, n: int, sticky: bool = False, gated: bool = False):
        """`gated`: count (toward n) only the calls made after `opened` is set to True."""
        from outcore.run.movers import disk
        self.module, self.func, self.err, self.n, self.sticky = disk.os, func, err, n, sticky
        self.real = getattr(disk.os, func)
        self.opened = not gated
        self.calls = 0              # calls counted toward n
        self.all_calls = 0
        self.fired_at: list[dict] = []
        self.iteration = 0          # set by the loop: which iteration a call belongs to
        self.calls_by_iteration = collections.Counter()
        self._lock = threading.Lock()

    def __enter__(self):
        setattr(self.module, self.func, self._call)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.func, self.real)

    def _call(self, *a, **k):
        with self._lock:
            self.all_calls += 1
            self.calls_by_iteration[self.iteration] += 1
            self.calls += self.opened
            fire = self.opened and self.n > 0 and (self.calls == self.n or (self.sticky and self.calls > self.n))
            if fire and not self.fired_at:
                stack = [_short(f) for f in traceback.extract_stack()[:-1]
                         if f.filename.startswith(OUTCORE_DIR)]
                self.fired_at.append({"call": self.calls, "iteration": self.iteration,
                                      "where": stack[-1] if stack else "?",
                                      "thread": threading.current_thread().name})
        if fire:
            raise OSError(self.err, os.strerror(self.err))
        return self.real(*a, **k)


def count_calls(cfg: dict, budget: int, func: str, iterations: int = 4) -> dict:
    """How many times each iteration calls `func` (no failure injected)."""
    w = build(cfg)
    swap = tempfile.mkdtemp(prefix="faults-count-")
    ooc = outcore.OutOfCore(budget=budget, swap_dir=swap, min_move_bytes=0)
    modes = []
    try:
        with Fault(func, errno.EIO, 0) as fault:
            for k in range(1, iterations + 1):
                fault.iteration = k
                modes.append(_mode(ooc))
                with ooc.iteration():
                    w.step()
            fault.iteration = iterations + 1
            ooc.close()
    finally:
        shutil.rmtree(swap, ignore_errors=True)
    return {"calls": {k: fault.calls_by_iteration[k] for k in range(1, iterations + 2)}, "modes": modes}


def io_positions(counts: dict, per_iteration: int) -> list[int]:
    """Call numbers spread over every iteration (and close()): per_iteration of them
    evenly from its first call to its last."""
    out, start = set(), 0
    for k in sorted(counts):
        n = counts[k]
        if n:
            per = max(1, min(per_iteration, n))
            out |= {start + 1 + (round(i * (n - 1) / (per - 1)) if per > 1 else 0) for i in range(per)}
        start += n
    return sorted(out)


def io_trial(cfg: dict, budget: int, func: str, err: int, n: int, *, sticky: bool = False,
             end_of: int | None = None, iterations: int = 5, swap_root: str | None = None) -> dict:
    """Fail the nth call of `func` (with `end_of`: the nth after the step body of that
    iteration returned, i.e. in the iteration's end, which brings everything back);
    expect OutcoreError, intact tensors, a working close(), and training that goes on
    bitwise equal to a plain twin."""
    swap = tempfile.mkdtemp(prefix="faults-io-", dir=swap_root)
    w = build(cfg)
    reference_batch = tuple(t.clone() for t in w.batch)
    ooc = outcore.OutOfCore(budget=budget, swap_dir=swap, min_move_bytes=0)
    started = {"optimizer": False}
    hook = w.optimizer.register_step_pre_hook(lambda *a: started.__setitem__("optimizer", True))
    result = {"case": f"{func} {errno.errorcode[err]}{' sticky' if sticky else ''}", "cfg": cfg_name(cfg),
              "n": n if end_of is None else f"{n} after the step body of iteration {end_of}",
              "budget": budget}
    caught, before, found = None, None, []
    seen_warnings = warnings.catch_warnings(record=True)
    try:
        with seen_warnings as warned, Fault(func, err, n, sticky, gated=end_of is not None) as fault:
            warnings.simplefilter("always")
            for k in range(1, iterations + 1):
                fault.iteration = k
                before, started["optimizer"] = snapshot(w), False
                result["mode"] = _mode(ooc)
                try:
                    with ooc.iteration():
                        w.step()
                        if k == end_of:
                            fault.opened = True
                except BaseException as exc:  # noqa: BLE001
                    caught = describe(exc, target=BaseException)
                    caught["is_outcore_error"] = isinstance(exc, outcore.OutcoreError)
                    result["iteration"] = k
                    break
                if fault.fired_at:          # the failure did not surface in this iteration
                    result["iteration"] = k
                    break
        # The functions are restored from here on.
        hook.remove()
        gc.collect()
        result["fired"] = fault.fired_at[0] if fault.fired_at else None
        result["exception"] = caught
        result["warnings"] = [f"{w.category.__name__}: {w.message}"[:300] for w in warned
                              if issubclass(w.category, RuntimeWarning)]
        if not fault.fired_at:
            found.append(("not-reached", [f"only {fault.calls} counted calls to {func} in {iterations} iterations"]))
        elif caught is None:
            if result["warnings"]:
                found.append(("retried", []))
            else:
                found.append(("swallowed", [f"{func} failed at call {n} ({fault.fired_at[0]['where']}), "
                                            "no exception reached the user and nothing warned"]))
        elif not caught["is_outcore_error"]:
            found.append(("wrong-exception", [f"{caught['type']}: {caught['message']} at {caught['location']}"]))
        problems = integrity(w, reference_batch, ooc)
        if not problems and caught is not None and not started["optimizer"]:
            now = snapshot(w)
            problems += compare({k: v for k, v in before.items() if not k.startswith("grad.")},
                                {k: v for k, v in now.items() if not k.startswith("grad.")},
                                "parameters/optimizer state changed though the optimizer had not started")
        result["optimizer_started"] = started["optimizer"]
        if problems:
            found.append(("corrupted", problems))
            result["intact_after_close"] = _intact_after_close(w, reference_batch, ooc)
        else:
            found.append(continue_and_compare(w, cfg, ooc))
        found.append(close_and_check(ooc, swap))
    finally:
        hook.remove()
        try:
            ooc.close()
        except BaseException:  # noqa: BLE001 -- reported above
            pass
        shutil.rmtree(swap, ignore_errors=True)
    return _finish(result, found)


def _intact_after_close(w, reference_batch, ooc) -> str:
    """Whether close() (which restores everything) brings a corrupted state back."""
    try:
        ooc.close()
    except BaseException as exc:  # noqa: BLE001
        return f"close() raised {type(exc).__name__}"
    left = integrity(w, reference_batch, None)
    return "yes" if not left else f"no: {left[0]}"


def child_io(args) -> None:
    """--ns: call numbers, or [k, n] for the nth call after iteration k's step body."""
    _child_setup()
    cfg = json.loads(args.cfg)
    for n in json.loads(args.ns):
        end_of, n = n if isinstance(n, list) else (None, n)
        _emit("RESULT", io_trial(cfg, args.budget, args.func, getattr(errno, args.errno), n,
                                 sticky=args.sticky, end_of=end_of, swap_root=args.swap_dir))


# -- hook exceptions -----------------------------------------------------------------------
HOOK_KINDS = ("forward", "backward", "tensor", "opt-pre", "opt-post")


class HookError(Exception):
    """What the user's hook raises."""


def _install_hook(w, kind: str, armed: dict, raised: list):
    def boom(*_):
        if armed["on"]:
            armed["on"] = False
            exc = HookError(f"user {kind} hook failed on purpose")
            raised.append(exc)
            raise exc
    layers = [m for m in w.model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    layer = layers[len(layers) // 2]
    if kind == "forward":
        return layer.register_forward_hook(boom)
    if kind == "backward":
        return layer.register_full_backward_hook(boom)
    if kind == "tensor":
        return next(layer.parameters()).register_hook(lambda g: boom())
    if kind == "opt-pre":
        return w.optimizer.register_step_pre_hook(boom)
    if kind == "opt-post":
        return w.optimizer.register_step_post_hook(boom)
    raise ValueError(kind)


def hook_trial(cfg: dict, budget: int, kind: str, at: int, *, swap_root: str | None = None) -> dict:
    """A user hook raises in iteration `at` (1-based). The same happens to a plain twin:
    the state right after the exception must match it bitwise, and training must go on
    bitwise equal to a plain twin of that state."""
    swap = tempfile.mkdtemp(prefix="faults-hook-", dir=swap_root)
    w, plain = build(cfg), build(cfg)
    reference_batch = tuple(t.clone() for t in w.batch)
    ooc = outcore.OutOfCore(budget=budget, swap_dir=swap, min_move_bytes=0)
    armed_w, armed_p, raised_w, raised_p = {"on": False}, {"on": False}, [], []
    handles = [_install_hook(w, kind, armed_w, raised_w), _install_hook(plain, kind, armed_p, raised_p)]
    result = {"case": kind, "cfg": cfg_name(cfg), "at": at, "budget": budget}
    found, caught, plain_exc = [], None, None
    try:
        for k in range(1, at + 1):
            armed_w["on"] = armed_p["on"] = k == at
            try:
                plain.step()
            except HookError as exc:
                plain_exc = exc
            result["mode"] = _mode(ooc)
            try:
                with ooc.iteration():
                    w.step()
            except BaseException as exc:  # noqa: BLE001
                caught = describe(exc, target=BaseException)
                caught["is_it"] = bool(raised_w) and exc is raised_w[-1]
                caught["same_type_message"] = (type(exc) is HookError and bool(raised_w)
                                               and str(exc) == str(raised_w[-1]))
                break
        for h in handles:
            h.remove()
        gc.collect()
        result["exception"] = caught
        if plain_exc is None:
            found.append(("not-reached", ["the hook did not raise in the plain twin"]))
        if caught is None:
            found.append(("swallowed", ["the hook raised but no exception reached the user"]))
        elif not caught["same_type_message"]:
            found.append(("wrong-exception", [f"{caught['type']}: {caught['message']} at {caught['location']}"]))
        problems = integrity(w, reference_batch, ooc)
        if problems:
            found.append(("corrupted", problems))
            result["intact_after_close"] = _intact_after_close(w, reference_batch, ooc)
        else:
            found.append(("fault-state-mismatch", compare(snapshot(plain), snapshot(w),
                                                          "state right after the exception")))
            found.append(continue_and_compare(w, cfg, ooc))
        found.append(close_and_check(ooc, swap))
    finally:
        for h in handles:
            h.remove()
        try:
            ooc.close()
        except BaseException:  # noqa: BLE001
            pass
        shutil.rmtree(swap, ignore_errors=True)
    found = [(o if ps else None, ps) for o, ps in found]
    return _finish(result, found)


def child_hooks(args) -> None:
    _child_setup()
    cfg = json.loads(args.cfg)
    for at in json.loads(args.ats):
        _emit("RESULT", hook_trial(cfg, args.budget, args.kind, at, swap_root=args.swap_dir))


# -- a list of in-process trials, in one child -----------------------------------------------
def run_specs(specs: list[dict], budgets: dict, swap_root: str | None = None):
    """Yield the result of each spec: {"io": func, "errno": name, "n": n} (or
    "iteration"/"offset" instead of "n": that call of that iteration, counted first; or
    "end_of": k, with "n" counted from the end of iteration k's step body), or
    {"hook": kind, "at": iteration}; "cfg" names a workload in `budgets`."""
    counted = {}
    for spec in specs:
        cfg, budget = parse_cfg(spec["cfg"]), budgets[spec["cfg"]]
        if "hook" in spec:
            yield {**hook_trial(cfg, budget, spec["hook"], spec["at"], swap_root=swap_root), "spec": spec}
            continue
        n = spec.get("n")
        if spec.get("end_of"):
            yield {**io_trial(cfg, budget, spec["io"], getattr(errno, spec["errno"]), n or 1,
                              end_of=spec["end_of"], swap_root=swap_root), "spec": spec}
            continue
        if n is None:
            key = (spec["cfg"], spec["io"])
            if key not in counted:
                counted[key] = count_calls(cfg, budget, spec["io"])["calls"]
            calls = counted[key]
            before = sum(calls[k] for k in range(1, spec["iteration"]))
            n = before + max(1, min(spec["offset"], calls[spec["iteration"]]))
        yield {**io_trial(cfg, budget, spec["io"], getattr(errno, spec["errno"]), n, swap_root=swap_root),
               "spec": spec}


def child_trials(args) -> None:
    _child_setup()
    for result in run_specs(json.loads(args.specs), json.loads(args.budgets), args.swap_dir):
        _emit("RESULT", result)


def specs_trial(specs: list[dict], budgets: dict, timeout: float = 600) -> list[dict]:
    """Run `specs` (see run_specs) in one fresh child; one result per spec."""
    return _batch_child(["child-trials", "--specs", json.dumps(specs), "--budgets", json.dumps(budgets),
                         "--budget", "0"], len(specs), timeout, {"case": "trials"})


# -- soak --------------------------------------------------------------------------------
SOAK_EVERY, SOAK_WARMUP = 50, 100      # iterations between samples; before the baseline


def _sample(ooc) -> dict:
    with open("/proc/self/statm") as fh:
        rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    threads = 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
    return {"rss": rss, "fds": len(os.listdir("/proc/self/fd")), "py_threads": threading.active_count(),
            "os_threads": threads, "swap_in_use": ooc._mover.allocator.in_use,
            "swap_file": ooc._mover.file_bytes, "entries": len(ooc._res.entries)}


def child_soak(args) -> None:
    _child_setup()
    cfg = json.loads(args.cfg)
    w = build(cfg)
    ooc = outcore.OutOfCore(budget=args.budget, swap_dir=args.swap_dir, min_move_bytes=0)
    started = time.perf_counter()
    for i in range(1, args.iterations + 1):
        with ooc.iteration():
            w.step()
        if i % args.every == 0 or i == args.iterations:
            _emit("SAMPLE", {"iteration": i, "seconds": time.perf_counter() - started, **_sample(ooc)})
    report = ooc.report()
    ooc.close()
    _emit("RESULT", {"modes": collections.Counter(it.mode for it in report.iterations),
                     "deviations": report.deviations, "leftover": leftovers(args.swap_dir),
                     "bytes_written_last": report.iterations[-1].bytes_written})


# ---------------------------------------------------------------------------------------
# Parent side: run children, tally
# ---------------------------------------------------------------------------------------
def start_child(argv: list[str], **popen) -> subprocess.Popen:
    """A fresh Python running `argv`. The tests swap in tests/zygote.py's forked children,
    which skip importing torch again and behave alike for everything a trial looks at."""
    return subprocess.Popen([sys.executable, *argv], **popen)


def _spawn(argv: list[str]) -> tuple[subprocess.Popen, str]:
    err = tempfile.NamedTemporaryFile("w", prefix="faults-stderr-", delete=False)
    errpath = err.name
    proc = start_child([HERE, *argv], stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
                       start_new_session=True)
    err.close()
    return proc, errpath


def _readline(proc, timeout: float) -> str | None:
    """One line of the child's stdout, or None on timeout or end of output."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            return None
        line = proc.stdout.readline()
        return line if line else None
    finally:
        sel.close()


def _stderr_tail(path: str, lines: int = 25) -> str:
    try:
        with open(path) as fh:
            text = fh.read()
        os.unlink(path)
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _reap(proc, errpath: str, timeout: float) -> tuple[str, int | None, str, bool]:
    """Wait for the child; on timeout dump its threads' stacks (SIGUSR1) and kill it."""
    hung = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = True
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        out, _ = proc.communicate()
    return out or "", proc.returncode, _stderr_tail(errpath, 60 if hung else 25), hung


def _results(out: str) -> list[dict]:
    return [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]


def _signame(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except (ValueError, TypeError):
        return str(rc)


def sigint_trial(cfg: dict, budget: int, seed: int, *, span_iterations: float = 8.0,
                 early_span_s: float | None = None, timeout: float = 60.0) -> dict:
    """One child: train, SIGINT after a uniform random delay covering `span_iterations`
    iterations past the third, then the child checks itself. With `early_span_s` the
    delay is instead up to that many seconds from the first iteration's start, so that
    the interrupt lands in the recording iterations."""
    rng = random.Random(seed)
    swap = tempfile.mkdtemp(prefix="faults-sigint-")
    proc, errpath = _spawn(["child-sigint", "--cfg", json.dumps(cfg), "--budget", str(budget),
                            "--swap-dir", swap])
    result = {"seed": seed, "cfg": cfg_name(cfg), "budget": budget, "early": early_span_s is not None}
    with _reaped(proc, swap):
        wanted = "STARTED" if early_span_s is not None else "READY"
        line = None
        while line is None or not line.startswith(wanted):
            line = _readline(proc, 180)
            if line is None:
                out, rc, err, hung = _reap(proc, errpath, 10)
                return _finish(result, [("crash", [f"no {wanted} (rc {rc}): {err[-1500:]}"])])
        if early_span_s is not None:
            delay = rng.uniform(0, early_span_s)
        else:
            per_iteration, recordings = map(float, line.split()[1:3])
            delay = rng.uniform(0, span_iterations * per_iteration)
            result.update(seconds_per_iteration=per_iteration, seconds_recording=recordings)
        result["delay"] = round(delay, 3)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, rc, err, hung = _reap(proc, errpath, timeout)
        found = _child_status(rc, hung, err, out)
        got = _results(out)
        if got:
            result.update(got[0])
            found += [(o, []) for o in got[0]["failures"]] + [(None, got[0]["problems"])]
        left = leftovers(swap)
        if left:
            found.append(("leftover", [f"left in swap_dir after the child exited: {left}"]))
        if not got and not found:
            found.append(("crash", [f"no result (rc {rc}): {err[-1500:]}"]))
        return _finish(result, found)



@contextlib.contextmanager
def _reaped(proc, swap: str):
    """Whatever a trial does, its child is gone and its swap_dir removed afterwards."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(swap, ignore_errors=True)


def _child_status(rc, hung, err, out) -> list:
    if hung:
        return [("hang", [f"no result after the fault; thread stacks:\n{err}"])]
    if rc is not None and rc < 0:
        return [("crash", [f"child died of {_signame(rc)}:\n{err}"])]
    if rc not in (0, None) and not _results(out):
        return [("crash", [f"child exited {rc}:\n{err}"])]
    return []


def sigkill_trial(cfg: dict, budget: int, seed: int, *, construct_s: float = 1.0,
                  train_s: float = 2.0, timeout: float = 120.0, no_tmpfile: bool = False) -> dict:
    """One child: constructs/closes OutOfCore objects for `construct_s`, then trains; it
    is SIGKILLed after a uniform random delay over both phases. `no_tmpfile`: open with
    O_TMPFILE fails in the child (the named fallback runs)."""
    rng = random.Random(seed)
    swap = tempfile.mkdtemp(prefix="faults-sigkill-")
    proc, errpath = _spawn(["child-sigkill", "--cfg", json.dumps(cfg), "--budget", str(budget),
                            "--swap-dir", swap, "--construct-s", str(construct_s)]
                           + (["--no-tmpfile"] if no_tmpfile else []))
    result = {"seed": seed, "cfg": cfg_name(cfg), "no_tmpfile": no_tmpfile}
    with _reaped(proc, swap):
        line = _readline(proc, timeout)
        if line is None or not line.startswith("READY"):
            out, rc, err, _ = _reap(proc, errpath, 10)
            return _finish(result, [("crash", [f"no READY (rc {rc}): {err[-1500:]}"])])
        delay = rng.uniform(0, construct_s + train_s)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        out, rc, err, _ = _reap(proc, errpath, timeout)
        lines = out.splitlines()
        trained = [l for l in lines if l.startswith("ITER")]
        result.update(delay=round(delay, 3), rc=rc,
                      phase=("construct" if not any(l.startswith("TRAIN") for l in lines)
                             else f"train (after {len(trained)} iterations)")
                      + (" without O_TMPFILE" if no_tmpfile else ""))
        found = []
        if rc != -signal.SIGKILL:
            found.append(("not-reached", [f"child exited {rc} before the kill: {err[-800:]}"]))
        found += left_after_kill(swap, f"SIGKILL during {result['phase']}")
        return _finish(result, found)


def kill_at_trial(cfg: dict, budget: int, point: str, n: int = 3, timeout: float = 120.0,
                  no_tmpfile: bool = False) -> dict:
    swap = tempfile.mkdtemp(prefix="faults-killat-")
    proc, errpath = _spawn(["child-kill-at", "--cfg", json.dumps(cfg), "--budget", str(budget),
                            "--swap-dir", swap, "--point", point, "--n", str(n)]
                           + (["--no-tmpfile"] if no_tmpfile else []))
    with _reaped(proc, swap):
        out, rc, err, hung = _reap(proc, errpath, timeout)
        call = next((l[5:] for l in out.splitlines() if l.startswith("CALL ")), None)
        result, found = {"point": point, "call": call, "rc": rc, "killed": call is not None}, []
        if "NOT KILLED" in out:
            result["calls"] = int(out.split("NOT KILLED")[1].split()[0])
        elif rc != -signal.SIGKILL:
            found.append(("crash", [f"child exited {rc}: {err[-800:]}"]))
        found += left_after_kill(swap, "the kill")
        return _finish(result, found)


def kill_at_points(cfg: dict, budget: int, limit: int = 40, no_tmpfile: bool = False,
                   training: bool = True) -> list[dict]:
    """Every filesystem call of constructing and of closing an OutOfCore, then the 3rd
    growth, write and read of training."""
    out = []
    for phase in ("construct", "close"):
        for k in range(1, limit + 1):
            t = kill_at_trial(cfg, budget, f"{phase}-{k}", no_tmpfile=no_tmpfile)
            if not t["killed"]:
                break
            out.append(t)
    for func in TRAINING_POINTS if training else ():
        out.append(kill_at_trial(cfg, budget, f"train-{func}", n=3, no_tmpfile=no_tmpfile))
    return out


def _batch_child(argv: list[str], expected: int, timeout: float, label: dict) -> list[dict]:
    """A child that prints one RESULT per trial; trials it never reported are crashes/hangs."""
    swap = tempfile.mkdtemp(prefix="faults-batch-")
    proc, errpath = _spawn([*argv, "--swap-dir", swap])
    with _reaped(proc, swap):
        out, rc, err, hung = _reap(proc, errpath, timeout)
        got = _results(out)
        if len(got) < expected:
            status = _child_status(rc, hung, err, out) or [("crash", [f"child exited {rc}:\n{err}"])]
            got.append(_finish({**label, "trial": len(got)}, status))
            got += [_finish({**label, "trial": i}, [("crash", ["not run: an earlier trial in the same "
                                                               "child crashed or hung"])])
                    for i in range(len(got), expected)]
        left = leftovers(swap)
        if left:
            got[-1] = _finish(got[-1], [(o, []) for o in got[-1]["failures"]]
                              + [(None, got[-1]["problems"]),
                                 ("leftover", [f"left in the child's swap_dir: {left}"])])
        return got


# ---------------------------------------------------------------------------------------
# Tables and the doc
# ---------------------------------------------------------------------------------------
def counts(results: list[dict]) -> str:
    c = collections.Counter(r["outcome"] for r in results)
    return ", ".join(f"{o} {c[o]}" for o in OUTCOMES if c[o])


def row(case: str, injected: str, results: list[dict], extra: str = "") -> dict:
    return {"case": case, "injected": injected, "trials": len(results),
            "outcome": counts(results) + (f" ({extra})" if extra else ""), "results": results}


def print_rows(rows: list[dict]) -> None:
    print()
    print("| case | what is injected | trials | outcome |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['injected']} | {r['trials']} | {r['outcome']} |")


def failure_lines(rows: list[dict], limit: int = 12) -> list[str]:
    """Markdown bullets: each failing trial, its outcome, where, and the first problems."""
    out = []
    for r in rows:
        bad = [t for t in r["results"] if t["outcome"] not in PASSING]
        if not bad:
            continue
        out.append(f"- **{r['case']}**: {len(bad)} of {len(r['results'])} trials failed")
        groups = collections.defaultdict(list)
        for t in bad:
            groups[(t["outcome"], re.sub(r":\d+\b", "", _trial_where(t)))].append(t)
        for (outcome, where), ts in list(groups.items())[:limit]:
            ids = ", ".join(_trial_id(t) for t in ts[:6]) + (" ..." if len(ts) > 6 else "")
            out.append(f"  - {outcome} x{len(ts)} ({ids}){' — ' + where if where else ''} — "
                       f"{'e.g. ' if len(ts) > 1 else ''}{_first_problem(ts[0])}")
    return out


def _trial_id(t: dict) -> str:
    if t.get("call"):
        return f"{t['point']}: right after {t['call']}"
    for key in ("seed", "n", "at", "point", "trial"):
        if key in t:
            return f"{key} {t[key]}" + (f" {t['mode']}" if "mode" in t and key in ("n", "at") else "")
    return "?"


def _trial_where(t: dict) -> str:
    exc = t.get("exception") or {}
    parts = []
    if t.get("fired"):
        parts.append(f"fault in {t['fired']['where']} (iteration {t['fired']['iteration']})")
    if exc.get("arrived"):
        parts.append(f"signal arrived at {exc['arrived']}, delivered at {exc.get('delivered')}")
    if exc:
        path = " > ".join(f.rsplit(":", 1)[0].split("/")[-1] for f in exc.get("stack", [])[-4:])
        parts.append(f"{exc['type']} from {exc['raised_at']}" + (f" (via {path})" if path else ""))
    if t.get("intact_after_close"):
        parts.append(f"intact after close(): {t['intact_after_close']}")
    if "region" in t:
        parts.append(f"landed in {t['region']}")
    return "; ".join(parts)


def _first_problem(t: dict) -> str:
    ps = t.get("problems") or []
    text = ps[0] if ps else ""
    if len(ps) > 1:
        text += f" (+{len(ps) - 1} more)"
    return text.replace("\n", " ")[:400]


def sigint_regions(results: list[dict]) -> str:
    regions = collections.Counter(t.get("region", "?") for t in results)
    return "landed in " + ", ".join(f"{k} {v}" for k, v in regions.most_common())


def sigint_locations(results: list[dict]) -> str:
    """Where the interrupts landed: region (record/replay/between) and innermost outcore frame."""
    regions = collections.Counter(t.get("region", "?") for t in results)
    frames = collections.Counter(_frame_key(t) for t in results)
    return ("regions: " + ", ".join(f"{k} {v}" for k, v in regions.most_common())
            + "; innermost outcore frame when the signal arrived: " + ", ".join(f"{k} {v}" for k, v in frames.most_common()))


def _frame_key(t: dict) -> str:
    exc = t.get("exception") or {}
    loc = exc.get("arrived") or exc.get("location", "?")
    return loc.rsplit(":", 1)[0] if loc.count(":") >= 2 else loc


def measured_on() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"commit {head}" + (" plus uncommitted changes in src/ (executor work in progress)" if dirty else "")


TABLE = ("<!-- faults:table -->", "<!-- /faults:table -->")
DETAILS = ("<!-- faults:details -->", "<!-- /faults:details -->")
CASE_ORDER = ("sigint", "sigkill", "sigkill at", "io", "hook", "soak")


def update_doc(path: str, rows: list[dict], command: str, date: str, extra_md: list[str] = ()) -> None:
    """Put `rows` into the results table of `path` (replacing rows of the same case) and
    this run's details block (replacing the previous run's of the same command name)."""
    text = open(path).read() if os.path.exists(path) else "# Fault injection\n"
    if TABLE[0] not in text:
        text += (f"\n## Results\n\n{TABLE[0]}\n| case | what is injected | trials | outcome |\n"
                 f"|---|---|---|---|\n{TABLE[1]}\n\n{DETAILS[0]}\n{DETAILS[1]}\n")
    head, rest = text.split(TABLE[0], 1)
    body, tail = rest.split(TABLE[1], 1)
    lines = [l for l in body.strip().splitlines() if l.startswith("|")]
    header, existing = lines[:2], lines[2:]
    mine = {r["case"] for r in rows}
    kept = [l for l in existing if l.split("|")[1].strip() not in mine]
    new = kept + [f"| {r['case']} | {r['injected']} | {r['trials']} | {r['outcome']} |" for r in rows]
    new.sort(key=lambda l: next((i for i, p in enumerate(CASE_ORDER) if l.split("|")[1].strip().startswith(p)),
                                len(CASE_ORDER)))
    text = head + TABLE[0] + "\n" + "\n".join(header + new) + "\n" + TABLE[1] + tail
    # A run's block is keyed by its command without --out/--date: rerunning it replaces it.
    name = re.sub(r"\s+--(out|date)\s+\S+", "", command).split("faults.py", 1)[-1].strip()
    name = re.sub(r"[^A-Za-z0-9@:/._]+", "-", name)
    block = [f"<!-- run:{name} -->", f"`{command}` — {date}, {measured_on()}, this machine "
             f"({os.cpu_count()} CPU cores, torch {torch.__version__}):", ""]
    block += list(extra_md) + (failure_lines(rows) or ["- every trial ok"]) + [f"<!-- /run:{name} -->"]
    head, rest = text.split(DETAILS[0], 1)
    body, tail = rest.split(DETAILS[1], 1)
    body = re.sub(rf"<!-- run:{re.escape(name)} -->.*?<!-- /run:{re.escape(name)} -->\n?", "", body, flags=re.S)
    body = body.strip("\n") + ("\n\n" if body.strip() else "") + "\n".join(block) + "\n"
    text = head + DETAILS[0] + "\n" + body.lstrip("\n") + DETAILS[1] + tail
    with open(path, "w") as fh:
        fh.write(text)


# ---------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------
def _budgets(cfgs: list[dict], fractions: list[float]) -> list[tuple[dict, float, int]]:
    out = []
    for cfg in cfgs:
        for fraction in fractions:
            b = budget_for(cfg, fraction)
            print(f"# {cfg_name(cfg)}: in-core peak {b['peak'] / MiB:.1f} MiB, smallest feasible "
                  f"{b['low'] / MiB:.1f} MiB; budget at {fraction:g} of the peak: {b['budget'] / MiB:.1f} MiB",
                  flush=True)
            out.append((cfg, fraction, b["budget"]))
    return out


def run_sigint(args) -> list[dict]:
    configs = _budgets([parse_cfg(c) for c in args.cfg], args.fractions)
    results, recording = [], {}
    for i in range(args.trials):
        cfg, fraction, budget = configs[i % len(configs)]
        # Every `--early`-th round over the configurations aims at the two recording
        # iterations (as long as they took in an earlier trial of the same configuration);
        # the other trials at the replays after them.
        key = (cfg_name(cfg), fraction)
        early = args.early > 0 and (i // len(configs)) % args.early == args.early - 1 and key in recording
        t = sigint_trial(cfg, budget, args.seed + i, span_iterations=args.span,
                         early_span_s=recording[key] if early else None)
        t["fraction"] = fraction
        if "seconds_recording" in t:
            recording[key] = t["seconds_recording"]
        results.append(t)
        exc = t.get("exception") or {}
        print(f"sigint {i + 1}/{args.trials} {cfg_name(cfg)} budget {fraction:g}: {t['outcome']} "
              f"(after {t.get('iterations_done', '?')} iterations, +{t.get('delay', '?')} s, "
              f"landed in {t.get('region', '?')}; arrived at {exc.get('arrived', '?')}, raised at "
              f"{exc.get('raised_at', '?')})", flush=True)
    r = row("sigint", f"SIGINT at a uniform random moment: over the {args.span:g} iterations after the "
                      "first 3 (two recordings, a replay)"
                      + (f", or (every {args.early}th round over the configurations) over the two "
                         "recordings" if args.early else ""),
            results, sigint_regions(results))
    r["extra_md"] = [f"- sigint landed: {sigint_locations(results)}"]
    return [r]


def run_sigkill(args) -> list[dict]:
    (cfg, _, budget), = _budgets([parse_cfg(args.cfg[0])], [args.fractions[0]])
    results = []
    for i in range(args.trials):
        t = sigkill_trial(cfg, budget, args.seed + i, no_tmpfile=i % 2 == 1)
        results.append(t)
        print(f"sigkill {i + 1}/{args.trials}: {t['outcome']} (+{t.get('delay')} s, {t.get('phase')})", flush=True)
    phases = collections.Counter(t.get("phase", "?").split(" ")[0] for t in results)
    rows = [row("sigkill", "SIGKILL at a uniform random moment while constructing/closing "
                           "OutOfCore objects (1 s) or training (2 s); every other trial without "
                           "O_TMPFILE (the named fallback); swap_dir must be empty",
                results, ", ".join(f"{k} {v}" for k, v in phases.items()))]
    if not args.no_points:
        for no_tmpfile in (False, True):
            at = kill_at_points(cfg, budget, no_tmpfile=no_tmpfile, training=not no_tmpfile)
            for t in at:
                print(f"sigkill at {t['point']} {t['call'] or ''}{' (no O_TMPFILE)' if no_tmpfile else ''}: "
                      f"{t['outcome']}{'' if t['killed'] else ' (not reached)'}", flush=True)
            leaked = [f"{t['point']} ({(t['call'] or '?').split('(')[0]})" for t in at
                      if t["outcome"].startswith("leftover")]
            rows.append(row("sigkill at fixed points" + (", no O_TMPFILE" if no_tmpfile else ""),
                            "SIGKILL right after each filesystem call (os.open, mkdir, pwrite, unlink, "
                            "rmdir, close, ...) that constructing or closing an OutOfCore makes"
                            + (", with open(O_TMPFILE) failing (EOPNOTSUPP) so the named fallback runs"
                               if no_tmpfile else ", and after the 3rd fallocate/pwrite/preadv of training"),
                            at, "leaked after: " + ("; ".join(leaked) or "none")))
    return rows


def run_io(args) -> list[dict]:
    cfg = parse_cfg(args.cfg[0])
    (_, fraction, budget), = _budgets([cfg], [args.fractions[0]])
    rows = []
    combos = [c.split("/") for c in args.combos]
    for func, errname in combos:
        counted = count_calls(cfg, budget, func)
        ns = io_positions(counted["calls"], args.per_iteration)
        # Reads also come at each iteration's end (everything is brought back): fail the
        # first one after the step body returned, in each iteration.
        ends = [[k, 1] for k in range(1, 5)] if func == "preadv" else []
        print(f"# {func}: calls per iteration {counted['calls']} (modes {counted['modes']}; the last is "
              f"close()); failing calls {ns}" + (f", and the first after the step body of iterations 1-4"
                                                 if ends else ""), flush=True)
        ns = ns + ends
        for sticky in [args.sticky]:
            results = _batch_child(["child-io", "--cfg", json.dumps(cfg), "--budget", str(budget),
                                    "--func", func, "--errno", errname, "--ns", json.dumps(ns)]
                                   + (["--sticky"] if sticky else []),
                                   len(ns), 60 + 30 * len(ns), {"case": f"{func} {errname}", "n": "?"})
            for t in results:
                fired = t.get("fired") or {}
                print(f"io {func} {errname}{' sticky' if sticky else ''} n={t.get('n')} "
                      f"(iteration {fired.get('iteration', '-')}, {t.get('mode', '?')}, in "
                      f"{fired.get('where', '-')}): {t['outcome']}", flush=True)
            what = (f"os.{func} raises {errname} on call n" + (" and every later call (the disk stays broken) "
                                                              "until restored" if sticky else " only")
                    + f", n over {len(ns) - len(ends)} positions covering iterations 1-4 (record, replay) and "
                    "close()" + (", and the first call after the step body of each iteration (the reads that "
                                 "bring everything back at its end)" if ends else ""))
            rows.append(row(f"io {func} {errname}{' sticky' if sticky else ''}", what, results))
    return rows


def run_hooks(args) -> list[dict]:
    rows = []
    configs = _budgets([parse_cfg(c) for c in args.cfg], [args.fractions[0]])
    described = {"forward": "forward hook on a middle layer", "backward": "full backward hook on a middle layer",
                 "tensor": "tensor hook on a middle layer's weight (fires in backward)",
                 "opt-pre": "optimizer step pre-hook", "opt-post": "optimizer step post-hook"}
    for kind in args.kinds:
        results = []
        for cfg, _, budget in configs:
            got = _batch_child(["child-hooks", "--cfg", json.dumps(cfg), "--budget", str(budget),
                                "--kind", kind, "--ats", json.dumps(args.at)],
                               len(args.at), 60 + 40 * len(args.at), {"case": kind, "at": "?"})
            for t in got:
                print(f"hook {kind} {cfg_name(cfg)} at iteration {t.get('at')} ({t.get('mode', '?')}): "
                      f"{t['outcome']}", flush=True)
            results += got
        rows.append(row(f"hook {kind}", f"{described[kind]} raises in iteration "
                        f"{', '.join(map(str, args.at))} (record, record, replay, replay)", results))
    return rows


def run_soak(args) -> list[dict]:
    cfg = parse_cfg(args.cfg[0])
    (_, fraction, budget), = _budgets([cfg], [args.fractions[0]])
    swap = tempfile.mkdtemp(prefix="faults-soak-")
    proc, errpath = _spawn(["child-soak", "--cfg", json.dumps(cfg), "--budget", str(budget),
                            "--swap-dir", swap, "--iterations", str(args.trials), "--every", str(args.every)])
    samples = []
    try:
        while True:
            line = _readline(proc, 600)
            if line is None:
                break
            if line.startswith("SAMPLE "):
                s = json.loads(line[7:])
                samples.append(s)
                print(f"soak {s['iteration']}/{args.trials} {s['seconds']:.0f} s: rss {s['rss'] / MiB:.1f} MiB, "
                      f"fds {s['fds']}, threads {s['py_threads']}/{s['os_threads']}, swap in use "
                      f"{s['swap_in_use'] / MiB:.1f} MiB (file {s['swap_file'] / MiB:.1f} MiB), "
                      f"entries {s['entries']}", flush=True)
            elif line.startswith("RESULT "):
                final = json.loads(line[7:])
                break
        else:
            final = None
        out, rc, err, hung = _reap(proc, errpath, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = leftovers(swap)
        shutil.rmtree(swap, ignore_errors=True)
    table, verdict = soak_table(samples, args.warmup)
    found = _child_status(rc, hung, err, out)
    if len(samples) < 2:
        found.append(("crash", ["too few samples"]))
    growing = [m for m, flat in verdict.items() if not flat]
    if growing:
        found.append(("growing", [f"not flat after warm-up: {', '.join(growing)}"]))
    if left:
        found.append(("leftover", [str(left)]))
    result = _finish({"trial": 0}, found)
    if growing:
        result["outcome"] = "growing: " + ", ".join(growing)
    print("\n" + "\n".join(table))
    r = row(f"soak {args.trials}", f"{args.trials} iterations of {cfg_name(cfg)} at {budget / MiB:.1f} MiB "
                    f"(1.05x the smallest feasible budget), sampled every {args.every}", [result])
    r["outcome"] = result["outcome"] if growing or found else "flat"
    r["extra_md"] = table + [""]
    return [r]


SOAK_METRICS = {"rss": ("RSS", MiB), "fds": ("open fds", 1), "py_threads": ("threads (Python)", 1),
                "os_threads": ("threads (/proc)", 1), "swap_in_use": ("swap in use", MiB),
                "swap_file": ("swap file size", MiB), "entries": ("residency entries", 1)}


def soak_table(samples: list[dict], warmup: int) -> tuple[list[str], dict]:
    if not samples:
        return ["(no samples)"], {}
    base = next((s for s in samples if s["iteration"] >= warmup), samples[0])
    first, last = samples[0], samples[-1]
    lines = [f"| metric | iteration {first['iteration']} | after warm-up (iteration {base['iteration']}) "
             f"| last (iteration {last['iteration']}) | max | flat |", "|---|---|---|---|---|---|"]
    verdict = {}
    for key, (label, unit) in SOAK_METRICS.items():
        hi = max(s[key] for s in samples[samples.index(base):])
        if key == "rss":
            flat = last[key] - base[key] <= max(0.05 * base[key], 8 * MiB)
        elif key in ("swap_in_use", "swap_file"):
            flat = last[key] <= base[key] * 1.05 + MiB
        else:
            flat = last[key] <= base[key]
        verdict[label] = flat
        fmt = (lambda v: f"{v / unit:.1f} MiB") if unit == MiB else str
        lines.append(f"| {label} | {fmt(first[key])} | {fmt(base[key])} | {fmt(last[key])} | {fmt(hi)} "
                     f"| {'yes' if flat else 'NO'} |")
    return lines, verdict


def run_all(args) -> list[dict]:
    """Every case at a modest N, each with its own subcommand's defaults."""
    rows = []
    for command, extra in (("sigint", [str(args.trials)]), ("sigkill", [str(args.trials)]),
                           ("io-errors", []), ("hook-exceptions", []), ("soak", [str(args.soak)])):
        sub = build_parser().parse_args([command, *extra, "--seed", str(args.seed)])
        rows += RUNNERS[command](sub)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, trials_default, cfg_default=DEFAULT_CFGS, fractions=(0.25, 0.5)):
        if trials_default is not None:
            p.add_argument("trials", nargs="?", type=int, default=trials_default)
        p.add_argument("--cfg", nargs="+", default=list(cfg_default),
                       help="workloads model:optimizer:batch[:image_size], cycled over trials")
        p.add_argument("--fractions", nargs="+", type=float, default=list(fractions),
                       help="budgets as fractions of the in-core peak, cycled (0: 1.05x the smallest feasible)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", help="markdown file whose results table to update (docs/faults.md)")
        p.add_argument("--date", default=datetime.date.today().isoformat())

    p = sub.add_parser("sigint", help="SIGINT at random moments")
    common(p, 20)
    p.add_argument("--span", type=float, default=8.0, help="the delay covers this many iterations")
    p.add_argument("--early", type=int, default=4,
                   help="every EARLY-th round of trials over the configurations is interrupted during the "
                        "recording iterations (0: none)")
    p = sub.add_parser("sigkill", help="SIGKILL at random moments and at fixed points")
    common(p, 20, ("mlp:sgd:64",), (0.25,))
    p.add_argument("--no-points", action="store_true")
    p = sub.add_parser("io-errors", help="the nth swap write/read/growth fails")
    common(p, None, ("mlp:sgd:64",), (0.25,))
    p.add_argument("--combos", nargs="+", default=["pwrite/EIO", "pwrite/ENOSPC", "preadv/EIO",
                                                   "posix_fallocate/ENOSPC"])
    p.add_argument("--per-iteration", type=int, default=3)
    p.add_argument("--sticky", action="store_true", help="every call from the nth on fails (until restored)")
    p = sub.add_parser("hook-exceptions", help="user hooks raise")
    common(p, None, DEFAULT_CFGS, (0.25,))
    p.add_argument("--kinds", nargs="+", default=list(HOOK_KINDS))
    p.add_argument("--at", nargs="+", type=int, default=[1, 2, 3, 4])
    p = sub.add_parser("soak", help="many iterations; resources stay flat")
    common(p, 1000, ("mlp:sgd:32",), (0.0,))
    p.add_argument("--every", type=int, default=SOAK_EVERY)
    p.add_argument("--warmup", type=int, default=SOAK_WARMUP)
    p = sub.add_parser("all", help="every case at a modest N (sigint/sigkill N, soak --soak)")
    common(p, 20)
    p.add_argument("--soak", type=int, default=200)

    # Children (not for direct use).
    def child(name, *required, **typed):
        p = sub.add_parser(name)
        for a in required:
            p.add_argument(a, required=True)
        p.add_argument("--budget", type=int, required=True)
        for a, (kind, default) in typed.items():
            if kind is bool:
                p.add_argument("--" + a.replace("_", "-"), action="store_true")
            else:
                p.add_argument("--" + a.replace("_", "-"), type=kind, default=default,
                               required=default is None)
        return p
    child("child-sigint", "--cfg", "--swap-dir")
    child("child-sigkill", "--cfg", "--swap-dir", construct_s=(float, 1.0), no_tmpfile=(bool, False))
    child("child-kill-at", "--cfg", "--swap-dir", "--point", n=(int, 3), no_tmpfile=(bool, False))
    child("child-io", "--cfg", "--swap-dir", "--func", "--errno", "--ns", sticky=(bool, False))
    child("child-hooks", "--cfg", "--swap-dir", "--kind", "--ats")
    child("child-soak", "--cfg", "--swap-dir", iterations=(int, None), every=(int, None))
    child("child-trials", "--specs", "--budgets", "--swap-dir")
    return parser


CHILDREN = {"child-sigint": child_sigint, "child-sigkill": child_sigkill, "child-kill-at": child_kill_at,
            "child-io": child_io, "child-hooks": child_hooks, "child-soak": child_soak,
            "child-trials": child_trials}
RUNNERS = {"sigint": run_sigint, "sigkill": run_sigkill, "io-errors": run_io,
           "hook-exceptions": run_hooks, "soak": run_soak, "all": run_all}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # A soak compares the last sample with the first after the warm-up: it needs a
    # sample after that one (helper-195: `soak 20` was reported as a crash).
    least = SOAK_WARMUP + SOAK_EVERY
    if args.command == "soak" and args.trials < args.warmup + args.every:
        parser.error(f"soak N: N must be at least --warmup + --every ({args.warmup} + "
                     f"{args.every}): it samples every --every iterations and compares the "
                     f"last sample with the first after the warm-up; got {args.trials}")
    if args.command == "all" and args.soak < least:
        parser.error(f"--soak must be at least {least} (the soak's warm-up, {SOAK_WARMUP}, "
                     f"and one sampling interval, {SOAK_EVERY}, after it); got {args.soak}")
    if args.command in CHILDREN:
        CHILDREN[args.command](args)
        return 0
    started = time.perf_counter()
    rows = RUNNERS[args.command](args)
    print_rows(rows)
    lines = failure_lines(rows)
    if lines:
        print("\nFailures:\n" + "\n".join(lines))
    print(f"\n# {time.perf_counter() - started:.0f} s, measured on {measured_on()}")
    if args.out:
        command = " ".join(sys.argv[1:] if argv is None else argv)
        update_doc(args.out, rows, ".venv/bin/python benchmarks/faults.py " + command, args.date,
                   [l for r in rows for l in r.get("extra_md", [])])
    soak = [r for r in rows if r["case"].startswith("soak")]
    ok = all(t["outcome"] in PASSING for r in rows if r not in soak for t in r["results"]) and \
        all(r["outcome"] == "flat" for r in soak)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
