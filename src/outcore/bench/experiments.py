"""The experiments: which configs to run, and the memory figures that choose them.

* `curve`: one model and batch; outcore at budgets from the in-core peak down to the
  smallest feasible, beside in-core, checkpointing and offload hooks (whose memory is
  what it is). Samples/s against peak RSS.
* `batch` (the paper's experiment): a fixed budget, the in-core peak at a base batch;
  the largest batch each variant trains within it (found on meta tensors, no compute),
  and its samples/s against in-core at its own largest batch.
Every outcore run also carries the simulator's prediction of its step time.
"""
from __future__ import annotations

import datetime
import os
import platform

import torch

from ..errors import OutcoreError
from ..units import format_bytes
from ..memory.pages import TORCH_ENV
from ..plan.feasibility import min_feasible_budget
from ..run.ooc import MIN_MOVE_BYTES
from ..trace import record
from ..workloads import build
from .runner import Progress, run_config
from .variants import DiskOffload, checkpoint_blocks, step_under



def shape_of(model: str, image_size: int | None, seq_len: int | None) -> dict:
    """The size arguments given for `model` (workloads.sizes: refused where it takes none
    of that name)."""
    from ..workloads import sizes
    return sizes(model, image_size=image_size, seq_len=seq_len)


def memory_on_meta(model: str, batch: int, variant: str, **shape) -> dict:
    """The step's managed peak (bytes of tensors alive at once) for `variant`, and the
    smallest budget outcore can plan it under, from a recording on meta tensors."""
    w = build(model, batch=batch, device="meta", **shape)
    if variant == "checkpoint":
        checkpoint_blocks(w.model, on_meta=True)
    # Either offload of saved activations takes them out of the step's memory alike.
    hooks = DiskOffload(meta=True) if variant in ("offload-hooks", "streamed-offload") else None

    step_under(w, hooks)                    # lazily created optimizer state
    with record() as rec:
        step_under(w, hooks)
    trace = rec.trace
    pinned = sum(a.nbytes for a in trace.arrays if a.nbytes < MIN_MOVE_BYTES)   # as OutOfCore plans
    return {"peak": trace.peak()[0], "min_budget": min_feasible_budget(trace) + pinned}


def _require_ram(need: int, what: str, model: str, batch: int) -> None:
    """Refuse, before any run, a bench whose runs would hold more tensors than this
    process may use in RAM (the machine's, or its cgroup's limit): the kernel would kill
    them, or swap the machine to a halt, after minutes (helper-204: `bench curve --model
    gpt2` at its default batch of 64 holds 214 GiB in-core, on a machine of 24 GiB)."""
    from ..run.movers.host import memory_limit
    ram = memory_limit()
    if need > ram:
        raise OutcoreError(f"{what} of {model} at batch {batch} holds {format_bytes(need)} of "
                           f"tensors, more than the {format_bytes(ram)} of RAM this process may "
                           "use: pass a smaller --batch (or --seq-len / --image-size)")


def largest_batch(fits, start: int, cap: int) -> int:
    """The largest batch in [1, cap] for which fits(batch) holds (fits must be monotone:
    true up to some batch, false after); 0 if not even the smallest fits. A model that
    cannot train at batch 1 (a ResNet at 32x32 reaches its last batch norm at 1x1, one
    value per channel: OutcoreError from `run_step`) is searched from batch 2
    (helper-204: a traceback)."""
    smallest = 1
    try:
        small = fits(1)
    except OutcoreError:
        smallest, small = 2, cap >= 2 and fits(2)
    if not small:
        return 0
    lo, hi = smallest, None           # fits(lo); not fits(hi)
    b = max(start, smallest + 1)
    while b <= cap:                   # double from `start` until it stops fitting
        if not fits(b):
            hi = b
            break
        lo, b = b, b * 2
    if hi is None:
        if fits(cap):
            return cap
        hi = cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def machine_info(disk: dict, device: str = "cpu") -> dict:
    info = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "platform": platform.platform(),
            "disk": disk, "torch_threads": torch.get_num_threads(), "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# Plain PyTorch with glibc keeping every tensor on its heap and never trimming it: no page
