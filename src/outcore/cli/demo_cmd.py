"""`outcore demo`: the main job on an embedded default."""
from __future__ import annotations

from .. import workloads
from ..trace import record


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on an embedded default model",
                       description="Record one training iteration of a ResNet-18 and print what "
                                   "outcore sees.")
    p.set_defaults(func=run)


def run(args) -> int:
    w = workloads.build("resnet18", batch=16, image_size=64, optimizer="sgd")
    w.step()
    with record(label="demo: resnet18 batch 16, 64x64, SGD") as rec:
        w.step()
    print(rec.trace)
    return 0
