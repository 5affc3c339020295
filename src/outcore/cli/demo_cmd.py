"""`outcore demo`: the main job on an embedded default.

Trains a ResNet-50 on scikit-learn's handwritten digits (shipped in the package, no
download) twice from the same seed, each in a fresh process: once in plain PyTorch
with all the memory it wants, once under outcore with a budget of a quarter of what
the in-core step holds. Prints both losses per iteration, whether they are bitwise
equal, the peak resident set of each process, why the bytes outcore moved differ from
the plan, and outcore's report; writes the memory picture, the timeline and the report.

A fresh process per run keeps the two apart: the peak resident set (VmHWM) of each is
its own, and the C allocator's state of one does not carry into the other.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from ..errors import OutcoreError
from ..memory.malloc import peak_resident_bytes, resident_bytes
from ..memory.pages import plain_environment
from ..units import format_bytes


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a CNN in-core and under a budget a quarter its size",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--iterations", type=int, default=6, help="training iterations (default 6)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--fraction", type=float, default=0.25,
                   help="budget as a fraction of the in-core step's memory (default 0.25)")
    p.add_argument("--policy", default="auto", help="planning policy (default auto)")
    p.add_argument("--swap-dir", default=None, help="where the swap file goes (default: temp dir)")
    p.add_argument("--out", default="outcore-demo",
                   help="directory for the memory picture (memory.png), the timeline "
                        "(timeline.json, opens in ui.perfetto.dev) and the report (report.json); "
                        "default ./outcore-demo")
    p.set_defaults(func=run)


# -- the two runs, each in its own process ---------------------------------------------------
def _setup(seed: int = 0):
    import torch

    from ..workloads.resnet import resnet50
    torch.manual_seed(seed)
    model = resnet50(num_classes=10, in_channels=1)
    return model, torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)


def _step(model, opt, x, y):
    import torch
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def _loaded(batches):
    """The batches with the data set loaded: the first batch is taken now (it imports
    scikit-learn and makes the images) so that the resident set measured next is the one
    training starts from; it is handed out first."""
    import itertools
    first = next(batches)
    return itertools.chain([first], batches)


def _plain(cfg: dict) -> dict:
    """In-core: trains, records iteration 2 (steady state: momentum exists) to size the
    budget, and reports the resident set it grew by."""
    import time as _time

    from ..trace import record
    from ..workloads.digits import digit_batches
    model, opt = _setup()
    batches = _loaded(digit_batches(cfg["batch"], cfg["image_size"]))
    start_rss = resident_bytes()
    losses, times, held = [], [], 0
    for it in range(cfg["iterations"]):
        x, y = next(batches)
        start = _time.perf_counter()
        if it == 1:
            with record() as rec:
                losses.append(_step(model, opt, x, y))
            held = rec.trace.peak(actual=True)[0]
        else:
            losses.append(_step(model, opt, x, y))
        times.append(_time.perf_counter() - start)
    return {"losses": [loss.item().hex() for loss in losses], "times": times, "held": held,
            "start_rss": start_rss, "peak_rss": peak_resident_bytes()}


def _outcore(cfg: dict) -> dict:
    """Under the budget: trains, then writes the picture, the timeline and the report of
    the last replayed iteration into cfg["out"], and compares its traffic with the plan."""
    import time as _time

    from ..run import OutOfCore
    from ..workloads.digits import digit_batches
    model, opt = _setup()
    batches = _loaded(digit_batches(cfg["batch"], cfg["image_size"]))
    start_rss = resident_bytes()
    losses, times = [], []
    out = cfg["out"]
    with OutOfCore(budget=cfg["budget"], policy=cfg["policy"], swap_dir=cfg["swap_dir"]) as ooc:
        for _ in range(cfg["iterations"]):
            x, y = next(batches)
            start = _time.perf_counter()
            with ooc.iteration():
                losses.append(_step(model, opt, x, y))
            times.append(_time.perf_counter() - start)
        report = ooc.report()
        peak_rss = peak_resident_bytes()      # before drawing: matplotlib is not the training's
        files, traffic = {}, None
        if ooc._last_replay is not None:
            os.makedirs(out, exist_ok=True)
            files["picture"] = os.path.join(out, "memory.png")
            files["timeline"] = os.path.join(out, "timeline.json")
            ooc.plot(files["picture"])
            ooc.timeline(files["timeline"])
            traffic = ooc.traffic().lines()
        if files:
            files["report"] = os.path.join(out, "report.json")
            report.save(files["report"])
    return {"losses": [loss.item().hex() for loss in losses], "times": times,
            "start_rss": start_rss, "peak_rss": peak_rss, "report": str(report),
            "modes": [it.mode for it in report.iterations], "traffic": traffic, "files": files}


def _child(kind: str, cfg: dict) -> dict:
    """Run `kind` ("plain" or "outcore") in a fresh Python process; its last line is JSON."""
    proc = subprocess.run([sys.executable, "-m", "outcore.cli.demo_cmd", kind, json.dumps(cfg)],
                          capture_output=True, text=True,
                          env=plain_environment() if kind == "plain" else None)
    if proc.returncode != 0:
        raise OutcoreError(f"the demo's {kind} run failed (exit {proc.returncode}):\n"
                           + proc.stderr.strip()[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the parent: runs both and prints them side by side ------------------------------------------
def _writable_out(out: str) -> None:
    """--out is checked before the two runs (a minute and more), not when the files are
    written at their end: it is made now if need be, and must take a file."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise OutcoreError(f"--out {out}: {exc.strerror or exc}; pass --out a directory you can "
                           "write to (it is made if it does not exist)") from None