# faults, the allocator setting outcore's trim governor starts from (a reference for
# how much of outcore's speed is the allocator's, not the schedule's).
HEAP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}
HEAP_ROLE = "glibc heap, no trim"
BASELINES = ("in-core", "in-core-heap", "checkpoint", "offload-hooks", "streamed-offload")
# Baselines that exist on one device only: glibc's heap is the CPU's; the streamed
# offload copies on CUDA streams.
ONLY_ON = {"in-core-heap": "cpu", "streamed-offload": "cuda"}


# NOTE [The predictions' compute]: the simulator scales a trace's op durations to an
# in-core step and adds the executor's cost per op (`outcore bench overhead`, measured once
# per command). The in-core step is plain PyTorch's with huge pages as outcore runs its
# ops (`import outcore` turns them on: docs/executor.md, "Huge pages"), not as users run
# plain PyTorch: ResNet-50 128x128 batch 64 faults 1409k times a step without them and
# 137k with, 3.92 against 3.17 s; scaled to the first, the predictions of three cases
# came out at -17% to +22% of the measured steps, scaled to the second at -10% to +3%
# (docs/results.md, "Prediction: simulated against measured"). The comparison ("vs
# in-core") and the "physical limit" column stay with plain PyTorch as users run it;
# the "cut limit" is the simulator's, on the calibrated machine. Each round of repeats
# runs the calibration before outcore's runs, and each prediction is scaled to its own
# round's: two rounds' calibration runs differed by 12% (ResNet-50 128x128, 3.70 and
# 3.29 s), and a prediction scaled to the other round's was off by as much. Where the
# calibration run failed, the predictions fall back to plain PyTorch's step without
# the executor's cost (the calibration before this one). `bench batch` has no
# calibration run: its predictions are scaled to plain PyTorch's step at each batch (of
# the same round), without that cost.
CALIBRATION_ROLE = "the predictions' compute"


def _calibration(base: dict, outcore_env: dict | None) -> dict:
    """Plain PyTorch with huge pages as outcore's runs get them: --thp/--no-thp, else
    what this process's environment says (the user's setting, or outcore's "1")."""
    thp = (outcore_env or {}).get(TORCH_ENV, os.environ.get(TORCH_ENV, "1"))
    return dict(base, variant="in-core", role=CALIBRATION_ROLE, env={TORCH_ENV: thp})


def _baseline(base: dict, name: str) -> dict:
    if name == "in-core-heap":
        return dict(base, variant="in-core", role=HEAP_ROLE, env=HEAP_ENV)
    return dict(base, variant=name)


def _plain(cfg: dict) -> bool:
    """A run of plain PyTorch as users run it: the compute of the physical limit."""
    return cfg["variant"] == "in-core" and cfg.get("role") not in (HEAP_ROLE, CALIBRATION_ROLE)


def _plain_in_core(cfg: dict, result: dict) -> bool:
    """A finished run of plain PyTorch as users run it."""
    return _plain(cfg) and "step_s" in result


