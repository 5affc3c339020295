"""Timelines (outcore.view.timeline): well-formed Chrome traces whose slices and
counters agree with the schedule they draw, simulated and measured."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import outcore
from outcore.units import format_bytes
from outcore.cli.main import main
from outcore.plan.schedule import SWAP_IN, SWAP_OUT
from outcore.view import by_category, simulated_timeline
from outcore.view.timeline import COMPUTE_TID, IN_TID, MEASURED_PID, OUT_TID, SIMULATED_PID

from ..plan.helpers import traces
from .chrome_format import nest_properly, validate


def _mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU())
                                  for _ in range(6)])
    return model, torch.optim.Adam(model.parameters()), torch.randn(64, 256)


def _step(model, opt, x):
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()


@pytest.fixture(scope="module")
def recorded():
    model, opt, x = _mlp()
    _step(model, opt, x)                      # Adam's state exists, as in steady state
    with outcore.record() as rec:
        _step(model, opt, x)
    return rec.trace


def _slices(events, pid, tid):
    return [e for e in events if e["ph"] == "X" and e["pid"] == pid and e["tid"] == tid]


def _planned_moves(schedule):
    moves = Counter()
    for step in schedule.begin + schedule.end:
        for act in step:
            if act.kind in (SWAP_IN, SWAP_OUT):
                moves[(act.array, "in" if act.kind == SWAP_IN else "out")] += 1
    return moves


def test_simulated_timeline_draws_the_schedule(recorded, tmp_path):
    trace = recorded
    budget = trace.peak(actual=True)[0] // 3
    schedule = outcore.plan(trace, budget)
    sim = outcore.simulate(trace, schedule)
    obj = simulated_timeline(trace, schedule, sim)
    assert validate(obj) == []
    events = obj["traceEvents"]
    assert nest_properly(events) == []
    # Every function once, in order, as long as the simulator says.
    ops = [e for e in _slices(events, SIMULATED_PID, COMPUTE_TID) if e["cat"].startswith("compute")]
    assert [e["args"]["function"] for e in ops] == list(range(len(trace.functions)))
    assert [e["args"]["op"] for e in ops] == [f.op for f in trace.functions]
    # Every SWAP_IN and SWAP_OUT exactly once, on its direction's track, with its bytes.
    drawn = Counter()
    for tid, direction in ((IN_TID, "in"), (OUT_TID, "out")):
        for e in _slices(events, SIMULATED_PID, tid):
            drawn[(e["args"]["array"], direction)] += 1
            assert e["args"]["bytes"] == trace.arrays[e["args"]["array"]].nbytes
    assert drawn == _planned_moves(schedule) and sum(drawn.values()) > 0
    # The fast tier's counter: per function, the schedule's occupancy, within the budget.
    counters = [e for e in events if e["ph"] == "C" and e["name"] == "fast tier (bytes)"]
    totals = [sum(e["args"].values()) for e in counters]
    assert max(totals) <= budget and max(totals) == max(schedule.resident_curve)
    assert set(totals) <= set(schedule.resident_curve)
    budget_counter = [e["args"]["bytes"] for e in events if e["name"] == "budget (bytes)"]
    assert budget_counter == [budget, budget]


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(traces(), st.floats(0.3, 1.0), st.sampled_from(["adaptive", "fixed", "adaptive-belady"]))
def test_occupancy_by_category_adds_up_to_the_resident_curve(trace, fraction, policy):
    budget = max(1, int(trace.peak(actual=True)[0] * fraction))
    try:
        schedule = outcore.plan(trace, budget, policy)
    except outcore.InfeasibleBudget:
        return
    occ = by_category(trace, schedule)
    assert tuple(sum(row) for row in occ.fast) == schedule.resident_curve
    assert all(v >= 0 for row in occ.fast for v in row) and all(s >= 0 for s in occ.slow)
    # Bytes only on the slow tier never exceed what exists outside the fast tier. The
    # resident curve also holds each function's workspace (NOTE [Workspace]), which is
    # no array's.
    total = sum(a.nbytes for a in trace.arrays)
    assert all(s + f <= total + fn.workspace_bytes
               for s, f, fn in zip(occ.slow, schedule.resident_curve, trace.functions))
    obj = simulated_timeline(trace, schedule, outcore.simulate(trace, schedule))
    assert validate(obj) == [] and nest_properly(obj["traceEvents"]) == []


def test_no_timeline_where_every_iteration_raised_infeasible_budget(tmp_path):
    """helper-162: after InfeasibleBudget the advice was to call ooc.timeline() after an
    iteration that replays, which none under that budget ever will."""
    model, opt, x = _mlp()
    with outcore.OutOfCore(budget="4KiB", swap_dir=str(tmp_path)) as ooc:
        for _ in range(2):
            with pytest.raises(outcore.InfeasibleBudget):
                with ooc.iteration():
                    _step(model, opt, x)
        with pytest.raises(outcore.OutcoreError, match="no iteration replayed a plan, and "
                                                       "none will under this budget: function"):
            ooc.timeline(tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


def test_measured_timeline_of_a_replayed_iteration(tmp_path):
    model, opt, x = _mlp()
    path = tmp_path / "step.json"
    with outcore.OutOfCore(budget="2MiB", swap_dir=str(tmp_path)) as ooc:
        with ooc.iteration():
            _step(model, opt, x)
        with pytest.raises(outcore.OutcoreError, match="no iteration has replayed"):
            ooc.timeline(path)
        with pytest.raises(outcore.OutcoreError, match=r"call ooc.traffic\(\) after one"):
            ooc.traffic()
        for _ in range(3):
            with ooc.iteration():
                _step(model, opt, x)
        ooc.timeline(path)
        last = ooc.report().iterations[-1]
        trace, schedule, budget = ooc.trace, ooc.schedule, ooc.budget
    assert last.mode == "replay" and last.deviation is None
    obj = json.loads(path.read_text())
    assert validate(obj) == []
    events = obj["traceEvents"]
    assert nest_properly(events) == []
    assert {e["pid"] for e in events} == {SIMULATED_PID, MEASURED_PID}
    # One budget is called the budget: the plan's, where it is less, says whose it is.
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert f"budget {format_bytes(budget)}" in names[MEASURED_PID]
    assert schedule.budget < budget                     # small biases never move
    assert (f"plan's budget {format_bytes(schedule.budget)} (the budget "
            f"{format_bytes(budget)} less") in names[SIMULATED_PID], names
    ops = [e for e in _slices(events, MEASURED_PID, COMPUTE_TID) if e["cat"].startswith("compute")]
    assert [e["args"]["function"] for e in ops] == list(range(len(trace.functions)))
    # What the movers did, byte for byte what the report counts for that iteration.
    moved = {d: sum(e["args"]["bytes"] for e in _slices(events, MEASURED_PID, tid))
             for tid, d in ((IN_TID, "in"), (OUT_TID, "out"))}
    assert moved == {"in": last.bytes_read, "out": last.bytes_written}
    assert moved["in"] > 0 and moved["out"] > 0
    # The managed bytes in fast memory stay within the budget while the plan holds.
    fast = [e["args"]["managed tensors"] for e in events
            if e["pid"] == MEASURED_PID and e["name"] == "fast tier (bytes)"]
    assert fast and max(fast) <= budget
    # Both processes start at 0 and cover a step of about the same length.
    measured_end = max(e["ts"] + e["dur"] for e in ops)
    assert 0 <= min(e["ts"] for e in ops) < measured_end
    assert schedule is not None and [p for p in tmp_path.iterdir()] == [path]


def test_cli_simulate_writes_a_timeline(recorded, tmp_path, capsys):
    trace_path, out = tmp_path / "t.json", tmp_path / "timeline.json"
    recorded.save(trace_path)
    half = recorded.peak(actual=True)[0] // 2
    budget = f"{half}B"
    assert main(["simulate", str(trace_path), "--budget", budget, "--timeline", str(out)]) == 0
    assert "timeline written" in capsys.readouterr().out
    assert validate(json.loads(out.read_text())) == []
    assert main(["simulate", str(trace_path), "--budget", f"{budget},{half * 10}B",
                 "--timeline", str(out)]) == 2
    assert "one trace, one budget and one policy" in capsys.readouterr().err


def test_validator_catches_malformed_events():
    good = {"name": "f", "ph": "X", "ts": 0, "dur": 1, "pid": 1, "tid": 1}
    assert validate({"traceEvents": [good]}) == []
    assert validate({"traceEvents": [dict(good, dur=-1)]})
    assert validate({"traceEvents": [dict(good, ph="Q")]})
    assert validate({"traceEvents": [{"name": "c", "ph": "C", "ts": 0, "pid": 1, "args": {"v": "x"}}]})
    assert validate({"events": []})
    overlapping = [good, dict(good, ts=0.5, dur=1)]
    assert nest_properly(overlapping)


def test_the_views_show_the_last_whole_replay_and_say_so(tmp_path):
    """helper-138: after an iteration that left its plan (a larger batch), the measured
    timeline had 2 compute slices and 74 MiB of transfers running far past them, and the
    picture drew it as "one replayed iteration"; a passive one (the budget above the
    peak) drew the managed bytes flat at what existed before the step. Now they show the
    last iteration that replayed to its end, say which and how many left their plans
    since, and a passive one's bytes are the plan's, function by function."""
    model, opt, x = _mlp()
    path = tmp_path / "step.json"
    with outcore.OutOfCore(budget="2MiB", swap_dir=str(tmp_path)) as ooc:
        for batch in (x, x, x, torch.randn(96, 256)):
            with ooc.iteration():
                _step(model, opt, batch)
        modes = [(it.mode, bool(it.deviation)) for it in ooc.report().iterations]
        assert modes[2:] == [("replay", False), ("replay", True)], modes
        ooc.timeline(path)
        last = ooc.report().iterations[2]
        trace = ooc._last_replay.trace
    events = json.loads(path.read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert ("iteration 3, the last that replayed its plan to the end (1 later one left "
            "its plan)") in names[MEASURED_PID], names
    ops = [e for e in _slices(events, MEASURED_PID, COMPUTE_TID) if e["cat"].startswith("compute")]
    assert [e["args"]["function"] for e in ops] == list(range(len(trace.functions)))
    moved = {d: sum(e["args"]["bytes"] for e in _slices(events, MEASURED_PID, tid))
             for tid, d in ((IN_TID, "in"), (OUT_TID, "out"))}
    assert moved == {"in": last.bytes_read, "out": last.bytes_written}

    model, opt, x = _mlp()
    with outcore.OutOfCore(budget="1GiB", swap_dir=str(tmp_path)) as ooc:
        for _ in range(4):
            with ooc.iteration():
                _step(model, opt, x)
        assert ooc._last_replay.passive
        ooc.timeline(path)
        trace, schedule = ooc.trace, ooc.schedule
    events = json.loads(path.read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert "passive: nothing moved and no op was tracked" in names[MEASURED_PID], names
    fast = [e["args"]["managed tensors"] for e in events
            if e["pid"] == MEASURED_PID and e["name"] == "fast tier (bytes)"]
    assert max(fast) == schedule.peak_bytes and min(fast) < max(fast)

    # A passive replay of larger tensors that still fit stays passive (helper-140: the
    # plan's bytes drawn for it were a third of what the step held): not drawn.
    model, opt, x = _mlp()
    with outcore.OutOfCore(budget="1GiB", swap_dir=str(tmp_path)) as ooc:
        for batch in (x, x, x, torch.randn(1024, 256)):
            with ooc.iteration():
                _step(model, opt, batch)
        assert ooc._last_replay.passive and ooc._last_replay.iteration == 4
        assert ooc._last_replay.more > 0
        ooc.timeline(path)
        ooc.plot(tmp_path / "larger.png")
    events = json.loads(path.read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert "larger than the plan's: its managed bytes are not known" in names[MEASURED_PID]
    assert not [e for e in events if e["pid"] == MEASURED_PID
                and e["name"] == "fast tier (bytes)"]


def test_the_in_core_curve_runs_on_plain_pytorchs_clock(recorded):
    """helper-138: the in-core curve's clock added the functions' compute with the
    contention a transfer beside them costs (R50: 19.5 s more than in-core): plain
    PyTorch has no transfers. Its curve ends at the simulation's plain time."""
    import dataclasses
    from outcore.view.timeline import in_core_clock
    # As recorded on 2 threads: on 2 cores the mover has no core to spare, so functions
    # beside a transfer lose compute to it (NOTE [No core to spare] in engine.py).
    recorded = dataclasses.replace(recorded, info={**recorded.info, "threads": 2})
    half = recorded.peak(actual=True)[0] // 2
    schedule = outcore.plan(recorded, half)
    sim = outcore.simulate(recorded, schedule, "cpu-disk")
    assert sim.contention_s > 0
    starts, end = in_core_clock(sim)
    assert end == pytest.approx(sim.plain_time_s) and len(starts) == len(recorded.functions)
    events = simulated_timeline(recorded, schedule, sim)["traceEvents"]
    curve = [e["ts"] for e in events if e["name"].startswith("in-core, plain PyTorch")]
    assert max(curve) <= sim.plain_time_s * 1e6
