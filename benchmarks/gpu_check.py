"""What only a GPU can show, for the planner and simulator (run on a machine with CUDA):

    PYTHONPATH=src python3 benchmarks/gpu_check.py [--out results.json]

1. The recorder on CUDA tensors: one training step of each model recorded on the GPU;
   the trace's in-core peak (with the per-op workspaces the recorder measures) against
   what PyTorch's caching allocator counted over a plain step of the same kind
   (torch.cuda.max_memory_allocated, which also holds cuDNN/cuBLAS workspaces).
2. The simulator's compute model: the preset for this GPU (h100-80gb) predicts the
   in-core step from a meta-device trace (FLOPs and bytes per op); against the measured
   step time (CUDA events, median of timed steps after warm-up), fp32 with TF32 off.
3. The link the CUDA mover would use: pinned host <-> device copies of 1 GiB, each
   direction alone and both at once on two streams.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

import outcore
from outcore.workloads import build

MODELS = [("resnet50", dict(batch=64, image_size=224)), ("gpt2", dict(batch=8, seq_len=1024)),
          ("resnet18", dict(batch=128, image_size=224))]


def timed_steps(w, steps=5, warmup=2):
    for _ in range(warmup):
        w.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        w.step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def model_figures(name, kw):
    w = build(name, device="cuda", **kw)
    w.step()                                   # lazy optimizer state
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    with outcore.record() as rec:
        w.step()
    # Recording resets the peak statistics per op (it measures workspaces): the
    # allocator's peak is read over a plain step of the same (steady) kind.
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    w.step()
    torch.cuda.synchronize()
    allocator_peak = torch.cuda.max_memory_allocated()
    trace_peak = rec.trace.peak(actual=True)[0]
    workspace = max((f.workspace_bytes for f in rec.trace.functions), default=0)
    step_s = timed_steps(w)
    del w, rec
    torch.cuda.empty_cache()
    meta = build(name, device="meta", **kw)
    meta.step()
    with outcore.record() as mrec:
        meta.step()
    t = mrec.trace
    sched = outcore.plan(t, 10 * t.peak(actual=True)[0])           # in-core: nothing moves
    simulated = outcore.simulate(t, sched, "h100-80gb").in_core_time_s
    return {"model": name, **kw, "trace_peak": trace_peak, "allocator_peak": allocator_peak,
            "max_workspace": workspace,
            "allocated_before": base, "meta_peak": t.peak(actual=True)[0],
            "measured_step_s": step_s, "simulated_step_s": simulated,
            "flops": sum(fn.flops for fn in t.functions)}


def link_figures(nbytes=2**30, reps=5):
    host_a = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host_b = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev_a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev_b = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    s_in, s_out = torch.cuda.Stream(), torch.cuda.Stream()

    def run(ins, outs):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if ins:
            with torch.cuda.stream(s_in):
                dev_a.copy_(host_a, non_blocking=True)
        if outs:
            with torch.cuda.stream(s_out):
                host_b.copy_(dev_b, non_blocking=True)
        torch.cuda.current_stream().wait_stream(s_in)
        torch.cuda.current_stream().wait_stream(s_out)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    out = {}
    for label, ins, outs in (("h2d", True, False), ("d2h", False, True), ("both", True, True)):
        run(ins, outs)
        secs = statistics.median(run(ins, outs) for _ in range(reps))
        moved = nbytes * (int(ins) + int(outs))
        out[f"{label}_GBps"] = moved / secs / 1e9
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "link": link_figures(), "models": []}
    print(json.dumps(result["link"]), flush=True)
    for name, kw in MODELS:
        try:
            fig = model_figures(name, kw)
        except Exception as exc:                       # report, go on with the next model
            fig = {"model": name, **kw, "error": f"{type(exc).__name__}: {exc}"}
        result["models"].append(fig)
        print(json.dumps(fig), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
