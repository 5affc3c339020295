"""Gradient accumulation across iterations: optimizer.step() every n-th `ooc.iteration()`
against the whole cycle in one iteration and against plain PyTorch, side by side.

    .venv/bin/python benchmarks/accumulation.py [--rounds 3] [--n 4] [--cycles 12]
        [--also-src DIR]

An MLP (4 x Linear(2048, 2048), Adam, batch 256) under half its in-core peak. Each mode
runs in a fresh process, the modes alternating round by round; a mode's figure is the
median over rounds of its median seconds per cycle over the last half of the cycles
(the first half learns the shapes and plans). `--also-src DIR` adds the across-mode run
with outcore imported from DIR (another checkout's `src`, e.g. `git worktree add
/tmp/old <commit>` then `--also-src /tmp/old/src`): before and after in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(mode: str, n: int, cycles: int) -> dict:
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(2)
    net = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(2048, 2048),
                                                               torch.nn.ReLU())])
    opt = torch.optim.Adam(net.parameters())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 2048, generator=g), torch.randn(256, 2048, generator=g)

    def micro():
        torch.nn.functional.mse_loss(net(x), y).div(n).backward()

    def finish():
        opt.step()
        opt.zero_grad()

    times, out = [], {"mode": mode}
    if mode == "plain":
        for _ in range(cycles):
            t = time.perf_counter()
            for _ in range(n):
                micro()
            finish()
            times.append(time.perf_counter() - t)
    else:
        import outcore
        budget = 176 * 2**20          # about half the in-core peak (4 x 16 MiB weights,
        with outcore.OutOfCore(budget=budget) as ooc:     # grads, Adam's 2 x, activations)
            for _ in range(cycles):
                t = time.perf_counter()
                if mode == "whole":
                    with ooc.iteration():
                        for _ in range(n):
                            micro()
                        finish()
                else:
                    for i in range(n):
                        with ooc.iteration():
                            micro()
                            if i == n - 1:
                                finish()
                times.append(time.perf_counter() - t)
            its = ooc.report().iterations
        tail = its[len(its) // 2:]
        out.update(records=sum(it.mode == "record" for it in its),
                   deviations=sum(it.deviation is not None for it in its),
                   tail_deviations=sum(it.deviation is not None or it.mode == "record" for it in tail),
                   peak_over=max(it.peak_resident for it in its) > budget,
                   unplanned_tail=sum(it.unplanned_bytes for it in tail) / max(cycles - cycles // 2, 1),
                   moved_tail=sum(it.bytes_read + it.bytes_written for it in tail)
                   / max(cycles - cycles // 2, 1), in_core_peak=ooc.report().in_core_peak)
    out["per_cycle_s"] = statistics.median(times[cycles // 2:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--cycles", type=int, default=12)
    ap.add_argument("--also-src", default=None)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.n, a.cycles)))
        return
    modes = [("plain", None), ("whole", None), ("across", None)]
    if a.also_src:
        modes.append(("across", a.also_src))
    results: dict = {}
    for r in range(a.rounds):
        for mode, src in modes:
            env = dict(os.environ)
            if src:
                env["PYTHONPATH"] = src
            got = subprocess.run([sys.executable, __file__, "--child", mode, "--n", str(a.n),
                                  "--cycles", str(a.cycles)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            out = json.loads(got.strip().splitlines()[-1])
            results.setdefault((mode, src), []).append(out)
            print(f"round {r + 1} {mode}{' (' + src + ')' if src else ''}: {out}", flush=True)
    plain = statistics.median(o["per_cycle_s"] for o in results["plain", None])
    print(f"\naccumulation {a.n}, {a.cycles} cycles, median of {a.rounds} rounds; "
          "s per cycle over the last half of the cycles")
    print("| mode | s per cycle | x plain's speed | records, deviations (all) | "
          "records + deviations (last half) | MiB moved per cycle (last half) | "
          "of which unplanned |")
    print("|---|---|---|---|---|---|---|")
    for (mode, src), outs in results.items():
        s = statistics.median(o["per_cycle_s"] for o in outs)
        name = mode + (f" ({src})" if src else "")
        if mode == "plain":
            print(f"| {name} | {s:.3f} | 1.00 | | | | |")
            continue
        o = outs[-1]
        print(f"| {name} | {s:.3f} | {plain / s:.2f} | {o['records']}, {o['deviations']} | "
              f"{o['tail_deviations']} | {o.get('moved_tail', 0) / 2**20:.0f} | "
              f"{o['unplanned_tail'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
