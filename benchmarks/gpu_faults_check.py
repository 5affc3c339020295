"""Three small GPU checks of faults found by reading the host tier (one run of seconds):

1. trace: a step recorded on CUDA (backward runs on autograd's device thread) is saved
   and loaded back (a CPU time measured across threads came out negative, and the
   saved trace could not be loaded).
2. workspace: the largest workspace the recorder measures for ResNet-18 (batch 32,
   224x224) with `torch.backends.cudnn.benchmark` off and on (on, cuDNN's first call of
   a shape tries plans in workspaces as large as free memory).
3. runtime: which CUDA runtime `host._runtime()` loads, whether another libcudart is
   on the library path, and whether a failed cudaHostRegister (the same range twice)
   leaves an error that the next kernel reports.

    PYTHONPATH=src python3 benchmarks/gpu_faults_check.py --out $OUT/faults.json
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import tempfile
import traceback

import torch

import outcore
from outcore.memory.aligned import AlignedBuffer
from outcore.run.movers import host
from outcore.workloads import build


def trace_round_trip() -> dict:
    w = build("gpt2-tiny", batch=4, optimizer="adam", device="cuda")
    w.step()
    with outcore.record() as rec:
        w.step()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    rec.trace.save(path)
    back = outcore.Trace.load(path)
    return {"functions": len(rec.trace.functions), "loaded": len(back.functions),
            "min_host_cpu_s": min(f.host_cpu_s for f in rec.trace.functions)}


def workspace(benchmark: bool) -> dict:
    torch.backends.cudnn.benchmark = benchmark
    try:
        w = build("resnet18", batch=32, image_size=224, device="cuda", optimizer="sgd")
        w.step()
        with outcore.record() as rec:
            w.step()
        first = max(f.workspace_bytes for f in rec.trace.functions)
        with outcore.record() as again:
            w.step()
        return {"benchmark": benchmark, "max_workspace_first_recording": first,
                "max_workspace_second_recording": max(f.workspace_bytes
                                                      for f in again.trace.functions),
                "free_bytes": torch.cuda.mem_get_info()[0]}
    finally:
        torch.backends.cudnn.benchmark = False


def runtime() -> dict:
    lib = host._runtime()
    out = {"runtime": getattr(lib, "_name", None)}
    try:
        ctypes.CDLL("libcudart.so", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        out["plain_libcudart_loaded"] = True
    except OSError:
        out["plain_libcudart_loaded"] = False
    try:
        ctypes.CDLL("libcudart.so")
        out["plain_libcudart_on_path"] = True
    except OSError:
        out["plain_libcudart_on_path"] = False
    link = host.CudaLink()
    buf = AlignedBuffer(1 << 20)
    link.pin(buf.address, buf.size)
    try:
        link.pin(buf.address, buf.size)
        out["second_pin"] = "accepted"
    except outcore.OutcoreError as exc:
        out["second_pin"] = f"refused: {exc}"[:200]
    try:
        (torch.ones(4, device="cuda") + 1).sum().item()
        out["kernel_after"] = "ran"
    except Exception as exc:        # noqa: BLE001
        out["kernel_after"] = f"{type(exc).__name__}: {exc}"[:300]
    link.unpin(buf.address)
    buf.close()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, fn in (("trace", trace_round_trip), ("workspace_off", lambda: workspace(False)),
                     ("workspace_on", lambda: workspace(True)), ("runtime", runtime)):
        try:
            results[name] = fn()
        except Exception as exc:    # noqa: BLE001
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500],
                             "traceback": traceback.format_exc(limit=5)}
        print(json.dumps({name: results[name]}, default=str), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