def run(args) -> int:
    if not 0 < args.fraction <= 1:
        raise OutcoreError(f"--fraction must be in (0, 1], got {args.fraction}")
    # Checked before the in-core run's half minute (helper-204: --batch 0 trained on NaN
    # losses and said "bitwise equal: yes"; --policy foo failed after the in-core run).
    if args.iterations < 3:
        raise OutcoreError(f"--iterations must be at least 3 (the second sizes the budget; "
                           f"outcore records the first two, as momentum is made in the first "
                           f"step, and draws the third), got {args.iterations}")
    if args.image_size < 1 or args.batch < 1:
        raise OutcoreError(f"--batch and --image-size must be at least 1, got {args.batch} and "
                           f"{args.image_size}")
    side = -(-args.image_size // 32)        # ResNet-50 halves the side five times, rounding up
    if args.batch * side * side < 2:
        raise OutcoreError(f"ResNet-50's last batch norm would see one value per channel (batch "
                           f"{args.batch}, {side}x{side}), and training needs more: pass "
                           "--batch 2 or more, or --image-size 33 or more")
    from ..plan import POLICIES
    if args.policy not in POLICIES:
        raise OutcoreError(f"--policy {args.policy!r} is not a planning policy; choose one of "
                           f"{', '.join(POLICIES)}")
    if args.swap_dir is not None and not os.path.isdir(args.swap_dir):
        # Checked before the in-core run, which would otherwise take its half minute first.
        what = ("is a file, not a directory; pass a directory" if os.path.exists(args.swap_dir)
                else "does not exist; create it first")
        raise OutcoreError(f"--swap-dir {args.swap_dir} {what}, or leave --swap-dir out for the "
                           "system's temporary directory")
    _writable_out(args.out)
    print(f"outcore demo: ResNet-50 on handwritten digits ({args.image_size}x{args.image_size}), "
          f"batch {args.batch}, SGD with momentum, {args.iterations} iterations, each run in a "
          "fresh process\n", flush=True)
    cfg = {"iterations": args.iterations, "batch": args.batch, "image_size": args.image_size}
    started = time.perf_counter()
    plain = _child("plain", cfg)
    held = plain["held"]
    budget = int(held * args.fraction)
    ooc = _child("outcore", {**cfg, "budget": budget, "policy": args.policy,
                             "swap_dir": args.swap_dir, "out": args.out})

    print(f"in-core step holds {format_bytes(held)} of tensors; outcore budget "
          f"{format_bytes(budget)} ({held / budget:.1f}x smaller)\n")
    print(" iter   in-core loss   outcore loss   equal   in-core s   outcore s   outcore mode")
    equal = True
    for it in range(args.iterations):
        a, b = plain["losses"][it], ooc["losses"][it]
        same = a == b                     # the float32 losses' exact bits (float.hex)
        equal &= same
        print(f" {it + 1:>4}   {float.fromhex(a):>12.6f}   {float.fromhex(b):>12.6f}   "
              f"{'yes' if same else 'NO':>5}   {plain['times'][it]:>9.2f}   "
              f"{ooc['times'][it]:>9.2f}   {ooc['modes'][it]}")
    print(f"\nlosses bitwise equal: {'yes' if equal else 'NO'}\n")

    print("memory of each process (VmHWM: its peak resident set; 'start' is its resident set "
          "once the model is built and the data loaded, before the first step)")
    print("   run        start        peak   peak - start")
    for name, r in (("in-core", plain), ("outcore", ooc)):
        print(f"   {name:<8} {format_bytes(r['start_rss']):>11} {format_bytes(r['peak_rss']):>11} "
              f"{format_bytes(r['peak_rss'] - r['start_rss']):>14}")
    grew_plain = plain["peak_rss"] - plain["start_rss"]
    grew_ooc = ooc["peak_rss"] - ooc["start_rss"]
    if grew_plain > 0:
        print(f"   outcore's process grew {grew_ooc / grew_plain:.2f}x as much as plain PyTorch's; "
              f"its budget covers the tensors outcore manages, the rest is the allocator's and "
              "the libraries' (docs/state.md)\n")
    if ooc["traffic"]:
        print("planned against measured bytes, last replayed iteration:")
        for line in ooc["traffic"]:
            print(f"   {line}")
        print()
    print(ooc["report"])
    if not ooc["files"]:
        print("\nno iteration replayed a plan to its end, so no memory picture, timeline or "
              "report was written: run more --iterations")
    else:
        print(f"\nmemory picture {ooc['files']['picture']}, timeline {ooc['files']['timeline']} "
              f"(open it in ui.perfetto.dev or chrome://tracing), report {ooc['files']['report']} "
              f"(outcore report {ooc['files']['report']})")
    print(f"\ndemo took {time.perf_counter() - started:.0f} s")
    return 0 if equal else 1


if __name__ == "__main__":
    kind, config = sys.argv[1], json.loads(sys.argv[2])
    result = {"plain": _plain, "outcore": _outcore}[kind](config)
    print(json.dumps(result))
