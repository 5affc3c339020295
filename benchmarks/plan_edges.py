"""Planned traffic and simulated iteration time with and without `keep_state`, per budget.

    .venv/bin/python benchmarks/plan_edges.py [--policies adaptive,fixed,adaptive-belady]

Trace: the demo's ResNet-50 (1 channel, 10 classes) on 64x64 digits, batch 64, SGD with
momentum, recorded on the CPU after one warm-up step. Budgets are fractions of its
in-core peak, less the small arrays OutOfCore pins (as the executor plans). Simulation:
`cpu-disk`, iteration time (the step plus the state moved at its edges). The table in
docs/planning.md ("State at the edges of the step") was made with this script.
"""
from __future__ import annotations

import argparse

import torch

import outcore
from outcore.run.ooc import planned_budget
from outcore.workloads.digits import digit_batches
from outcore.workloads.resnet import resnet50


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="adaptive,fixed,adaptive-belady")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resnet50(num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    x, y = next(digit_batches(64, 64))

    def step():
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    step()
    with outcore.record() as rec:
        step()
    t = rec.trace
    peak = t.peak(actual=True)[0]
    state = sum(a.nbytes for a in t.arrays if a.kind == "persistent")
    mib = 2 ** 20
    print(f"peak {peak / mib:.0f} MiB, state {state / mib:.0f} MiB; MiB in/out, simulated iteration s")
    policies = args.policies.split(",")
    print("| budget / peak | keep_state | " + " | ".join(policies) + " |")
    print("|---|---|" + "---|" * len(policies))
    for frac in (0.999, 0.95, 0.8, 0.5, 0.25):
        budget = planned_budget(t, int(peak * frac))
        for keep in (False, True):
            cells = []
            for policy in policies:
                s = outcore.plan(t, budget, policy, keep_state=keep)
                sim = outcore.simulate(t, s)
                cells.append(f"{s.bytes_in / mib:.0f}/{s.bytes_out / mib:.0f}, {sim.iteration_time_s:.2f}")
            print(f"| {frac} | {keep} | " + " | ".join(cells) + f" |  (in-core {sim.in_core_time_s:.2f} s)")


if __name__ == "__main__":
    main()
