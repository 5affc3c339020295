"""What the state file's checksums cost (NOTE [Durable state] rule 7): the same training
under `OutOfCore(state_dir=...)` with the CRC-32 taken by every write, and with it
replaced by a constant, in fresh processes, alternating, median step of each.

    .venv/bin/python benchmarks/state_checksum.py [--rounds 3] [--layers 12] [--width 1024]

Each child trains an MLP (Adam) for 8 iterations at a budget of a third of its
parameters' size, and prints the median of iterations 4-8 (the replays and their
commits). Run it with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CHILD = """
import shutil, statistics, sys, tempfile, time
import torch, outcore
import outcore.run.movers.disk as disk
checksums, layers, width = sys.argv[1] == "on", int(sys.argv[2]), int(sys.argv[3])
if not checksums:
    class _NoCrc:
        @staticmethod
        def crc32(data):
            return 0
    disk.zlib = _NoCrc
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
x = torch.randn(256, width)
directory = tempfile.mkdtemp()
budget = layers * width * width * 4 // 3
times = []
try:
    with outcore.OutOfCore(budget, state_dir=directory) as ooc:
        ooc.resume(model, opt)
        for _ in range(8):
            start = time.perf_counter()
            with ooc.iteration():
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
            times.append(time.perf_counter() - start)
finally:
    shutil.rmtree(directory)
print(statistics.median(times[3:]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=1024)
    args = parser.parse_args()
    got = {"off": [], "on": []}
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            out = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.layers),
                                  str(args.width)], capture_output=True, text=True, check=True)
            got[mode].append(float(out.stdout.split()[-1]))
    state = args.layers * args.width * (args.width + 1) * 4 * 3
    print(f"MLP {args.layers}x{args.width}, Adam: state {state / 2**20:.0f} MiB, "
          f"budget {args.layers * args.width * args.width * 4 // 3 / 2**20:.0f} MiB")
    for mode in ("off", "on"):
        print(f"checksums {mode:3s}: median step {1e3 * statistics.median(got[mode]):7.1f} ms  "
              f"(rounds: {', '.join(f'{1e3 * t:.1f}' for t in got[mode])})")
    print(f"ratio on/off: {statistics.median(got['on']) / statistics.median(got['off']):.2f}")


if __name__ == "__main__":
    main()
