"""State larger than the budget: build, train and save a model whose parameters,
gradients and Adam moments are many times the budget, in a fresh process, and compare it
bitwise with plain PyTorch trained the same way in another fresh process.

    .venv/bin/python benchmarks/big_state.py                  # defaults: ~4 GiB of state
    .venv/bin/python benchmarks/big_state.py --layers 8 --width 1024 --budget 64MiB

Unless --no-limit, the disk is measured right before and right after the outcore child,
and each replayed step is compared with its physical limit (`_limits`).

Each child resets its peak resident set (/proc/self/clear_refs) after importing torch
and outcore, so `start` is its resident set then and `peak` (VmHWM) covers building the
model, every iteration (recording ones included), hashing the state and `ooc.save`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_model(layers: int, width: int, ooc=None):
    """The benchmark's MLP, seeded; under `ooc.building()` when `ooc` is given."""
    import contextlib

    import torch
    with ooc.building() if ooc is not None else contextlib.nullcontext():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def train_step(model, opt, x, y, ooc=None):
    """One Adam step on (x, y); inside `ooc.iteration()` when `ooc` is given."""
    import contextlib
    with ooc.iteration() if ooc is not None else contextlib.nullcontext():
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss


def child(args) -> dict:
    import torch
    import outcore

    torch.set_num_threads(os.cpu_count() or 1)

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.width, generator=gen)
    y = torch.randn(args.batch, args.width, generator=gen)
    freed = {"true": True, "false": False}.get(args.return_freed_memory, args.return_freed_memory)
    ooc = (outcore.OutOfCore(args.budget, swap_dir=args.swap_dir, return_freed_memory=freed)
           if args.mode == "outcore" else None)
    _reset_peak()
    start = _status()["VmRSS"]
    t0 = time.perf_counter()
    model = build_model(args.layers, args.width, ooc)
    build_s = time.perf_counter() - t0
    after_build = _status()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    steps = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = train_step(model, opt, x, y, ooc)
        steps.append(time.perf_counter() - t0)
    after_steps = _status()
    digest = hashlib.sha256()
    state_bytes = 0
    for p in model.parameters():
        digest.update(p.detach().numpy().tobytes())
        state_bytes += 2 * p.nbytes            # the parameter and its gradient
        for t in opt.state[p].values():
            if t.dim():
                digest.update(t.numpy().tobytes())
                state_bytes += t.nbytes
    after_hash = _status()
    save_s = None
    if args.save:
        t0 = time.perf_counter()
        path = os.path.join(args.swap_dir or tempfile.gettempdir(), f"big_state_{os.getpid()}.pt")
        (ooc.save if ooc is not None else (lambda o, p: torch.save(o, p)))(model.state_dict(), path)
        save_s = time.perf_counter() - t0
        os.unlink(path)
    end = _status()
    final = ooc.report() if ooc is not None else None
    report = str(final) if final is not None else ""
    iterations = ([{"mode": it.mode, "read": it.bytes_read, "written": it.bytes_written,
                    "seconds": it.seconds} for it in final.iterations]
                  if final is not None else [])
    if ooc is not None:
        ooc.close()
    return {"mode": args.mode, "budget": ooc.budget if ooc is not None else None,
            "start": start, "peak": end["VmHWM"], "rss_after_steps": after_steps["VmRSS"],
            "peak_building": after_build["VmHWM"], "peak_steps": after_steps["VmHWM"],
            "peak_hash": after_hash["VmHWM"],
            "rss_after_hash": after_hash["VmRSS"], "state_bytes": state_bytes,
            "build_s": build_s, "steps_s": steps, "save_s": save_s,
            "loss": float(loss.detach()), "digest": digest.hexdigest(), "report": report,
            "iterations": iterations}


