"""The optimizer inside backward against the usual step, plain and under a budget, side by
side: each parameter updated as soon as its gradient is accumulated (one SGD with
momentum per parameter, run by `register_post_accumulate_grad_hook`, PyTorch's recipe
for fusing the optimizer into backward) against one SGD stepping after backward.

    .venv/bin/python benchmarks/optimizer_in_backward.py
    .venv/bin/python benchmarks/optimizer_in_backward.py --model gpt2 --seq-len 256 --batch 2 --budget 1000MiB

For a per-parameter optimizer the two train the same numbers (checked on the first run
of each: every parameter and buffer after the steps, bitwise, by their SHA-256). Every
run is a fresh process; each round runs the four configurations (usual / in backward,
plain / under the budget) one after the other, so drift of the machine falls on all
alike. Prints each configuration's median over rounds of its runs' median steps (steps 3
on), and the bytes the budgeted steps moved.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time

HOWS = ("usual", "in-backward")


def _workload(args, how):
    import torch
    from outcore.workloads import build
    shape = {"image_size": args.image_size} if args.model.startswith("resnet") else \
        {"seq_len": args.seq_len}
    w = build(args.model, batch=args.batch, **shape)
    if how == "usual":
        return w, w.step
    optimizers = {p: torch.optim.SGD([p], lr=0.01, momentum=0.9) for p in w.model.parameters()}

    def update(p):
        optimizers[p].step()
        optimizers[p].zero_grad(set_to_none=True)
    for p in w.model.parameters():
        p.register_post_accumulate_grad_hook(update)
    return w, lambda: w.loss().backward()


def child(args) -> None:
    """One configuration in this process: its steps' times (and bytes moved), as JSON."""
    import contextlib
    import outcore
    import torch
    w, step = _workload(args, args.how)
    times, moved = [], None
    with tempfile.TemporaryDirectory() as swap:
        ooc = outcore.OutOfCore(args.budget, swap_dir=swap) if args.budget != "none" else None
        with ooc or contextlib.nullcontext():
            for _ in range(args.steps):
                started = time.perf_counter()
                with ooc.iteration() if ooc else contextlib.nullcontext():
                    step()
                times.append(time.perf_counter() - started)
            if ooc:
                its = ooc.report().iterations[2:]
                moved = sum(it.bytes_read + it.bytes_written for it in its) / len(its)
    digest = hashlib.sha256()           # every parameter and buffer, bitwise
    for t in [*w.model.parameters(), *w.model.buffers()]:
        digest.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    print(json.dumps({"step_s": statistics.median(times[2:]), "moved": moved,
                      "state": digest.hexdigest()}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--budget", default="169MiB", help="the budget (default: a quarter of "
                    "ResNet-50 64x64 batch 64's in-core peak)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--how", choices=HOWS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    base = [sys.executable, __file__, "--child", "--model", args.model, "--batch",
            str(args.batch), "--image-size", str(args.image_size), "--seq-len",
            str(args.seq_len), "--steps", str(args.steps)]
    configs = [(how, budget) for budget in ("none", args.budget) for how in HOWS]
    runs: dict = {c: [] for c in configs}
    for _ in range(args.rounds):
        for how, budget in configs:
            out = subprocess.run(base + ["--how", how, "--budget", budget],
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"{how}, budget {budget}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
                return 1
            runs[(how, budget)].append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = [runs[c][0]["state"] for c in configs]
    same = all(p == first[0] for p in first)
    plain = statistics.median(r["step_s"] for r in runs[("usual", "none")])
    print(f"{args.model} batch {args.batch}, budget {args.budget}, {args.rounds} rounds; "
          f"the four train the same parameters: {same}")
    print("| step | budget | step (s): median (rounds) | vs the usual step in-core "
          "| moved a step (MiB) |")
    print("|---|---|---|---|---|")
    for how, budget in configs:
        steps = [r["step_s"] for r in runs[(how, budget)]]
        moved = runs[(how, budget)][0]["moved"]
        label = "in-core" if budget == "none" else budget
        print(f"| {how} | {label} | {statistics.median(steps):.3f} "
              f"({', '.join(f'{s:.3f}' for s in steps)}) | "
              f"{plain / statistics.median(steps):.2f} | "
              f"{'-' if moved is None else f'{moved / 2**20:.0f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
