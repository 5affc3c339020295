"""One benchmark run, alone in a fresh process (`python -m outcore.bench.child CONFIG`).

A fresh process per run keeps runs apart: the C allocator's state, the page cache, the
peak RSS (VmHWM) and, for outcore, its process-wide malloc settings. The config is JSON
(see `RunConfig` in runner.py); the last line printed is the result as JSON."""
from __future__ import annotations

import json
import statistics
import sys
import time


def _progress(done: int, total: int) -> None:
    print(f"step {done}/{total}", file=sys.stderr, flush=True)


def run(cfg: dict) -> dict:
    import torch

    import outcore
    from outcore.memory.malloc import page_faults as _faults
    from outcore.memory.malloc import peak_resident_bytes, resident_bytes
    from outcore.workloads import build

    from .variants import DiskOffload, HostOffload, StreamedOffload, checkpoint_blocks, step_under

    device = cfg.get("device", "cpu")
    cuda = device == "cuda"
    torch.manual_seed(cfg.get("seed", 0))
    w = build(cfg["model"], batch=cfg["batch"], optimizer=cfg.get("optimizer", "sgd"), device=device,
              image_size=cfg.get("image_size"), seq_len=cfg.get("seq_len"), seed=cfg.get("seed", 0))
    baseline_rss = resident_bytes()
    variant, steps, warmup = cfg["variant"], cfg["steps"], cfg.get("warmup", 1)
    out: dict = {"baseline_rss": baseline_rss}
    times: list[float] = []
    faults: list[int] = []
    gpu_peaks: list[int] = []        # torch.cuda.max_memory_allocated() of each timed step

    def timed(step, keep) -> None:
        """Run one step (on a GPU until the device has finished it); when keep() says
        so afterwards, note its time, page faults and GPU peak."""
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start, faulted = time.perf_counter(), _faults()
        step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if keep():
            times.append(elapsed)
            faults.append(_faults() - faulted)
            if cuda:
                gpu_peaks.append(torch.cuda.max_memory_allocated())

    if variant in ("in-core", "checkpoint", "offload-hooks", "streamed-offload"):
        if variant == "checkpoint":
            out["checkpointed_blocks"] = checkpoint_blocks(w.model)
        offload = None
        if variant == "offload-hooks":
            offload = HostOffload() if cuda else DiskOffload(cfg.get("swap_dir"))
        elif variant == "streamed-offload":
            offload = StreamedOffload(device)

        def step():
            step_under(w, offload)
        try:
            for i in range(warmup + steps):
                if offload is not None and i == warmup:
                    offload.bytes_read = offload.bytes_written = 0
                    offload.io_s = 0.0
                timed(step, lambda: i >= warmup)
                _progress(i + 1, warmup + steps)
            if offload is not None:
                out.update(read=offload.bytes_read / steps, written=offload.bytes_written / steps,
                           stalled=offload.io_s / steps)
        finally:
            if offload is not None:
                offload.close()
    elif variant == "outcore":
        memory = {} if cuda else {"return_freed_memory": cfg.get("return_freed_memory", True)}
        with outcore.OutOfCore(budget=cfg["budget"], policy=cfg["policy"], swap_dir=cfg.get("swap_dir"),
                               offload="host" if cuda else "disk",
                               recompute=cfg.get("recompute", "auto"), **memory) as ooc:
            # Recording iterations first (two for an optimizer that creates its state
            # lazily), then `steps` replays; a few spare in case of a re-record.
            total = steps + 4

            def step():
                with ooc.iteration():
                    w.step()
            for i in range(total + 4):
                timed(step, lambda: ooc.report().iterations[-1].mode == "replay")
                _progress(i + 1, total)
                if len(times) == steps:
                    break
            report = ooc.report()
        replays = [it for it in report.iterations if it.mode == "replay"][-len(times):]
        if not replays:
            raise RuntimeError("outcore never replayed a plan: every iteration re-recorded")
        out.update(
            read=statistics.median(it.bytes_read for it in replays),
            written=statistics.median(it.bytes_written for it in replays),
            stalled=statistics.median(it.wait_s for it in replays),
            overlap=statistics.median(it.overlap for it in replays),
            trims=statistics.median(it.trims for it in replays),
            trimmed=statistics.median(it.trimmed_bytes for it in replays),
            restore_s=statistics.median(it.restore_s for it in replays),
            planned_in=report.planned_in, planned_out=report.planned_out,
            planned_peak=report.planned_peak, functions=report.functions,
            in_core_peak=report.in_core_peak, deviations=report.deviations,
            huge_pages=report.huge_pages,
            recomputed=report.planned_recomputed,
            recordings=report.recordings,
            lower_bound=_lower_bound(ooc, cfg["budget"]))
        if cfg.get("compute_s") and cfg.get("disk"):
            machine = calibrated(ooc.trace, cfg["compute_s"], cfg["disk"],
                                 cfg.get("per_function_s", 0.0))
            sim = outcore.simulate(ooc.trace, ooc.schedule, machine)
            out["predicted_s"] = sim.iteration_time_s
            out["predicted_contention_s"] = sim.contention_s
            out["predicted_executor_s"] = machine.per_function_s * len(ooc.trace.functions)
            out["cut_limit_s"] = cut_limit(ooc.trace, cfg["budget"], cfg["compute_s"], cfg["disk"])
    else:
        raise SystemExit(f"unknown variant {variant!r}")

    out["step_s"] = statistics.median(times)
    out["steps_s"] = times
    out["page_faults"] = statistics.median(faults)
    out["peak_rss"] = peak_resident_bytes()
    if gpu_peaks:
        out["peak_gpu"] = max(gpu_peaks)
    return out


def _lower_bound(ooc, budget: int) -> int:
    """Bytes any schedule must read back under the budget the plan was made for."""
    import outcore
    from outcore.run.ooc import planned_budget
    return outcore.lower_bound(ooc.trace, planned_budget(ooc.trace, budget)).bytes_moved


def calibrated(trace, compute_s: float, disk: dict, per_function_s: float = 0.0):
    """This machine as the simulator sees it (NOTE [The predictions' compute] in
    experiments.py): the trace's own op durations scaled so that, with its host time
    between them, they add up to the measured in-core step; the executor's cost per op
    on top; the disk as one shared link at the read and write speeds `outcore bench disk`
    measured."""
    from outcore.simulate import PRESETS, Machine

    recorded = sum(fn.duration_s for fn in trace.functions) or 1.0
    host = sum(fn.host_s for fn in trace.functions)
    if host >= compute_s / 2:       # a trace with a host time that large: ops alone
        host_time, scale = False, compute_s / recorded
    else:
        host_time, scale = True, (compute_s - host) / recorded
    base = PRESETS["cpu-disk"]
    return Machine(**{**base.__dict__, "name": "cpu-disk (calibrated)",
                      "duration_scale": scale, "host_time": host_time,
                      "per_function_s": per_function_s if host_time else 0.0,
                      "link_in": disk["read_GBps"] * 1e9, "link_out": disk["write_GBps"] * 1e9,
                      "shared_link": True})


def cut_limit(trace, budget: int, compute_s: float, disk: dict) -> float:
    """No schedule of this step under the budget the plan was made for is faster on the
    calibrated machine (outcore.simulate.physical_limit: the cut and pressure bounds;
    they leave the executor's cost out)."""
    from outcore.run.ooc import planned_budget
    from outcore.simulate import physical_limit
    return physical_limit(trace, planned_budget(trace, budget),
                          calibrated(trace, compute_s, disk)).seconds


def main() -> None:
    cfg = json.loads(sys.argv[1])
    result = run(cfg)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
