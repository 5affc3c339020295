"""Timelines of a step in the Chrome trace event format (Perfetto, chrome://tracing).

One file holds one or two processes that start at 0 and so line up side by side:

  pid 1  "simulated"  the schedule replayed on a machine model (`outcore.simulate`)
  pid 2  "measured"   an iteration OutOfCore replayed (`OutOfCore.timeline`)

Each has three tracks (threads): compute, one slice per function (its op, phase and
index; the gaps where the step waited for the disk are slices of their own), and one
track per transfer direction, one slice per swap (array id, category, bytes). Counters:
the fast tier's bytes (simulated: by category, stacked; measured: the managed tensors
and the process's resident set above its base), the bytes only on the slow tier, and
the budget. Times are microseconds (the format's unit), rounded to nanoseconds.

`chrome_trace(...)` assembles the JSON object; `write(path, obj)` writes it whole or not
at all. The format: the "JSON Object Format" of the Trace Event Format document
(Google, the catapult project's docs/trace-event-format.md points to it).
"""
from __future__ import annotations

from ..units import format_bytes
from .occupancy import by_category

SIMULATED_PID, MEASURED_PID = 1, 2
COMPUTE_TID, IN_TID, OUT_TID = 1, 2, 3
# A measured gap in the executor shorter than this is bookkeeping, not worth a slice.
MIN_GAP_S = 20e-6


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)


def _short(op: str) -> str:
    """'aten.convolution.default' -> 'convolution'."""
    parts = op.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "aten" else op


def _process(pid: int, name: str, sort: int) -> list[dict]:
    meta = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}},
            {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
             "args": {"sort_index": sort}}]
    for tid, thread in ((COMPUTE_TID, "compute"), (IN_TID, "swap-in (slow -> fast)"),
                        (OUT_TID, "swap-out (fast -> slow)")):
        meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                     "args": {"name": thread}})
        meta.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
                     "args": {"sort_index": tid}})
    return meta


def _slice(pid, tid, name, cat, start_s, end_s, args) -> dict:
    ts = _us(start_s)           # the end rounded alike, so that back-to-back slices abut
    return {"name": name, "cat": cat, "ph": "X", "ts": ts,
            "dur": max(round(_us(end_s) - ts, 3), 0.0), "pid": pid, "tid": tid, "args": args}


def _counter(pid, name, t_s, values: dict) -> dict:
    return {"name": name, "ph": "C", "ts": _us(t_s), "pid": pid, "tid": 0, "args": values}


def _function_slice(pid, fn, start_s, end_s) -> dict:
    return _slice(pid, COMPUTE_TID, _short(fn.op), f"compute,{fn.phase}", start_s, end_s,
                  {"function": fn.index, "op": fn.op, "phase": fn.phase})


def _transfer_slice(pid, trace, aid, direction, nbytes, start_s, end_s) -> dict:
    category = trace.arrays[aid].category if 0 <= aid < len(trace.arrays) else "unknown"
    name = f"a{aid} {category}" if aid >= 0 else "unbound storage"
    seconds = end_s - start_s
    args = {"array": aid, "category": category, "bytes": nbytes, "size": format_bytes(nbytes)}
    if seconds > 0:
        args["GB/s"] = round(nbytes / seconds / 1e9, 3)
    return _slice(pid, IN_TID if direction == "in" else OUT_TID, name,
                  "swap-in" if direction == "in" else "swap-out", start_s, end_s, args)


def _changes(pid, name, samples):
    """Counter events for (time, values) samples, only where the values change."""
    last = None
    for t, values in samples:
        if values != last:
            yield _counter(pid, name, t, values)
            last = values


def budget_label(planned: int, budget: int | None = None) -> str:
    """The plan's budget as a label: beside the user's `budget` where they differ (the
    plan gets the budget less what never moves: ooc.planned_budget)."""
    if budget is None or budget == planned:
        return f"budget {format_bytes(planned)}"
    return (f"plan's budget {format_bytes(planned)} (the budget {format_bytes(budget)} less "
            "what never moves)")


