"""How many A100s, and which strategy? The ranking of docs/distributed.md, in simulation.

    .venv/bin/python benchmarks/cluster_table.py [--models gpt2-xl,resnet50]
        [--interconnects nvlink-a100,pcie4] [--machine a100-40gb] [--max-devices 8]
        [--gpt2-batch 8] [--resnet-batch 1024]

Records each model's training step on PyTorch's meta device (no memory, no compute, no
download: GPT-2 XL from transformers' GPT2Config(n_layer=48, n_embd=1600, n_head=25),
fp32, eager attention, sequence 1024, AdamW; ResNet-50 in torchvision's layout, fp32,
224x224, SGD with momentum), then ranks every configuration on 1, 2, 4, ... devices
(outcore.simulate.cluster.rank_configurations): one device, DDP, FSDP and a GPipe
pipeline, in-core where a rank's step fits the device, out-of-core under the device's
memory where it does not. Prints one markdown table per model and interconnect.
Throughput is relative to one device running the whole step in-core (a device with
enough memory, when none has). All figures are model predictions, not measurements."""
from __future__ import annotations

import argparse
import shlex
import sys
import time

from outcore import workloads
from outcore.simulate import PRESETS
from outcore.simulate.cluster import format_table, rank_configurations
from outcore.simulate.comm import INTERCONNECTS
from outcore.trace import record
from outcore.units import format_bytes

# name -> (workload, build options, label)
MODELS = {
    "gpt2-xl": ("gpt2-xl", dict(seq_len=1024, optimizer="adamw"), "GPT-2 XL (1.56B), seq 1024, fp32, AdamW"),
    "resnet50": ("resnet50", dict(image_size=224, optimizer="sgd"), "ResNet-50, 224x224, fp32, SGD+momentum"),
}


def meta_trace(model: str, batch: int):
    """One steady-state training step of `model` at `batch`, recorded on the meta device."""
    name, options, label = MODELS[model]
    w = workloads.build(name, batch=batch, device="meta", **options)
    w.step()                      # warm-up: optimizer state exists, as in steady state
    with record(label=f"{label}, batch {batch}") as rec:
        w.step()
    return rec.trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="gpt2-xl,resnet50")
    parser.add_argument("--interconnects", default="nvlink-a100,pcie4")
    parser.add_argument("--machine", default="a100-40gb")
    parser.add_argument("--max-devices", type=int, default=8)
    parser.add_argument("--gpt2-batch", type=int, default=8, help="global batch of GPT-2 XL (sequences)")
    parser.add_argument("--resnet-batch", type=int, default=1024, help="global batch of ResNet-50 (images)")
    args = parser.parse_args()
    command = "python benchmarks/cluster_table.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    start = time.perf_counter()
    device = PRESETS[args.machine]
    print(f"`{command.strip()}`\n")
    print(f"device {device.name}: {format_bytes(device.fast_bytes)}, {device.peak_flops / 1e12:.1f} "
          f"TFLOP/s fp32 x {device.flops_efficiency:.0%}, {device.memory_bandwidth / 1e9:.0f} GB/s x "
          f"{device.bandwidth_efficiency:.0%}; host link {device.link_in / 1e9:.0f} GB/s per direction\n")
    for model in args.models.split(","):
        batch = args.gpt2_batch if model == "gpt2-xl" else args.resnet_batch
        trace = meta_trace(model, batch)
        peak = trace.peak(actual=True)[0]
        state = sum(a.nbytes for a in trace.arrays
                    if a.category in ("parameter", "gradient", "optimizer_state"))
        for name in args.interconnects.split(","):
            link = INTERCONNECTS[name]
            t0 = time.perf_counter()
            rows = rank_configurations(trace, device=device, interconnect=link,
                                       max_devices=args.max_devices, batch=batch)
            print(f"### {trace.info['label']} over {name}\n")
            print(f"{len(trace.functions)} functions; in-core peak {format_bytes(peak)} "
                  f"(state {format_bytes(state)}); interconnect {link.alpha_s * 1e6:.1f} µs, "
                  f"{link.bandwidth_Bps / 1e9:.1f} GB/s ({time.perf_counter() - t0:.0f} s to rank)\n")
            print(format_table(rows, markdown=True))
            best = next((r for r in rows if r.fits), None)
            if best is not None:
                where = "in-core" if best.budget is None else f"out-of-core under {format_bytes(best.budget)}"
                print(f"\nbest: **{best.strategy} on {best.ranks}**, {where}, "
                      f"{best.step_s * 1e3:.0f} ms per step ({best.throughput_relative:.2f}x)")
                for note in best.notes:
                    print(f"  - {note}")
            print()
    print(f"(took {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
