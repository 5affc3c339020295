"""Two costs of the executor's bookkeeping, measured in one process.

1. `Residency.evict_lru` when nothing needs to go (on demand and while recording it runs
   twice per op): microseconds a call, with 600 tracked storages of 256 KiB under a 1 GiB
   budget, over 20,000 calls.
2. The size check of a passive replay (`Replayer._made_more`, NOTE [Step shapes] rule 10)
   against the replay's dispatch in all: cumulative seconds under cProfile over 4 passive
   replays of gpt2-tiny (seq 128, batch 8, a budget far above its peak).

    .venv/bin/python benchmarks/bookkeeping.py
"""
from __future__ import annotations

import cProfile
import pstats
import tempfile
import time

import torch

import outcore
from outcore.workloads import build


def evict_lru_us(entries: int = 600, calls: int = 20_000) -> float:
    tensors = [torch.zeros(1 << 16) for _ in range(entries)]
    with outcore.OutOfCore(2**30, swap_dir=tempfile.mkdtemp()) as ooc:
        res = ooc._res
        for t in tensors:
            res.track(t.untyped_storage())
        start = time.perf_counter()
        for _ in range(calls):
            res.evict_lru(2**30, set())
        return (time.perf_counter() - start) / calls * 1e6


def passive_check_share() -> tuple[float, float]:
    w = build("gpt2-tiny", batch=8, optimizer="sgd", device="cpu", seed=0, seq_len=128)
    prof = cProfile.Profile()
    with outcore.OutOfCore(2**31, swap_dir=tempfile.mkdtemp()) as ooc:
        for i in range(8):
            if i >= 4:
                prof.enable()
            with ooc.iteration():
                w.step()
            if i >= 4:
                prof.disable()
        assert not any(it.tracked for it in ooc.report().iterations[4:]), "not passive"
    stats = pstats.Stats(prof).stats
    cumulative = {f[2]: v[3] for f, v in stats.items() if f[2] in ("_follow", "_made_more")}
    return cumulative.get("_made_more", 0.0), cumulative.get("_follow", 0.0)


if __name__ == "__main__":
    print(f"evict_lru, nothing to evict: {evict_lru_us():.2f} us a call (600 entries)")
    check, follow = passive_check_share()
    print(f"passive replay: _made_more {check:.3f} s of _follow's {follow:.3f} s "
          f"({check / follow:.1%}), cumulative under cProfile, 4 replays")
