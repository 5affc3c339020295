"""Train the same workload in-core and under OutOfCore; compare bitwise."""
from __future__ import annotations

import torch

import outcore
from outcore import workloads
from outcore.plan.feasibility import min_feasible_budget

from ..trace.helpers import assert_bitwise_equal, state_of

SIZES = {"mlp": {}, "mlp-tiny": {}, "resnet18-tiny": {"image_size": 32}, "gpt2-tiny": {"seq_len": 32}}


def build(name, optimizer, batch=8, seed=0):
    return workloads.build(name, batch=batch, optimizer=optimizer, seed=seed, **SIZES.get(name, {}))


def recorded_trace(make, step):
    """The trace of `step` on a fresh `make()`, after one warm-up step (steady state)."""
    w = make()
    step(w)
    with outcore.record() as rec:
        step(w)
    return rec.trace


_steady: dict = {}


def steady_trace(name, optimizer, batch=8):
    """Recorded once per process: a Trace is immutable, and several files take their
    budgets from the same workload's."""
    key = (name, optimizer, batch)
    if key not in _steady:
        _steady[key] = recorded_trace(lambda: build(name, optimizer, batch), lambda w: w.step())
    return _steady[key]


def budgets(trace) -> dict:
    """From everything fits down to just above the smallest feasible budget."""
    peak = trace.peak(actual=True)[0]
    low = min_feasible_budget(trace)
    return {"fits": peak * 2, "half": max(low, peak // 2), "tight": int(low * 1.05)}


def train_twins(make, step, ooc, iterations=4):
    """Run `step(w)` on two identical workloads, the second under `ooc`. Seeds are reset
    before each step so dropout draws the same masks. Returns (plain state, ooc state,
    plain losses, ooc losses)."""
    plain, managed = make(), make()
    losses_plain, losses_ooc = [], []
    for it in range(iterations):
        torch.manual_seed(100 + it)
        losses_plain.append(step(plain).detach().clone())
        torch.manual_seed(100 + it)
        with ooc.iteration():
            loss = step(managed)
        losses_ooc.append(loss.detach().clone())
    return (state_of(plain.model, plain.optimizer), state_of(managed.model, managed.optimizer),
            losses_plain, losses_ooc)


def assert_same_training(result):
    a, b, la, lb = result
    assert_bitwise_equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(la, lb))


def ctrl_c_as_a_read_begins(res) -> None:
    """The next read back of `res` (a Residency) gets a Ctrl-C (SIGINT to this process)
    as it begins, once: where NOTE [Interrupts] rule 9 holds signals between iterations.
    `"restore" in vars(res)` until it has landed."""
    import os
    import signal
    restore = res.restore

    def landing(*args, **kwargs):
        del res.restore                # the class's method again
        os.kill(os.getpid(), signal.SIGINT)
        return restore(*args, **kwargs)
    res.restore = landing
