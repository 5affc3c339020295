"""The smallest budget of a float16 step with a GradScaler (unscale, clipping, Adam):
`outcore.smallest_budget` of one recorded steady step of the `mlp` workload, beside its
gradients' bytes and its in-core peak. A deterministic figure: no timing.

    .venv/bin/python benchmarks/grad_scaler_budget.py
"""
import torch

import outcore
from outcore import workloads


def main() -> None:
    w = workloads.build("mlp", batch=8, optimizer="adam", seed=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)

    def step():
        with torch.autocast("cpu", dtype=torch.float16):
            loss = w.loss()
        scaler.scale(loss).backward()
        scaler.unscale_(w.optimizer)
        torch.nn.utils.clip_grad_norm_(w.model.parameters(), 1.0)
        scaler.step(w.optimizer)
        scaler.update()
        w.optimizer.zero_grad()

    step()                          # Adam's state made: the next step is the steady one
    with outcore.record() as rec:
        step()
    trace = rec.trace
    gradients = sum(a.nbytes for a in trace.arrays if a.category == "gradient")
    print(f"in-core peak {trace.peak()[0]:,} B, gradients {gradients:,} B, "
          f"smallest budget {outcore.smallest_budget(trace):,} B")


if __name__ == "__main__":
    main()