def in_core_clock(sim) -> tuple[list[float], float]:
    """When each function starts on plain PyTorch's own clock, and when its step ends
    (`sim.plain_time_s`, for a Simulation with `plain_s`): the functions' compute alone,
    without the contention a transfer beside them costs and without the recomputes plain
    PyTorch never runs."""
    starts, t = [], 0.0
    for compute in sim.plain_s or sim.compute_s:      # a Simulation made without plain_s
        starts.append(t)
        t += compute
    return starts, t


def simulated_events(trace, schedule, sim, *, pid: int = SIMULATED_PID,
                     budget: int | None = None) -> list[dict]:
    """The events of `sim`, a Simulation of `schedule` for `trace`; `budget`: the one the
    user passed, where the plan got less (`budget_label`)."""
    label = f"simulated on {sim.machine}: {schedule.policy}, {budget_label(schedule.budget, budget)}"
    events = _process(pid, label, pid)
    functions = trace.functions
    n = len(functions)
    if len(sim.start_s) != n or len(sim.compute_s) != n:
        raise ValueError(f"the simulation covers {len(sim.start_s)} functions, the trace {n}")
    # 1. Compute: one slice per function; a gap before one is time spent waiting.
    previous_end = 0.0
    for fn, start, compute in zip(functions, sim.start_s, sim.compute_s):
        if start > previous_end:
            events.append(_slice(pid, COMPUTE_TID, "waiting on transfers", "stall", previous_end,
                                 start, {"before function": fn.index}))
        events.append(_function_slice(pid, fn, start, start + compute))
        previous_end = start + compute
    if sim.boundary_s > 0:
        read, written = schedule.boundary(trace)
        events.append(_slice(pid, COMPUTE_TID, "between iterations: moving state", "boundary",
                             sim.step_time_s, sim.iteration_time_s,
                             {"bytes read": read, "bytes written": written}))
    # 2. One slice per transfer, on its direction's track.
    for t in sim.transfers:
        events.append(_transfer_slice(pid, trace, t.array, t.direction, t.nbytes, t.start_s, t.end_s))
    # 3. Counters: the fast tier by category while each function runs, the slow tier, the
    #    budget; and what plain PyTorch held, on its own (in-core) clock.
    occ = by_category(trace, schedule)
    events += _changes(pid, "fast tier (bytes)", (
        (start, dict(zip(occ.categories, row))) for start, row in zip(sim.start_s, occ.fast)))
    events += _changes(pid, "slow tier only (bytes)", (
        (start, {"bytes": slow}) for start, slow in zip(sim.start_s, occ.slow)))
    clock, _ = in_core_clock(sim)
    events += _changes(pid, "in-core, plain PyTorch (bytes, on its own clock)", (
        (start, {"bytes": live}) for start, live in zip(clock, occ.in_core)))
    for t_s in (0.0, sim.iteration_time_s):
        events.append(_counter(pid, "plan's budget (bytes)" if budget not in (None, schedule.budget)
                               else "budget (bytes)", t_s, {"bytes": schedule.budget}))
    return events


def measured_label(iteration: int | None, left_since: int, planned,
                   untracked: bool = False) -> str:
    """What the measured step is, for its panel or process name: which iteration, that
    later ones left their plans (so none of them is shown), that a passive one's bytes are
    the plan's, or (`untracked`: it made larger tensors than its plan's) not known."""
    what = f"iteration {iteration}" if iteration is not None else "one replayed iteration"
    if left_since:
        what += (f", the last that replayed its plan to the end ({left_since} later " + (
            "ones left theirs)" if left_since > 1 else "one left its plan)"))
    if planned is not None:
        what += (", passive: nothing moved and no op was tracked (the budget is above the "
                 "step's peak), its managed bytes as planned")
    elif untracked:
        what += (", passive: nothing moved and no op was tracked (the budget is above the "
                 "step's peak), and its tensors were larger than the plan's: its managed "
                 "bytes are not known op by op and not drawn")
    return what


