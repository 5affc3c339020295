"""A checker of the Chrome trace event format's JSON object form, written from the
format's definition (the Trace Event Format document; the fields Perfetto's JSON
importer reads), independent of outcore's writer: what a file must satisfy to open in
Perfetto and chrome://tracing with every event where it was meant to be."""
from __future__ import annotations

import math

PHASES = {"X", "B", "E", "i", "I", "C", "M", "b", "e", "n", "s", "t", "f", "P", "O", "N", "D"}
METADATA = {"process_name", "process_labels", "process_sort_index", "thread_name",
            "thread_sort_index"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(obj) -> list[str]:
    """Every violation found, as messages; [] when the object is well formed."""
    errors = []
    if not isinstance(obj, dict) or not isinstance(obj.get("traceEvents"), list):
        return ["the JSON object form needs a 'traceEvents' list"]
    if obj.get("displayTimeUnit", "ms") not in ("ms", "ns"):
        errors.append(f"displayTimeUnit must be 'ms' or 'ns', not {obj['displayTimeUnit']!r}")
    for k, e in enumerate(obj["traceEvents"]):
        where = f"event {k}"
        if not isinstance(e, dict):
            errors.append(f"{where}: not an object")
            continue
        ph = e.get("ph")
        if ph not in PHASES:
            errors.append(f"{where}: unknown phase {ph!r}")
            continue
        if not isinstance(e.get("name"), str):
            errors.append(f"{where}: 'name' must be a string")
        for key in ("pid", "tid"):
            if key in e and not isinstance(e[key], int):
                errors.append(f"{where}: {key!r} must be an integer")
        if "pid" not in e:
            errors.append(f"{where}: no 'pid'")
        if "args" in e and not isinstance(e["args"], dict):
            errors.append(f"{where}: 'args' must be an object")
        if ph == "M":
            if e.get("name") not in METADATA:
                errors.append(f"{where}: unknown metadata event {e.get('name')!r}")
            args = e.get("args", {})
            if e.get("name", "").endswith("_name") and not isinstance(args.get("name"), str):
                errors.append(f"{where}: {e.get('name')} needs args.name, a string")
            if e.get("name", "").endswith("_sort_index") and not isinstance(args.get("sort_index"), int):
                errors.append(f"{where}: {e.get('name')} needs args.sort_index, an integer")
            continue
        if not _number(e.get("ts")) or e["ts"] < 0:
            errors.append(f"{where}: 'ts' must be a number of microseconds >= 0")
        if ph != "C" and "tid" not in e:
            errors.append(f"{where}: no 'tid'")
        if ph == "X" and (not _number(e.get("dur")) or e["dur"] < 0):
            errors.append(f"{where}: a complete event ('X') needs 'dur' >= 0")
        if ph == "C":
            args = e.get("args")
            if not args or not all(_number(v) for v in args.values()):
                errors.append(f"{where}: a counter needs args of numbers")
        if ph in ("i", "I") and e.get("s", "t") not in ("g", "p", "t"):
            errors.append(f"{where}: an instant's scope 's' must be g, p or t")
    return errors


def nest_properly(events) -> list[str]:
    """Complete events on one thread must nest or follow each other (a viewer draws
    overlapping ones as a broken stack): the check behind a readable track."""
    errors = []
    by_thread: dict = {}
    for e in events:
        if e.get("ph") == "X":
            by_thread.setdefault((e["pid"], e["tid"]), []).append(e)
    for key, slices in by_thread.items():
        slices.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []
        for e in slices:
            while stack and stack[-1] <= e["ts"] + 1e-3:
                stack.pop()
            end = e["ts"] + e["dur"]
            if stack and end > stack[-1] + 1e-3:
                errors.append(f"thread {key}: {e['name']!r} at {e['ts']} us overlaps the "
                              "slice before it without nesting")
            stack.append(end)
    return errors
