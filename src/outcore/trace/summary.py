"""The human-readable summary printed for a Trace."""
from __future__ import annotations

from collections import Counter

from ..units import format_bytes
from .model import CATEGORIES, PHASES, Trace


def summarize(trace: Trace, *, largest: int = 5) -> str:
    fns = trace.functions
    lines = [f"Trace: {len(fns)} functions, {len(trace.arrays)} arrays on {trace.device} "
             f"(durations {trace.durations})"]
    if trace.info.get("label"):
        lines[0] += f" - {trace.info['label']}"
    per_phase = Counter(f.phase for f in fns)
    time_phase = Counter()
    for f in fns:
        time_phase[f.phase] += f.duration_s
    lines.append("  functions per phase: " + ", ".join(
        f"{p} {per_phase[p]} ({time_phase[p] * 1e3:.1f} ms)" for p in PHASES if per_phase[p]))
    lines.append(f"  total compute: {trace.total_duration_s * 1e3:.1f} ms "
                 f"({sum(f.flops for f in fns) / 1e9:.2f} GFLOP)")
    peak, at = trace.peak()
    if at >= 0:
        f = fns[at]
        lines.append(f"  in-core peak of live bytes: {format_bytes(peak)} at function {at} "
                     f"({f.op}, {f.phase})")
        held, held_at = trace.peak(actual=True)
        lines.append(f"  held by plain PyTorch while recording: {format_bytes(held)} at function {held_at}")
    by_cat = trace.bytes_by_category()
    lines.append("  bytes by category:")
    for cat in CATEGORIES:
        if by_cat.get(cat):
            count = sum(1 for a in trace.arrays if a.category == cat)
            lines.append(f"    {cat:<16}{format_bytes(by_cat[cat]):>12}  in {count} arrays")
    big = sorted(trace.arrays, key=lambda a: (-a.nbytes, a.id))[:largest]
    if big:
        lines.append("  largest arrays:")
        for a in big:
            lines.append(f"    #{a.id:<6}{format_bytes(a.nbytes):>12}  {a.dtype:<9} {a.category:<16}"
                         f"used in functions {a.first_use}..{a.last_use} "
                         f"(created by {fns[a.origin[0]].op})" if not a.existed_before else
                         f"    #{a.id:<6}{format_bytes(a.nbytes):>12}  {a.dtype:<9} {a.category:<16}"
                         f"used in functions {a.first_use}..{a.last_use}")
    return "\n".join(lines)
