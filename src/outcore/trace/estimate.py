"""Cost figures of one op: FLOPs from PyTorch's flop counter formulas, bytes touched,
and an estimated duration for traces recorded without compute (meta device)."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import flop_registry

from ..aten import iter_tensors

# The reference machine used to estimate durations of a meta recording: this kind of
# 2-core CPU machine. A roofline: time = max(flops / FLOPS, bytes / BANDWIDTH) + launch.
# simulate/ rescales compute per machine from the flops and bytes stored in the trace.
REFERENCE_FLOPS = 60e9          # fp32 FLOP/s sustained by conv/matmul on 2 cores
REFERENCE_BANDWIDTH = 10e9      # bytes/s of RAM traffic for elementwise ops
REFERENCE_LAUNCH_S = 5e-6       # fixed per-op overhead


def op_flops(func, args, kwargs, out) -> int:
    """FLOPs by PyTorch's flop counter formula for the op; a `_foreach_<op>` (e.g.
    `_foreach_mm`, which Muon's updates may reach) counts its plain op's formula per
    element of its lists. 0 for an op with no formula."""
    packet = func._overloadpacket
    formula = flop_registry.get(packet)
    try:
        if formula is not None:
            return int(formula(*args, **kwargs, out_val=out))
        name = getattr(packet, "__name__", "")
        plain = _plain_packet(name) if name.startswith("_foreach_") else None
        formula = flop_registry.get(plain) if plain is not None else None
        if formula is None or not isinstance(out, (list, tuple)):
            return 0
        lists = [a for a in args if isinstance(a, (list, tuple))]
        if not lists or any(len(a) != len(out) for a in lists):
            return 0
        return sum(int(formula(*[a[i] if isinstance(a, (list, tuple)) else a for a in args],
                               **kwargs, out_val=out[i]))
                   for i in range(len(out)))
    except Exception:  # a formula that does not cover this overload: count no FLOPs
        return 0


def _plain_packet(name: str):
    return getattr(torch.ops.aten, name[len("_foreach_"):], None)


def tensor_bytes(values) -> int:
    """Bytes of the tensor elements in `values` (views count their own extent)."""
    return sum(t.numel() * t.element_size() for t in iter_tensors(values))


def estimate_duration(flops: int, nbytes: int) -> float:
    return max(flops / REFERENCE_FLOPS, nbytes / REFERENCE_BANDWIDTH) + REFERENCE_LAUNCH_S
