"""`outcore state DIR`: what a state_dir keeps (NOTE [Durable state] in run/durable.py)."""
from __future__ import annotations

from ..run.durable import describe


def add_parser(sub) -> None:
    p = sub.add_parser(
        "state", help="say what a state_dir keeps and what resume() there takes",
        description="Say what an OutOfCore(..., state_dir=DIR) kept: the iterations done, "
                    "the state file, the model's tensors, the optimizers (in the order "
                    "resume() takes them) and the extra= states. Reads the manifest only; "
                    "changes nothing. Exits 1 where resume() would refuse the directory as "
                    "damaged (its state file gone or cut short).")
    p.add_argument("directory", help="the state_dir")
    p.set_defaults(func=run)


def run(args) -> int:
    said, damaged = describe(args.directory)
    print(said)
    return 1 if damaged else 0
