"""Machine presets for simulation, from public figures (sources: docs/planning.md#machines).

A Machine has a compute model (a roofline: peak FLOP/s and fast-memory bandwidth, each
derated by an achieved fraction, plus a fixed per-function overhead) and one link per
direction between the tiers (effective bandwidth and per-transfer latency), or one link
both directions share (a disk: reads and writes take turns on the same device)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..errors import OutcoreError


@dataclass(frozen=True)
class Machine:
    name: str
    peak_flops: float            # FLOP/s, vendor datasheet (dense fp32, no tensor cores)
    memory_bandwidth: float      # B/s of the fast tier, vendor datasheet
    fast_bytes: int              # size of the fast tier
    link_in: float               # B/s slow -> fast, effective
    link_out: float              # B/s fast -> slow, effective
    link_latency_s: float        # fixed cost per transfer
    launch_s: float = 5e-6       # fixed cost per function
    flops_efficiency: float = 1.0      # achieved share of peak_flops
    bandwidth_efficiency: float = 1.0  # achieved share of memory_bandwidth
    # True: use each function's duration_s from the trace (a trace recorded on this
    # kind of machine, or estimated for it) instead of the roofline.
    use_trace_durations: bool = False
    # Multiplies trace durations (with use_trace_durations): calibrates a trace recorded
    # under the recorder's overhead to a measured step time.
    duration_scale: float = 1.0
    # True: one link serves both directions in issue order (link_in for reads, link_out
    # for writes); a local disk behaves so (`outcore bench disk`: ~2.4 GB/s either way
    # alone, ~2.45 GB/s in total with both at once).
    shared_link: bool = False
    # With use_trace_durations: also count each function's recorded host time (the
    # framework's Python between ops, Function.host_s) and `per_function_s`, the
    # executor's own cost per op, on the compute lane.
    host_time: bool = False
    per_function_s: float = 0.0
    # With host_time: True counts the host time's waits too (wall time, Function.host_s);
    # False only its CPU time (Function.host_cpu_s), for a simulation that models the
    # waits for other ranks itself (simulate_ranks).
    host_waits: bool = True
    # The host CPU cores compute runs on; 0 where compute is not the host's (a GPU). When
    # the ranks' compute threads fill them, helper threads have no core of their own: the
    # mover's CPU, transfer_cpu_share of each transfer's time, is then taken from
    # compute (NOTE [No core to spare] in engine.py).
    cores: int = 0
    transfer_cpu_share: float = 0.0
    # Total B/s of the two directions while both run; 0: independent, each at its own
    # speed. A GPU's host link does not give both at once: 54.6 and 54.9 GB/s alone,
    # 85 GB/s in total together on an H100 (docs/gpu-check.md). NOTE [Duplex link] in
    # engine.py.
    link_both: float = 0.0

    def __post_init__(self):
        if isinstance(self.cores, bool) or not isinstance(self.cores, int) or self.cores < 0:
            raise OutcoreError(f"machine {self.name!r}: cores must be an integer >= 0 (0: compute "
                               f"is not the host CPU's), got {self.cores!r}")
        if not (self.link_both >= 0 and math.isfinite(self.link_both)):
            raise OutcoreError(f"machine {self.name!r}: link_both must be a finite number of B/s "
                               f">= 0 (0: the directions do not share), got {self.link_both!r}")
        if self.link_both and self.shared_link:
            raise OutcoreError(f"machine {self.name!r}: link_both (a partly shared link) and "
                               "shared_link (one link for both directions) exclude each other")
        if not (self.transfer_cpu_share >= 0 and math.isfinite(self.transfer_cpu_share)):
            raise OutcoreError(f"machine {self.name!r}: transfer_cpu_share must be a finite "
                               f"number >= 0 (CPU seconds per second of transfer), got "
                               f"{self.transfer_cpu_share!r}")

    def no_core_to_spare(self, ranks_on_node: int, threads: int = 1) -> bool:
        """Do that many ranks, computing on `threads` threads each (torch's intra-op
        threads, trace_threads), leave helper threads (the mover, gloo) no core of their
        own here? (NOTE [No core to spare] in engine.py)"""
        return 0 < self.cores <= ranks_on_node * max(1, threads)

    def compute_time(self, fn) -> float:
        if self.use_trace_durations:
            return fn.duration_s * self.duration_scale + self.host_part(fn)
        return max(fn.flops / (self.peak_flops * self.flops_efficiency),
                   fn.bytes_touched / (self.memory_bandwidth * self.bandwidth_efficiency)) + self.launch_s

    def host_part(self, fn) -> float:
        """The host's share of `fn` on the compute lane, before the op itself: with
        host_time, its recorded host time (wall or CPU: `host_waits`) and the executor's
        cost per op; 0 otherwise. A collective costs this much compute too: its op runs
        on the comm lane, the Python before it and the executor's dispatch on this one."""
        if not (self.use_trace_durations and self.host_time):
            return 0.0
        return (fn.host_s if self.host_waits else fn.host_cpu_s) + self.per_function_s

    def transfer_time(self, nbytes: int, direction: str) -> float:
        bw = self.link_in if direction == "in" else self.link_out
        return self.link_latency_s + nbytes / bw

    def transfer_end(self, nbytes: int, direction: str, start: float, other_until: float) -> float:
        """When a transfer issued at `start` ends, the other direction being busy until
        `other_until` (NOTE [Duplex link] in engine.py): while both run, this one gets
        what link_both leaves beside the other's speed, then its own speed again."""
        end = start + self.transfer_time(nbytes, direction)
        if not self.link_both or other_until <= start:
            return end
        own, other = ((self.link_in, self.link_out) if direction == "in"
                      else (self.link_out, self.link_in))
        shared = max(self.link_both - other, 0.0)
        if shared >= own:
            return end
        begin = start + self.link_latency_s
        overlap = max(0.0, other_until - begin)
        if nbytes <= overlap * shared:
            return begin + nbytes / shared
        return begin + overlap + (nbytes - overlap * shared) / own


