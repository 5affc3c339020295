"""Cost figures of one op: FLOPs from PyTorch's flop counter formulas, bytes touched,
and an estimated duration for traces recorded without compute (meta device)."""
from __future__ import annotations

from torch.utils.flop_counter import flop_registry

from ..aten import iter_tensors

# The reference machine used to estimate durations of a meta recording: this kind of
# 2-core CPU machine. A roofline: time = max(flops / FLOPS, bytes / BANDWIDTH) + launch.
# simulate/ rescales compute per machine from the flops and bytes stored in the trace.
REFERENCE_FLOPS = 60e9          # fp32 FLOP/s sustained by conv/matmul on 2 cores
REFERENCE_BANDWIDTH = 10e9      # bytes/s of RAM traffic for elementwise ops
REFERENCE_LAUNCH_S = 5e-6       # fixed per-op overhead


def op_flops(func, args, kwargs, out) -> int:
    formula = flop_registry.get(func._overloadpacket)
    if formula is None:
        return 0
    try:
        return int(formula(*args, **kwargs, out_val=out))
    except Exception:  # a formula that does not cover this overload: count no FLOPs
        return 0


def tensor_bytes(values) -> int:
    """Bytes of the tensor elements in `values` (views count their own extent)."""
    return sum(t.numel() * t.element_size() for t in iter_tensors(values))


def estimate_duration(flops: int, nbytes: int) -> float:
    return max(flops / REFERENCE_FLOPS, nbytes / REFERENCE_BANDWIDTH) + REFERENCE_LAUNCH_S