def _run_all(configs: list[dict], repeat: int, before=None, after=None) -> list[dict]:
    """Run every config `repeat` times, round-robin (so that a slow spell of the machine
    hits every variant alike), each in a fresh process. A config's result is the run
    with the median step time (the lower one of an even count), with every run's step
    time in `step_s_repeats`, and the config that run was given. before(cfg) may add to
    a copy of the config before each run; after(cfg, result) sees each run's result: a
    run is given what its own round's earlier runs measured (NOTE [The predictions'
    compute]: each round's calibration run precedes its outcore runs)."""
    progress = Progress(len(configs) * repeat)
    results: list[list[tuple[dict, dict]]] = [[] for _ in configs]
    for _ in range(repeat):
        for i, cfg in enumerate(configs):
            given = dict(cfg)
            if before is not None:
                before(given)
            result = run_config(given, progress)
            if after is not None:
                after(given, result)
            results[i].append((given, result))
    runs = []
    for rs in results:
        ok = sorted((r for r in rs if "step_s" in r[1]), key=lambda r: r[1]["step_s"])
        if not ok:
            runs.append({"config": rs[0][0], "result": rs[0][1]})
            continue
        given, chosen = ok[(len(ok) - 1) // 2]
        chosen = dict(chosen, step_s_repeats=[r.get("step_s") for _, r in rs])
        runs.append({"config": given, "result": chosen})
    return runs


def _note_round(compute: dict, key: str, result: dict) -> None:
    """This round's figure under `key` for the runs after it in the round: its step, or
    none where the run failed (helper-149: a failed calibration run left the round
    before's figure to the next round's predictions)."""
    if "step_s" in result:
        compute[key] = result["step_s"]
    else:
        compute.pop(key, None)


def _base(model, batch, shape, steps, swap_dir, optimizer, device="cpu"):
    return {"model": model, "batch": batch, "optimizer": optimizer, "steps": steps, "warmup": 1,
            "swap_dir": swap_dir, "device": device, **shape}


def curve(model: str, batch: int, *, image_size=None, seq_len=None, fractions=(1, 0.5, 0.25, 0.125),
          policies=("on-demand", "fixed", "adaptive"), steps=3, swap_dir=None, optimizer="sgd",
          baselines=("in-core", "checkpoint", "offload-hooks"), outcore_env=None, memory=True,
          repeat=1, disk, device: str = "cpu", per_function_s=0.0) -> dict:
    """On a GPU (`device="cuda"`) outcore runs offload="host"; no prediction nor
    physical limit is made (the simulator's calibration here is the CPU's and the
    disk's). On the CPU one more in-core run gives the predictions' compute (NOTE [The
    predictions' compute]); `per_function_s` is the executor's cost per op, and `disk`
    the disk's figures (`bench disk`), each or a function that measures it (called
    after the checks, before the runs)."""
    shape = shape_of(model, image_size, seq_len)
    mem = memory_on_meta(model, batch, "in-core", **shape)
    floor = int(mem["min_budget"] * 1.05)
    budgets = sorted({int(mem["peak"] * f) for f in fractions if mem["peak"] * f >= floor} | {floor},
                     reverse=True)
    if device == "cpu":
        in_core = [b for b in baselines if b.startswith("in-core")]
        in_core += ["the predictions' compute"] if policies else []
        _require_ram(mem["peak"] if in_core else max(budgets),
                     f"the in-core step ({', '.join(in_core)})" if in_core
                     else "the largest outcore budget", model, batch)
    disk = disk() if callable(disk) else disk               # measured once the runs fit
    if callable(per_function_s):
        per_function_s = per_function_s()
    base = _base(model, batch, shape, steps, swap_dir, optimizer, device)
    configs = [_baseline(base, v) for v in baselines]
    if device == "cpu" and policies:
        configs.append(_calibration(base, outcore_env))
    configs += [dict(base, variant="outcore", policy=p, budget=b, env=outcore_env or {},
                     return_freed_memory=memory)
                for b in budgets for p in policies]
    compute: dict = {}

    def before(cfg):
        if cfg["variant"] == "outcore" and compute and device == "cpu":
            calibrated = "calibration" in compute
            cfg.update(compute_s=compute["calibration" if calibrated else "s"], disk=disk,
                       per_function_s=per_function_s if calibrated else 0.0)

    def after(cfg, result):
        key = ("s" if _plain(cfg) else
               "calibration" if cfg.get("role") == CALIBRATION_ROLE else None)
        if key is not None:         # a failed run leaves its round's outcore runs without
            _note_round(compute, key, result)      # it, not with another round's figure
    runs = _run_all(configs, repeat, before, after)
    # The physical limit's compute: plain in-core's reported (median) run. (Each
    # prediction was made with its own round's calibration run.)
    compute_s = next((r["result"]["step_s"] for r in runs if _plain_in_core(r["config"], r["result"])), None)
    return {"experiment": "curve", "model": model, "batch": batch, "shape": shape,
            "in_core_peak": mem["peak"], "min_budget": mem["min_budget"], "budgets": budgets,
            "compute": {str(batch): compute_s} if device == "cpu" else {},
            "machine": machine_info(disk, device), "runs": runs}


def batch_sweep(model: str, base_batch: int, *, image_size=None, seq_len=None, factors=(2, 4, 8),
                policies=("adaptive",), steps=3, swap_dir=None, optimizer="sgd", cap_factor=16,
                baselines=("checkpoint", "offload-hooks"), outcore_env=None, memory=True,
                repeat=1, disk, device: str = "cpu") -> dict:
    """The paper's experiment under budget = the in-core peak at `base_batch` (on a GPU
    as `curve` says)."""
    shape = shape_of(model, image_size, seq_len)
    budget = memory_on_meta(model, base_batch, "in-core", **shape)["peak"]
    if device == "cpu":
        _require_ram(budget, "the in-core step at the base batch (the budget)", model,
                     base_batch)
    cap = cap_factor * base_batch
    memo: dict = {}

    def mem(variant, b):
        key = (variant, b)
        if key not in memo:
            memo[key] = memory_on_meta(model, b, "in-core" if variant == "outcore" else variant, **shape)
        return memo[key]
    largest = {"in-core": largest_batch(lambda b: mem("in-core", b)["peak"] <= budget, base_batch, cap)}
    for v in baselines:
        largest[v] = largest_batch(lambda b, v=v: mem(v, b)["peak"] <= budget, base_batch, cap)
    largest["outcore"] = largest_batch(lambda b: mem("outcore", b)["min_budget"] <= budget, base_batch, cap)

    outcore_batches = sorted({min(f * base_batch, largest["outcore"]) for f in factors})
    if device == "cpu":        # in-core runs at those batches give their compute time
        for b in outcore_batches:
            _require_ram(mem("in-core", b)["peak"], "the in-core run with unbounded memory "
                         "(the compute time at that batch; pass smaller --factors)", model, b)
    disk = disk() if callable(disk) else disk               # measured once the runs fit
    base = _base(model, base_batch, shape, steps, swap_dir, optimizer, device)
    configs = [dict(base, batch=largest["in-core"], variant="in-core", role="reference")]
    configs += [dict(_baseline(base, v), batch=largest[v]) for v in baselines if largest[v]]
    for b in outcore_batches:       # in-core with unbounded memory: compute time at b
        if b != largest["in-core"]:
            configs.append(dict(base, batch=b, variant="in-core", role="unbounded memory"))
    configs += [dict(base, batch=b, variant="outcore", policy=p, budget=budget, env=outcore_env or {},
                     return_freed_memory=memory)
                for b in outcore_batches for p in policies]
    compute: dict = {}

    def before(cfg):
        if cfg["variant"] == "outcore" and str(cfg["batch"]) in compute and device == "cpu":
            cfg.update(compute_s=compute[str(cfg["batch"])], disk=disk)

    def after(cfg, result):
        if _plain(cfg):
            _note_round(compute, str(cfg["batch"]), result)
    runs = _run_all(configs, repeat, before, after)
    for r in runs:              # the physical limit's compute: the reported (median) runs
        if _plain_in_core(r["config"], r["result"]):
            compute[str(r["config"]["batch"])] = r["result"]["step_s"]
    return {"experiment": "batch", "model": model, "batch": base_batch, "shape": shape,
            "budget": budget, "largest": largest, "compute": compute if device == "cpu" else {},
            "machine": machine_info(disk, device), "runs": runs}