def _limits(o: dict, p: dict, disks: list) -> None:
    """Each replayed step against its physical limit: max(compute, bytes read / read speed,
    bytes written / write speed, both / speed of both at once), compute the plain child's
    fastest step after the first, the disk measured right before and right after the
    outcore child (`outcore bench disk`'s measure_disk, 1 GiB per direction). This disk's
    speed drifts by tens of percent within minutes, so the limit is given twice: with
    the slower figure of each pair (the step's best case) and the faster (its worst)."""
    compute = min(p["steps_s"][1:] or p["steps_s"])

    def runs(key):
        return ", ".join(f"{d[key]:.2f}" for d in disks)
    print(f"disk before/after: read {runs('read_GBps')} GB/s, write {runs('write_GBps')} GB/s, "
          f"both {runs('both_total_GBps')} GB/s; compute {compute:.2f} s")

    def limit(it, pick):
        read, write, both = (pick(d[k] for d in disks) * 1e9
                             for k in ("read_GBps", "write_GBps", "both_total_GBps"))
        return max(compute, it["read"] / read, it["written"] / write,
                   (it["read"] + it["written"]) / both)
    print("| replayed step | read | written | step | limit, slower disk | step / it "
          "| limit, faster disk | step / it |")
    print("|---|---|---|---|---|---|---|---|")
    for k, it in enumerate(o["iterations"], 1):
        if it["mode"] != "replay":
            continue
        slow, fast = limit(it, min), limit(it, max)
        print(f"| {k} | {it['read'] / 1e9:.2f} GB | {it['written'] / 1e9:.2f} GB "
              f"| {it['seconds']:.2f} s | {slow:.2f} s | {it['seconds'] / slow:.2f}x "
              f"| {fast:.2f} s | {it['seconds'] / fast:.2f}x |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budget", default="256MiB")
    ap.add_argument("--swap-dir", default=None)
    ap.add_argument("--save", action="store_true", help="also time ooc.save / torch.save of the model")
    ap.add_argument("--return-freed-memory", default="trim", choices=("trim", "eager", "false"),
                    help="OutOfCore's return_freed_memory (default: trim, its default)")
    ap.add_argument("--no-limit", action="store_true",
                    help="skip measuring the disk and each step's physical limit")
    ap.add_argument("--mode", choices=("outcore", "plain"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return 0
    from outcore.bench.disk import measure_disk
    rows, disks = {}, []
    for mode in ("outcore", "plain"):
        around = mode == "outcore" and not args.no_limit     # the disk before and after
        if around:
            disks.append(measure_disk(1 << 30, args.swap_dir))
        cmd = [sys.executable, __file__, "--mode", mode] + sys.argv[1:]
        from outcore.memory.pages import plain_environment   # plain PyTorch: its own setting
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env=plain_environment() if mode == "plain" else None).stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])
        if around:
            disks.append(measure_disk(1 << 30, args.swap_dir))
    o, p = rows["outcore"], rows["plain"]
    mib = 2 ** 20
    print(o["report"])
    print(f"state (parameters, gradients, Adam moments): {o['state_bytes'] / mib:.0f} MiB; "
          f"budget {o['budget'] / mib:.0f} MiB ({o['state_bytes'] / o['budget']:.1f}x)")
    print(f"return_freed_memory={args.return_freed_memory}")
    print("| run | start RSS | peak RSS | peak - start | state / peak | build | steps (s) | save |")
    print("|---|---|---|---|---|---|---|---|")
    for r in (o, p):
        save = f"{r['save_s']:.1f} s" if r["save_s"] is not None else "-"
        print(f"| {r['mode']} | {r['start'] / mib:.0f} MiB | {r['peak'] / mib:.0f} MiB | "
              f"{(r['peak'] - r['start']) / mib:.0f} MiB | {r['state_bytes'] / r['peak']:.2f} | "
              f"{r['build_s']:.1f} s | {' '.join(f'{s:.1f}' for s in r['steps_s'])} | {save} |")
    same = o["digest"] == p["digest"]
    print(f"bitwise equal to plain PyTorch (parameters and Adam moments after {len(o['steps_s'])} "
          f"steps): {same}")
    print(f"peak - start - budget = {(o['peak'] - o['start'] - o['budget']) / mib:.0f} MiB")
    if disks:
        _limits(o, p, disks)
    print("outcore's peak above start, by phase (VmHWM at its end): "
          + ", ".join(f"{k} {(o[f'peak_{k}'] - o['start']) / mib:.0f} MiB"
                      for k in ("building", "steps", "hash"))
          + f", save {(o['peak'] - o['start']) / mib:.0f} MiB")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
