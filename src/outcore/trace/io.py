"""Trace <-> JSON. The format is documented in docs/trace.md; loading validates everything
and raises TraceError naming the first problem, never a bare KeyError."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import TraceError, file_kind
from .model import ARRAY_KINDS, CATEGORIES, PHASES, Access, Array, Function, Trace

FORMAT = "outcore.trace"
VERSION = 1
_ACCESS_CODE = {"read": "r", "write": "w", "create": "c"}
_ACCESS_KIND = {v: k for k, v in _ACCESS_CODE.items()}


def to_dict(trace: Trace) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "device": trace.device,
        "durations": trace.durations,
        "info": trace.info,
        "arrays": [
            {"id": a.id, "nbytes": a.nbytes, "dtype": a.dtype, "device": a.device,
             "kind": a.kind, "category": a.category, "origin": list(a.origin),
             "first_use": a.first_use, "last_use": a.last_use,
             "freed_after": a.freed_after, "existed_before": a.existed_before}
            for a in trace.arrays],
        "functions": [
            {"op": f.op, "phase": f.phase, "duration_s": f.duration_s, "flops": f.flops,
             "bytes_touched": f.bytes_touched, "host_s": f.host_s,
             "host_cpu_s": f.host_cpu_s, "peer": f.peer, "workspace_bytes": f.workspace_bytes,
             "split": list(f.split) if f.split else None, "repeats": f.repeats,
             "accesses": [[acc.array, _ACCESS_CODE[acc.kind]] for acc in f.accesses]}
            for f in trace.functions],
    }


def save(trace: Trace, path) -> None:
    """Write `trace` as JSON, atomically: `path` holds the whole trace or what it held
    before, whatever fails or interrupts the write (NOTE [Atomic save] in
    run/checkpoint.py)."""
    from ..run.checkpoint import atomic_write_json
    atomic_write_json(path, to_dict(trace))


def load(path) -> Trace:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TraceError(f"cannot read trace file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path} is not a trace: not text ({exc.reason} at byte {exc.start}). "
                         "Record one with `outcore trace` or outcore.record().") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        what = exc.msg.removesuffix(" at")       # "Unterminated string starting at"
        raise TraceError(f"{path} is not a trace: not valid JSON ({what}, line {exc.lineno}). "
                         "Record one with `outcore trace` or outcore.record().") from exc
    except RecursionError as exc:
        raise TraceError(f"{path} is not a trace: its JSON nests too deeply. "
                         "Record one with `outcore trace` or outcore.record().") from exc
    return from_dict(data, source=str(path))


class _Reader:
    """Small typed accessors that turn any malformation into a TraceError with a path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, problem: str):
        raise TraceError(f"{self.source}: {where}: {problem}")

    def get(self, obj, key, types, where):
        if not isinstance(obj, dict):
            self.fail(where, f"expected an object, found {type(obj).__name__}")
        if key not in obj:
            self.fail(where, f"missing field {key!r}")
        value = obj[key]
        if types is int and isinstance(value, bool) or not isinstance(value, types):
            names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
            self.fail(f"{where}.{key}", f"expected {names}, found {type(value).__name__} {value!r:.40}")
        return value

    def choice(self, obj, key, options, where):
        value = self.get(obj, key, str, where)
        if value not in options:
            self.fail(f"{where}.{key}", f"{value!r} is not one of {', '.join(options)}")
        return value


