"""What outcore's executor costs per function on this machine (`outcore bench overhead`):
the `per_function_s` of a simulated Machine with `host_time`.

The step is a deep stack of small linear layers (many functions, each a few microseconds
of work), so the difference between the step under OutOfCore and the same step in plain
PyTorch is almost all the executor's own cost: dispatching each op into Python,
matching it against the plan, binding its storages, issuing its actions. The budget is
just below the in-core peak, so the plan moves a few arrays (a replay that moves nothing
runs passive and costs less than a real one) and the time the replay waits for those
transfers is taken out (IterationStats.wait_s). Medians of the steady steps, plain and
outcore interleaved so that both see the same machine.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time

WIDTH, DEPTH, BATCH = 128, 32, 128   # weights and activations of 64 KiB: movable


def measure_overhead(steps: int = 15, directory: str | None = None) -> dict:
    """{"per_function_s", "functions", "plain_s", "outcore_s", "wait_s", "bytes_read",
    "unsteady"}: medians of `steps` steps each, after a warm-up (and the recording) that
    are not counted; "unsteady" says why they cannot be trusted (`unsteady`)."""
    import torch

    from ..errors import OutcoreError
    from ..run.ooc import OutOfCore
    from ..trace.recorder import record

    if steps < 3:
        raise OutcoreError(f"bench overhead needs at least 3 steps, got {steps}")
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    # The plain steps train a twin: stepped between iterations, the managed model's own
    # optimizer would run outside the budget (and outcore would say so, rightly).
    twin = copy.deepcopy(model)
    x = torch.randn(BATCH, WIDTH)

    def stepper(net):
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

        def step():
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return step

    step, plain_step = stepper(model), stepper(twin)
    step()
    plain_step()
    with record() as rec:
        step()
    peak = rec.trace.peak(actual=True)[0]
    plain, under, waits, reads = [], [], [], []
    with tempfile.TemporaryDirectory(dir=directory) as swap, \
            OutOfCore(budget=int(0.9 * peak), swap_dir=swap) as ooc:
        for _ in range(3):                 # recording, planning, the first replay
            with ooc.iteration():
                step()
        for _ in range(steps):
            started = time.perf_counter()
            plain_step()
            plain.append(time.perf_counter() - started)
            with ooc.iteration():
                step()
            it = ooc.report().iterations[-1]
            if it.mode == "replay" and it.deviation is None:
                under.append(it.seconds)
                waits.append(it.wait_s)
                reads.append(it.bytes_read)
        functions = len(ooc.trace.functions)
    if len(under) < 3:
        raise OutcoreError("bench overhead: the step kept deviating from its recording; "
                           "nothing steady to measure")
    plain_s, outcore_s, wait_s = (statistics.median(v) for v in (plain, under, waits))
    return {"per_function_s": max(0.0, (outcore_s - wait_s - plain_s) / functions),
            "functions": functions, "plain_s": plain_s, "outcore_s": outcore_s, "wait_s": wait_s,
            "bytes_read": int(statistics.median(reads)),
            "unsteady": unsteady(plain, under, waits)}


def unsteady(plain: list, under: list, waits: list) -> list[str]:
    """Why the figure cannot be trusted, in words (empty: it can): steps of one kind whose
    middle half spans more than UNSTEADY times (NOTE [Unsteady runs] in output.py), or outcore's
    steps, their waits taken out, shorter than plain ones (the per-op figure is then
    clamped to 0). helper-204 saw "0.0 µs per op" beside a plain step of 153.9 ms, 10.3 ms
    on a rerun, and nothing said so."""
    from .output import UNSTEADY
    own = [u - w for u, w in zip(under, waits)]
    said = []
    for name, times in (("plain steps", plain), ("outcore's steps (waits taken out)", own)):
        # The middle half: steps of a few milliseconds vary twofold now and then on a
        # quiet machine (a collection, a page fault; 5.0 to 10.6 ms here), which moves no
        # median; a machine busy for a good part of the run moves the quartiles.
        low, _, high = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
        if low > 0 and high / low > UNSTEADY:
            said.append(f"the middle half of the {name} took {low * 1e3:.1f} to "
                        f"{high * 1e3:.1f} ms")
    # As the figure takes them: medians apart (`measure_overhead`).
    own_s = statistics.median(under) - statistics.median(waits)
    plain_s = statistics.median(plain)
    if own_s < plain_s:
        said.append(f"outcore's steps took less than plain ones ({own_s * 1e3:.1f} against "
                    f"{plain_s * 1e3:.1f} ms, medians), so the cost per op is shown as 0")
    return said