def trace_threads(trace) -> int:
    """The threads the step computed on when it was recorded (torch.get_num_threads(),
    kept in the trace's info); 1 for traces that do not say (recorded before it was
    kept, or written by hand)."""
    threads = trace.info.get("threads", 1) if isinstance(trace.info, dict) else 1
    return threads if isinstance(threads, int) and not isinstance(threads, bool) and threads > 0 else 1


def host_cores() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):          # no affinity on this platform
        return os.cpu_count() or 1


GB = 1e9
# FP32 efficiency 0.6: NVIDIA's published ResNet-50 FP32 training throughput on V100
# (~390 img/s at ~24.6 GFLOP per image, forward+backward) is ~61% of the 15.7 TFLOP/s peak.
_GPU = dict(launch_s=5e-6, flops_efficiency=0.6, bandwidth_efficiency=0.8, link_latency_s=10e-6)

PRESETS = {
    # This kind of machine: 2 cores, RAM as the fast tier, a local disk with O_DIRECT as
    # the slow one. `outcore bench disk --size 2GiB` measured 2.37-2.42 GB/s read,
    # 2.23-2.36 GB/s write, 2.43-2.46 GB/s in total with both at once: one shared link.
    # Compute uses the trace's own durations: measured, or estimated by the recorder. Its
    # cores are the ones this process may run on (2 here): the trace was recorded on
    # this machine. One process computing on both cores loses 0.24-0.31 s of compute per
    # second a transfer runs beside it (`benchmarks/contention.py`, ResNet-50 64x64 at
    # half its peak, 4 runs on 2026-12-02; 0.28 is the median of the first three), a
    # little more than the mover's own CPU (0.15-0.24 s per s, `outcore bench disk`).
    "cpu-disk": Machine("cpu-disk", peak_flops=60e9, memory_bandwidth=10 * GB,
                        fast_bytes=24 * 2**30, link_in=2.4 * GB, link_out=2.3 * GB,
                        link_latency_s=100e-6, use_trace_durations=True, shared_link=True,
                        cores=host_cores(), transfer_cpu_share=0.28),
    # Tesla V100 SXM2 16 GB: 15.7 TFLOP/s fp32, 900 GB/s HBM2; PCIe 3.0 x16, ~12 GB/s pinned.
    "v100-16gb": Machine("v100-16gb", peak_flops=15.7e12, memory_bandwidth=900 * GB,
                         fast_bytes=16 * 10**9, link_in=12 * GB, link_out=12 * GB, **_GPU),
    # A100 40 GB (SXM4): 19.5 TFLOP/s fp32, 1555 GB/s HBM2; PCIe 4.0 x16, ~25 GB/s.
    "a100-40gb": Machine("a100-40gb", peak_flops=19.5e12, memory_bandwidth=1555 * GB,
                         fast_bytes=40 * 10**9, link_in=25 * GB, link_out=25 * GB, **_GPU),
    # H100 80 GB (SXM5): 67 TFLOP/s fp32, 3350 GB/s HBM3; PCIe 5.0 x16, ~50 GB/s. Both
    # directions at once: 85 GB/s in total, measured (docs/gpu-check.md, 2026-11-26).
    "h100-80gb": Machine("h100-80gb", peak_flops=67e12, memory_bandwidth=3350 * GB,
                         fast_bytes=80 * 10**9, link_in=50 * GB, link_out=50 * GB,
                         link_both=85 * GB, **_GPU),
}


def machine(name_or_machine) -> Machine:
    if isinstance(name_or_machine, Machine):
        return name_or_machine
    try:
        return PRESETS[name_or_machine]
    except KeyError:
        raise OutcoreError(f"unknown machine {name_or_machine!r}; presets: "
                           f"{', '.join(PRESETS)} (or pass an outcore.simulate.Machine)") from None
