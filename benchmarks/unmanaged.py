"""Where the resident set goes beyond the managed tensors, phase by phase: anonymous and
file-backed RSS after building and after each iteration, the managed resident bytes,
and the same after glibc's malloc_trim(0) (what no trim can give back).

    .venv/bin/python benchmarks/unmanaged.py [--layers 32 --width 2048 --budget 128MiB]
    .venv/bin/python benchmarks/unmanaged.py --plain --layers 4     # plain PyTorch

The model is benchmarks/big_state.py's MLP, built under `ooc.building()` and trained
with Adam (with --plain: in memory, no outcore; the managed figure is then the bytes of
the parameters and Adam's moments). Prints one line per phase; asserts nothing.
"""
from __future__ import annotations

import argparse
import ctypes

from big_state import build_model, train_step     # the same model and step


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) >> 10
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--budget", default="128MiB")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--plain", action="store_true", help="plain PyTorch, no outcore")
    args = ap.parse_args()
    import torch
    import outcore

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, args.width, generator=gen), torch.randn(32, args.width, generator=gen)

    def line(phase, ooc=None):
        s = _status()
        managed = ""
        if ooc is not None:
            managed = f", managed resident {ooc._res.resident >> 20} MiB"
        elif args.plain and phase != "start":
            state = sum(p.nbytes * 3 for p in model.parameters())
            managed = f", parameters and moments {state >> 20} MiB"
        print(f"{phase:<14} RSS {s['VmRSS']} MiB (anonymous {s['RssAnon']}, file {s['RssFile']}){managed}")

    line("start")
    ooc = None if args.plain else outcore.OutOfCore(args.budget)
    model = build_model(args.layers, args.width, ooc)
    line("built", ooc)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for i in range(args.iterations):
        train_step(model, opt, x, y, ooc)
        line(f"iteration {i + 1}", ooc)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    line("malloc_trim(0)", ooc)
    if ooc is not None:
        ooc.close()


if __name__ == "__main__":
    main()
