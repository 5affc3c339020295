"""Storages that die at any moment of a replayed plan, on any thread, leave the residency
counters exact and the budget kept (NOTE [Residency invariants] in residency.py).

The step holds large temporaries it never reads again (the plan swaps them out while
they are held); a hook drops some of them at random action boundaries of the replay —
also while their write-out is in flight, so that the mover's worker thread drops the
last reference. `OUTCORE_DYING_ITERATIONS` sets the length (200 for the long run in
docs/faults.md; the suite runs fewer).
"""
from __future__ import annotations

import os
import random

import torch

import outcore
from outcore.run.replay import Replayer
from outcore.states import OUT, SLOW

from .twins import build, recorded_trace

ITERATIONS = int(os.environ.get("OUTCORE_DYING_ITERATIONS", "30"))


def test_storages_dying_at_every_action_boundary(monkeypatch):
    held: list = []

    def step(w):
        held.clear()
        x, _ = w.batch
        for i in range(6):                      # 2 MiB each, never read again
            held.append(torch.cat([x] * 128) * (i + 1))
        loss = w.step()
        return loss

    trace = recorded_trace(lambda: build("mlp", "sgd"), step)
    budget = int(trace.peak(actual=True)[0] * 0.45)
    rng = random.Random(0)
    checks = {"boundaries": 0, "drops": 0, "in_flight": 0}

    w = build("mlp", "sgd")
    with outcore.OutOfCore(budget=budget, min_move_bytes=0) as ooc:
        res = ooc._res
        original = Replayer._actions

        def actions(self, acts):
            checks["boundaries"] += 1
            if held and rng.random() < 0.3:
                # Prefer a storage whose write is in flight: its last reference then
                # goes away on the mover's thread.
                # (Indices, never `==`: comparing tensors reads them, and an evicted
                # storage must not be read outside the dispatcher.)
                entries = [res.entries.get(h.untyped_storage()._cdata) for h in held]
                flying = [i for i, e in enumerate(entries) if e is not None and e.state is OUT]
                index = flying[0] if flying and rng.random() < 0.7 else rng.randrange(len(held))
                checks["in_flight"] += index in flying
                del held[index]
                checks["drops"] += 1
            counted = res.recount()
            assert (res.resident, res.offloaded) == counted
            return original(self, acts)

        monkeypatch.setattr(Replayer, "_actions", actions)
        for _ in range(ITERATIONS):
            with ooc.iteration():
                step(w)
            held.clear()
            counted = res.recount()
            assert (res.resident, res.offloaded) == counted
            assert res.offloaded >= 0 and res.resident >= 0
            # between iterations nothing is left unusable: what is on the slow tier is mapped
            assert not [e for e in res.entries.values() if e.ref() is not None and e.state is SLOW]
        report = ooc.report()
    replays = [it for it in report.iterations if it.mode == "replay"]
    assert len(replays) >= ITERATIONS - 2, str(report)
    for it in replays:
        assert it.deviation is None, str(report)
        assert it.peak_resident <= budget, str(report)
        assert it.bytes_written > 0
    assert checks["drops"] > ITERATIONS and checks["in_flight"] > 0, checks


def test_a_new_storage_at_a_dead_ones_address_is_not_taken_for_it():
    """NOTE [Residency invariants] 2: a temporary dies inside an op and the next op's
    0-byte storage gets its address (the key of the dead entry, not yet retired). Taken
    for the dead array, it made a step that never changes deviate at its second replay
    (seen with GPT-2's attention, Llama and T5 from transformers)."""
    torch.manual_seed(0)
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(512, 256)
    with outcore.OutOfCore(4 * x.nbytes, min_move_bytes=0, recompute=False) as ooc:
        for _ in range(4):
            with ooc.iteration():
                h = x
                for _ in range(4):
                    h = torch.tanh((h @ w) * 2)          # the product dies inside the mul
                    h = h + torch.zeros(0).sum()         # a 0-byte storage at its address
                h.sum().backward()
                w.grad = None
        iterations = ooc.report().iterations
    assert [(it.mode, it.deviation) for it in iterations] == [("record", None)] + [
        ("replay", None)] * 3
