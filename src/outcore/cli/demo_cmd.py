"""`outcore demo`: the main job on an embedded default.

Trains a ResNet-50 on scikit-learn's handwritten digits (shipped in the package, no
download) twice from the same seed: once in plain PyTorch with all the memory it wants,
once under outcore with a budget of a quarter of what the in-core step holds. Prints
both losses per iteration, whether they are bitwise equal, and outcore's report.
"""
from __future__ import annotations

import time

import torch

from ..errors import OutcoreError
from ..run import OutOfCore
from ..trace import record
from ..units import format_bytes
from ..workloads.digits import digit_batches
from ..workloads.resnet import resnet50


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a CNN in-core and under a budget a quarter its size",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--iterations", type=int, default=6, help="training iterations (default 6)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--fraction", type=float, default=0.25,
                   help="budget as a fraction of the in-core step's memory (default 0.25)")
    p.add_argument("--policy", default="adaptive", help="planning policy (default adaptive)")
    p.add_argument("--swap-dir", default=None, help="where the swap file goes (default: temp dir)")
    p.set_defaults(func=run)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = resnet50(num_classes=10, in_channels=1)
    return model, torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)


def _step(model, opt, x, y):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def run(args) -> int:
    if not 0 < args.fraction <= 1:
        raise OutcoreError(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.iterations < 1:
        raise OutcoreError(f"--iterations must be at least 1, got {args.iterations}")
    print(f"outcore demo: ResNet-50 on handwritten digits ({args.image_size}x{args.image_size}), "
          f"batch {args.batch}, SGD with momentum, {args.iterations} iterations\n")

    model, opt = _setup()
    batches = digit_batches(args.batch, args.image_size)
    plain_losses, plain_times = [], []
    trace = None
    for it in range(args.iterations):
        x, y = next(batches)
        start = time.perf_counter()
        if it == 1:                       # steady state (momentum exists): measure it
            with record() as rec:
                plain_losses.append(_step(model, opt, x, y))
            trace = rec.trace
        else:
            plain_losses.append(_step(model, opt, x, y))
        plain_times.append(time.perf_counter() - start)
    held = trace.peak(actual=True)[0] if trace else 0
    budget = int(held * args.fraction) if trace else None

    model, opt = _setup()
    batches = digit_batches(args.batch, args.image_size)
    ooc_losses, ooc_times = [], []
    if budget is None:
        raise OutcoreError("the demo needs at least 2 iterations to size the budget")
    with OutOfCore(budget=budget, policy=args.policy, swap_dir=args.swap_dir) as ooc:
        for it in range(args.iterations):
            x, y = next(batches)
            start = time.perf_counter()
            with ooc.iteration():
                ooc_losses.append(_step(model, opt, x, y))
            ooc_times.append(time.perf_counter() - start)
        report = ooc.report()

    print(f"in-core step holds {format_bytes(held)} of tensors; outcore budget "
          f"{format_bytes(budget)} ({held / budget:.1f}x smaller)\n")
    print(" iter   in-core loss   outcore loss   equal   in-core s   outcore s   outcore mode")
    for it in range(args.iterations):
        a, b = plain_losses[it], ooc_losses[it]
        same = "yes" if torch.equal(a, b) else "NO"
        print(f" {it + 1:>4}   {a.item():>12.6f}   {b.item():>12.6f}   {same:>5}   "
              f"{plain_times[it]:>9.2f}   {ooc_times[it]:>9.2f}   {report.iterations[it].mode}")
    equal = all(torch.equal(a, b) for a, b in zip(plain_losses, ooc_losses))
    print(f"\nlosses bitwise equal: {'yes' if equal else 'NO'}\n")
    print(report)
    return 0 if equal else 1
