"""Runs of one benchmark side by side, each in a fresh process: plain PyTorch, outcore,
and (`also_src`) outcore from another source tree, one after the other in every round.
A child is the benchmark script itself with `--child plain|ooc ... --out PATH`: it
trains, saves its final state there (`torch.save` of a dict of tensors) and prints one
JSON line of its figures, to which `bitwise` (equal to plain PyTorch's state) is added."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def side_by_side(script: str, child_args: list, rounds: int, also_src: str | None = None
                 ) -> dict[str, list[dict]]:
    """{mode: [the child's figures per round]} for the modes "plain", "outcore" and, with
    `also_src`, "outcore, --also-src"; each run printed as it ends."""
    import torch

    modes = [("plain", SRC), ("outcore", SRC)]
    if also_src:
        modes.append(("outcore, --also-src", also_src))
    runs: dict = {mode: [] for mode, _ in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            states = {}
            for mode, src in modes:
                out = os.path.join(tmp, f"{r}_{len(states)}.pt")
                proc = subprocess.run(
                    [sys.executable, script, "--child", "plain" if mode == "plain" else "ooc",
                     *child_args, "--out", out], env=dict(os.environ, PYTHONPATH=src),
                    capture_output=True, text=True, check=True)
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                states[mode] = torch.load(out)
                plain = states["plain"]
                result["bitwise"] = states[mode].keys() == plain.keys() and all(
                    torch.equal(plain[k], v) for k, v in states[mode].items())
                runs[mode].append(result)
                print(mode, result, flush=True)
    return runs


def arguments(parser: argparse.ArgumentParser | None = None):
    """The command line every side-by-side benchmark takes: --rounds, --also-src, and
    --child/--out for the runs it starts; `parser` holds a benchmark's own options."""
    ap = parser or argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--also-src", default=None)
    ap.add_argument("--child", default=None)
    ap.add_argument("--out", default=None)
    return ap.parse_args()


def summary(runs: dict, rounds: int, steps: int, counts: list[str]) -> None:
    """Per mode the median (range) of the children's `seconds`, with the outcore runs'
    `counts` per round and whether every run was bitwise plain PyTorch's."""
    print(f"\nseconds of the last {steps // 2} of {steps} iterations, median (range) of "
          f"{rounds} rounds")
    for mode, results in runs.items():
        secs = [x["seconds"] for x in results]
        extra = "" if mode == "plain" else "  " + ", ".join(
            f"{name.replace('_', ' ')} {[x[name] for x in results]}" for name in counts
        ) + f", bitwise {all(x['bitwise'] for x in results)}"
        print(f"{mode:22} {statistics.median(secs):.2f} ({min(secs):.2f}-{max(secs):.2f}){extra}")


def counts(ooc) -> dict:
    """What a child's OutOfCore did, per iteration kind: recorded, deviated, took up
    another plan (rule 9), replayed a plan with smaller arrays (rule 10), passed the
    budget; recorded and deviated in the last half (`late_`, the half timed). Fields an
    older source tree (--also-src) lacks count 0."""
    its = ooc.report().iterations
    return {"records": sum(it.mode == "record" for it in its),
            "deviations": sum(it.deviation is not None for it in its),
            "switched": sum(getattr(it, "switched_at", None) is not None for it in its),
            "smaller": sum(getattr(it, "smaller", False) for it in its),
            "over_budget": sum(it.peak_resident > ooc.budget for it in its),
            "late_records": sum(it.mode == "record" for it in its[len(its) // 2:]),
            "late_deviations": sum(it.deviation is not None for it in its[len(its) // 2:])}