def measured_events(trace, log, *, budget: int, rss_start: int = 0,
                    pid: int = MEASURED_PID, iteration: int | None = None,
                    left_since: int = 0, planned=None, untracked: bool = False) -> list[dict]:
    """The events of a StepLog (run/steplog.py) of an iteration that replayed `trace`'s
    schedule; `rss_start` is subtracted from the resident set samples. `planned`: per
    function, the plan's fast-tier bytes, shown for a passive iteration, which tracked
    none; `iteration`, `left_since`, `untracked`: as `measured_label` says them (an
    untracked one has no fast-tier counter)."""
    events = _process(pid, f"measured: OutOfCore, budget {format_bytes(budget)}, "
                      f"{measured_label(iteration, left_since, planned, untracked)}", pid)
    origin = log.origin
    functions = trace.functions
    resident, slow, rss = [], [], []
    # 1. Compute: the op itself; before it, the begin-actions and the waits for its
    #    operands; after it, the end-actions (a swap-out is issued there, a WAIT blocks).
    for i, taken, started, returned, done, res_b, off_b, rss_b in log.rows():
        fn = functions[i]
        taken, started, returned, done = (taken - origin, started - origin,
                                          returned - origin, done - origin)
        if started - taken >= MIN_GAP_S:
            events.append(_slice(pid, COMPUTE_TID, "before: swap-ins, waits", "executor", taken,
                                 started, {"function": i}))
        events.append(_function_slice(pid, fn, started, returned))
        if done - returned >= MIN_GAP_S:
            events.append(_slice(pid, COMPUTE_TID, "after: swap-outs, waits", "executor", returned,
                                 done, {"function": i}))
        resident.append((done, {"managed tensors": planned[i] if planned is not None
                                else res_b}))
        slow.append((done, {"bytes": off_b}))
        if rss_b:
            rss.append((done, {"bytes": max(rss_b - rss_start, 0)}))
    # 2. Transfers as the mover threads ran them.
    for aid, direction, nbytes, start, end in log.transfers:
        events.append(_transfer_slice(pid, trace, aid, direction, nbytes, start - origin, end - origin))
    # 3. Counters.
    if not untracked:
        events += _changes(pid, "fast tier (bytes)", resident)
    events += _changes(pid, "slow tier only (bytes)", slow)
    events += _changes(pid, "resident set above base (bytes)", rss)
    for t_s in (0.0, log.end - origin):
        events.append(_counter(pid, "budget (bytes)", t_s, {"bytes": budget}))
    if log.deviation is not None:
        index, reason = log.deviation
        t_s = (log.times[-1] - origin) if len(log) else 0.0
        events.append({"name": "deviated from the record", "ph": "i", "s": "p", "ts": _us(t_s),
                       "pid": pid, "tid": COMPUTE_TID, "args": {"function": index, "reason": reason}})
    return events


def chrome_trace(*event_lists, **other) -> dict:
    """The JSON object: every event list, milliseconds as the display unit, `other`
    (e.g. the trace's label, the budget) shown as the trace's metadata."""
    events = [e for lst in event_lists for e in lst]
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"generator": "outcore", **{k: str(v) for k, v in other.items()}}}


def check_timeline_path(path) -> None:
    """Refuse a timeline path that names a picture or a directory: the file is JSON,
    which Perfetto opens; a .png of JSON opens nowhere."""
    import os
    from ..errors import OutcoreError
    if os.path.isdir(path):
        raise OutcoreError(f"{os.fspath(path)!r} is a directory: name the timeline's file in "
                           "it, e.g. timeline.json")
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix in (".png", ".svg", ".jpg", ".jpeg", ".pdf", ".gif"):
        raise OutcoreError(f"a timeline is a JSON file (Perfetto and chrome://tracing open it), "
                           f"and {os.fspath(path)!r} names a picture ({suffix}): name it "
                           "....json, or draw the picture with ooc.plot() / outcore plot")


def write(path, obj: dict) -> None:
    """Write `obj` as JSON to `path`: the whole file or, interrupted or killed at any
    moment, the old one (NOTE [Atomic save], run/checkpoint.py)."""
    from ..run.checkpoint import atomic_write_json
    check_timeline_path(path)
    atomic_write_json(path, obj)


def simulated_timeline(trace, schedule, sim) -> dict:
    """A file's worth: the simulated step alone."""
    return chrome_trace(simulated_events(trace, schedule, sim), trace=trace.info.get("label", ""),
                        policy=schedule.policy, budget=schedule.budget, machine=sim.machine)
