"""How often plain PyTorch differs from itself, against how often outcore differs from it.

    .venv/bin/python benchmarks/plain_determinism.py [--runs 200] [--threads 2]

Each run is a fresh process that builds three copies of the same MLP (6 x Linear(512,
512), Adam, torch.manual_seed(0)) and trains them side by side for 3 steps on the
same batch: two in plain PyTorch (`a`, `b`) and one under `OutOfCore("4MiB")` (`c`,
which records the first step and replays the others, moving most of the model and
the optimizer state through the disk each step). After every step it compares the
three states (parameters and Adam's moments) bit for bit. It prints, per pair, in
how many runs the pair differed at some step. outcore's claim is `a == c` wherever
`a == b`: on more than one thread plain PyTorch's own kernels are not always equal
from one call to the next, and a run where `a != b` says nothing about outcore.
"""
from __future__ import annotations

import argparse
import collections
import subprocess
import sys

CHILD = """
import sys, warnings
import torch, outcore
warnings.simplefilter("ignore")
torch.set_num_threads(int(sys.argv[1]))
def make():
    torch.manual_seed(0)
    m = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(6)])
    return m, torch.optim.Adam(m.parameters(), lr=1e-3)
def step(model, opt):
    model(torch.ones(8, 512)).sum().backward(); opt.step(); opt.zero_grad()
def state(model, opt):
    out = [t.detach().clone() for t in model.parameters()]
    for entry in opt.state.values():
        out += [entry["exp_avg"].clone(), entry["exp_avg_sq"].clone()]
    return out
def same(x, y):
    return all(torch.equal(p, q) for p, q in zip(x, y))
a, b, c = make(), make(), make()
differed = set()
with outcore.OutOfCore("4MiB", min_move_bytes=0) as ooc:
    for _ in range(3):
        step(*a); step(*b)
        with ooc.iteration():
            step(*c)
        sa, sb, sc = state(*a), state(*b), state(*c)
        for name, x, y in (("a-b", sa, sb), ("a-c", sa, sc), ("b-c", sb, sc)):
            if not same(x, y):
                differed.add(name)
print(" ".join(sorted(differed)) or "none")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    counts: collections.Counter = collections.Counter()
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.threads)], check=True,
                             capture_output=True, text=True).stdout.split()
        counts.update(out)
    print(f"{args.runs} runs, {args.threads} threads: " + ", ".join(
        f"{pair} differed in {counts[pair]}" for pair in ("a-b", "a-c", "b-c"))
          + f"; all three equal in {counts['none']}")


if __name__ == "__main__":
    main()