def from_dict(data, source: str = "trace") -> Trace:
    r = _Reader(source)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        r.fail("top level", f"not an outcore trace (expected \"format\": \"{FORMAT}\")"
                            f"{file_kind(data)}; record a trace with `outcore trace` or "
                            "outcore.record()")
    version = r.get(data, "version", int, "top level")
    if version != VERSION:
        r.fail("version", f"trace format version {version} is not supported by this outcore "
                          f"(it reads version {VERSION}); re-record the trace")
    device = r.get(data, "device", str, "top level")
    durations = r.choice(data, "durations", ("measured", "estimated"), "top level")
    info = data.get("info", {})
    if not isinstance(info, dict):
        r.fail("info", "expected an object")
    raw_arrays = r.get(data, "arrays", list, "top level")
    raw_functions = r.get(data, "functions", list, "top level")
    n_fn = len(raw_functions)

    arrays = []
    for i, raw in enumerate(raw_arrays):
        w = f"arrays[{i}]"
        ident = r.get(raw, "id", int, w)
        if ident != i:
            r.fail(f"{w}.id", f"ids must count up from 0 in order, found {ident} at position {i}")
        nbytes = r.get(raw, "nbytes", int, w)
        if nbytes < 0:
            r.fail(f"{w}.nbytes", f"negative size {nbytes}")
        origin = r.get(raw, "origin", list, w)
        if len(origin) != 2 or not all(type(v) is int for v in origin):
            r.fail(f"{w}.origin", "expected [function index, slot]")
        first, last = r.get(raw, "first_use", int, w), r.get(raw, "last_use", int, w)
        freed = raw.get("freed_after") if isinstance(raw, dict) else None
        if freed is not None and (not isinstance(freed, int) or isinstance(freed, bool)):
            r.fail(f"{w}.freed_after", "expected an integer or null")
        if not (0 <= first <= last < n_fn):
            r.fail(w, f"uses [{first}, {last}] fall outside the {n_fn} functions of the trace")
        if freed is not None and not last <= freed < n_fn:
            r.fail(f"{w}.freed_after", f"{freed} is not between its last use {last} and the "
                                       f"trace's last function {n_fn - 1}")
        arrays.append(Array(
            id=ident, nbytes=nbytes, dtype=r.get(raw, "dtype", str, w), device=r.get(raw, "device", str, w),
            kind=r.choice(raw, "kind", ARRAY_KINDS, w), category=r.choice(raw, "category", CATEGORIES, w),
            origin=(origin[0], origin[1]), first_use=first, last_use=last, freed_after=freed,
            existed_before=r.get(raw, "existed_before", bool, w)))

    functions = []
    seen_first: dict[int, int] = {}
    for i, raw in enumerate(raw_functions):
        w = f"functions[{i}]"
        split = raw.get("split") if isinstance(raw, dict) else None
        if split is not None and (not isinstance(split, list) or len(split) != 2
                                  or not all(type(v) is int for v in split)):
            r.fail(f"{w}.split", "expected [element, count] or null")
        accesses = []
        for j, acc in enumerate(r.get(raw, "accesses", list, w)):
            if (not isinstance(acc, list) or len(acc) != 2 or type(acc[0]) is not int
                    or not isinstance(acc[1], str) or acc[1] not in _ACCESS_KIND):
                r.fail(f"{w}.accesses[{j}]", f"expected [array id, one of r/w/c], found {acc!r:.40}")
            if not 0 <= acc[0] < len(arrays):
                r.fail(f"{w}.accesses[{j}]", f"array {acc[0]} does not exist "
                                             f"(the trace has {len(arrays)} arrays)")
            seen_first.setdefault(acc[0], i)
            accesses.append(Access(acc[0], _ACCESS_KIND[acc[1]]))
        duration = r.get(raw, "duration_s", (int, float), w)
        if not 0 <= duration < math.inf:           # also NaN: every simulated time would be
            r.fail(f"{w}.duration_s", f"expected a finite duration >= 0, found {duration}")
        host = r.get(raw, "host_s", (int, float), w) if "host_s" in raw else 0.0   # older traces
        if not 0 <= host < math.inf:
            r.fail(f"{w}.host_s", f"expected a finite host time >= 0, found {host}")
        host_cpu = r.get(raw, "host_cpu_s", (int, float), w) if "host_cpu_s" in raw else 0.0
        if not 0 <= host_cpu < math.inf:
            r.fail(f"{w}.host_cpu_s", f"expected a finite host CPU time >= 0, found {host_cpu}")
        peer = raw.get("peer")
        if peer is not None and (type(peer) is not int or peer < 0):
            r.fail(f"{w}.peer", f"expected a rank (an integer >= 0) or null, found {peer!r:.40}")
        workspace = r.get(raw, "workspace_bytes", int, w) if "workspace_bytes" in raw else 0
        if workspace < 0:
            r.fail(f"{w}.workspace_bytes", f"negative workspace {workspace}")
        repeats = raw.get("repeats") if isinstance(raw, dict) else None
        if repeats is not None and (type(repeats) is not int or not 0 <= repeats < i):
            r.fail(f"{w}.repeats", f"expected an earlier function's index or null, found "
                                   f"{repeats!r:.40}")
        flops, touched = r.get(raw, "flops", int, w), r.get(raw, "bytes_touched", int, w)
        for name, value in (("flops", flops), ("bytes_touched", touched)):
            if value < 0:                # a roofline would give the op a negative time
                r.fail(f"{w}.{name}", f"expected a count >= 0, found {value}")
        functions.append(Function(
            index=i, op=r.get(raw, "op", str, w), phase=r.choice(raw, "phase", PHASES, w),
            accesses=tuple(accesses), duration_s=float(duration), flops=flops,
            bytes_touched=touched,
            split=tuple(split) if split else None, host_s=float(host),
            host_cpu_s=float(host_cpu), peer=peer, workspace_bytes=workspace,
            repeats=repeats))
    for a in arrays:
        if seen_first.get(a.id) != a.first_use:
            r.fail(f"arrays[{a.id}]", f"first_use {a.first_use} disagrees with the functions "
                                      f"(first accessed at {seen_first.get(a.id)})")
    return Trace(functions=tuple(functions), arrays=tuple(arrays), device=device,
                 durations=durations, info=info)
