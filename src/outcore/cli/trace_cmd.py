"""`outcore trace`: record one training iteration of a built-in model and print its summary."""
from __future__ import annotations

import argparse
import sys
import time

from .. import workloads
from ..trace import record
from . import check_output


def _whole(least: int, said: str):
    """An argparse type: a whole number of at least `least`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {said}, got {value}")
        return value
    return parse


_positive, _count = _whole(1, "at least 1"), _whole(0, "0 or more")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "trace", help="record one training iteration of a built-in model as a Trace",
        description="Record one training iteration (forward, backward, optimizer step) of a "
                    "built-in model and print the trace summary. On --device meta nothing is "
                    "allocated or computed, so models far larger than this machine record in "
                    "seconds; durations are then estimated from FLOPs and bytes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="models:\n" + "\n".join(f"  {s.name:<12} {s.description}"
                                       for s in workloads.SPECS.values())
               + "\n\nexample:\n  outcore trace --model resnet50 --batch 1440 --device meta -o r50.json")
    p.add_argument("--model", required=True, choices=sorted(workloads.SPECS), metavar="NAME",
                   help="built-in model (listed below)")
    p.add_argument("--batch", type=_positive, default=None, help="batch size (default: per model)")
    p.add_argument("--device", choices=("meta", "cpu"), default="meta",
                   help="meta: no memory or compute, estimated durations (default); "
                        "cpu: run for real, measured durations")
    p.add_argument("--optimizer", choices=sorted(workloads.OPTIMIZERS), default="sgd",
                   help="sgd is SGD with momentum 0.9 (default: sgd)")
    p.add_argument("--image-size", type=_positive, default=None, help="image side for CNNs (default 224)")
    p.add_argument("--seq-len", type=_positive, default=None, help="sequence length for GPT-2 (default 1024)")
    p.add_argument("--warmup", type=_count, default=1,
                   help="untraced iterations before the recorded one, so lazily created optimizer "
                        "state exists as in steady state (default 1; 0 records the very first step)")
    p.add_argument("-o", "--output", help="write the trace as JSON to this file")
    p.set_defaults(func=run)


def _progress(text: str) -> None:
    """A line on stderr, so that stdout stays the summary (a big model on the CPU takes
    minutes per step)."""
    print(f"outcore trace: {text}", file=sys.stderr, flush=True)


def run(args) -> int:
    given = workloads.sizes(args.model, image_size=args.image_size,     # before a word
                            seq_len=args.seq_len)
    if args.output:
        check_output(args.output, "-o")
    _progress(f"building {args.model} on {args.device}")
    w = workloads.build(args.model, batch=args.batch, device=args.device, optimizer=args.optimizer,
                        image_size=args.image_size, seq_len=args.seq_len)
    for k in range(args.warmup):
        _progress(f"warm-up step {k + 1} of {args.warmup}")
        workloads.run_step(w)
    # The sizes given name it too: simulate's rows and the picture's title show the label
    # (helper-204: "gpt2 batch 4 adam on meta" for --seq-len 256).
    sized = "".join(f" {v}x{v}" if k == "image_size" else f" seq {v}" for k, v in given.items())
    label = f"{args.model}{sized} batch {len(w.batch[0])} {args.optimizer} on {args.device}"
    _progress("recording one step")
    start = time.perf_counter()
    with record(label=label) as rec:
        workloads.run_step(w)
    elapsed = time.perf_counter() - start
    trace = rec.trace
    if args.output:                  # before a word: output cut short still leaves the file
        trace.save(args.output)
    print(trace)
    print(f"  recorded in {elapsed:.2f} s")
    if args.output:
        print(f"  written to {args.output}")
    return 0
