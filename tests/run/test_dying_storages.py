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


def test_a_storage_the_plan_freed_but_the_step_still_holds_lingers_where_there_is_room(tmp_path):
    """From the 4th iteration on the step holds a layer's output two ops past its last
    use (the recording saw it die at once). Where the plan leaves room beside it, it
    lingers until it dies, with no write (before: written out synchronously at the next
    op, 2 MiB a replay that nothing read back); where it does not, it is written out,
    and the budget holds either way."""
    import contextlib

    def run(budget=None):
        torch.manual_seed(0)
        l1, l2, l3 = torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 10)
        params = [*l1.parameters(), *l2.parameters(), *l3.parameters()]
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        keep = []
        ooc = outcore.OutOfCore(budget, swap_dir=str(tmp_path)) if budget else None
        try:
            for it in range(6):
                with ooc.iteration() if ooc else contextlib.nullcontext():
                    x = torch.randn(512, 512, generator=torch.Generator().manual_seed(it))
                    a = l1(x)
                    if it >= 3:
                        keep.append(a)          # the plan frees `a` after the relu
                    b = torch.relu(a)
                    del a
                    c = torch.relu(l2(b))
                    keep.clear()
                    l3(c).square().mean().backward()
                    opt.step()
                    opt.zero_grad()
            return [p.detach().clone() for p in params], ooc.report() if ooc else None
        finally:
            if ooc:
                ooc.close()

    expected, _ = run()
    for budget, lingers in ((22 * 2**20, True), (10 * 2**20, False)):
        params, report = run(budget)
        assert all(torch.equal(a, b) for a, b in zip(params, expected))
        replays = report.iterations[3:]
        assert [it.mode for it in replays] == ["replay"] * 3 and report.in_core_peak > budget
        assert all(it.peak_resident <= budget for it in report.iterations), report
        assert all((it.unplanned_bytes == 0) == lingers for it in replays), (budget, report)
