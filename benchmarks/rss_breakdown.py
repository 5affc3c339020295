"""What the resident set is made of at its peak, while building and while training a
model whose state is many times the budget (the MLP of big_state.py).

    .venv/bin/python benchmarks/rss_breakdown.py                      # 32 layers, 128 MiB
    .venv/bin/python benchmarks/rss_breakdown.py --layers 64 --budget 256MiB

A thread samples the resident set every 2 ms; at the highest sample it reads
/proc/self/smaps_rollup (anonymous and file-backed pages), glibc's mallinfo2 (heap
bytes in use and free) and the managed bytes in fast memory. Printed per phase
(building under `ooc.building()`, `--steps` Adam iterations, hashing every parameter
and moment between iterations, then `ooc.save` of the model) as the change from
the start, in MiB: where the process's growth beyond the budget comes from.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import tempfile
import threading
import time

MIB = 2 ** 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--budget", default="128MiB")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    import torch

    import outcore
    from outcore.memory.malloc import resident_bytes
    from big_state import build_model, train_step

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    ooc = outcore.OutOfCore(args.budget)

    def snapshot() -> dict:
        rollup = {}
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("Rss", "Anonymous"):
                    rollup[key] = int(value.split()[0]) * 1024
        m = libc.mallinfo2()
        return {"rss": rollup["Rss"], "anonymous": rollup["Anonymous"],
                "file-backed": rollup["Rss"] - rollup["Anonymous"],
                "heap in use": m.uordblks, "heap free": m.fordblks, "mmapped": m.hblkhd,
                "managed in RAM": ooc._res.resident}

    def peak_of(phase):
        best = {"rss": 0, "snap": None}
        done = threading.Event()

        def sample():
            while not done.is_set():
                rss = resident_bytes()
                if rss > best["rss"]:
                    best["rss"], best["snap"] = rss, snapshot()
                time.sleep(0.002)
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            return phase()
        finally:
            done.set()
            thread.join()
            peaks.append(best["snap"])

    peaks: list = []
    start = snapshot()
    model = peak_of(lambda: build_model(args.layers, args.width, ooc))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, args.width, generator=gen)
    y = torch.randn(32, args.width, generator=gen)
    peak_of(lambda: [train_step(model, opt, x, y, ooc) for _ in range(args.steps)])

    def hash_state():                 # big_state.py's check: every parameter and moment
        digest = hashlib.sha256()
        for p in model.parameters():
            digest.update(p.detach().numpy().tobytes())
            for t in opt.state[p].values():
                if t.dim():
                    digest.update(t.numpy().tobytes())
    peak_of(hash_state)
    with tempfile.TemporaryDirectory() as tmp:
        peak_of(lambda: ooc.save(model.state_dict(), os.path.join(tmp, "model.pt")))
    ooc.close()
    print(f"budget {args.budget}; start: " + ", ".join(f"{k} {v / MIB:.0f}" for k, v in start.items()))
    print("| phase | " + " | ".join(start) + " |")
    print("|---|" + "---|" * len(start))
    for name, snap in zip(("building", "steps", "hash", "save"), peaks):
        print(f"| {name} | " + " | ".join(f"{(snap[k] - start[k]) / MIB:+.0f}" for k in start) + " |")


if __name__ == "__main__":
    main()
