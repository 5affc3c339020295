"""Host time between ops (Function.host_s): recorded, saved, and counted by the simulator
only when the machine asks for it."""
from __future__ import annotations

import dataclasses
import json
import time

import torch

import outcore
from outcore.plan import plan
from outcore.simulate import simulate
from outcore.simulate.machines import PRESETS
from outcore.trace import Trace

SLEEP_S = 0.02


def _trace(pause: bool):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    x = torch.randn(32, 64)
    with outcore.record() as rec:
        h = model[0](x)
        if pause:
            time.sleep(SLEEP_S)             # framework time between two ops
        model[2](model[1](h)).sum().backward()
    return rec.trace


def test_recorder_keeps_the_time_between_ops():
    trace = _trace(pause=True)
    host = [f.host_s for f in trace.functions]
    assert all(h >= 0 for h in host)
    # The sleep lands on the first op after it, not on an op's own duration.
    after = max(range(len(host)), key=host.__getitem__)
    assert host[after] >= SLEEP_S, host
    assert trace.functions[after].duration_s < SLEEP_S
    assert sum(host) - host[after] < SLEEP_S          # the rest is small: no double count


def test_host_time_survives_save_and_old_traces_load(tmp_path):
    trace = _trace(pause=True)
    path = tmp_path / "t.json"
    trace.save(path)
    again = Trace.load(path)
    assert [f.host_s for f in again.functions] == [f.host_s for f in trace.functions]
    data = json.loads(path.read_text())
    for fn in data["functions"]:
        del fn["host_s"]                   # a trace written before the field existed
    path.write_text(json.dumps(data))
    assert all(f.host_s == 0.0 for f in Trace.load(path).functions)


def test_simulator_counts_host_time_only_when_asked():
    trace = _trace(pause=True)
    schedule = plan(trace, trace.peak(actual=True)[0])
    base = PRESETS["cpu-disk"]
    plain = simulate(trace, schedule, base)
    with_host = simulate(trace, schedule, dataclasses.replace(base, host_time=True, per_function_s=1e-3))
    expected = sum(f.host_s for f in trace.functions) + 1e-3 * len(trace.functions)
    assert abs((with_host.step_time_s - plain.step_time_s) - expected) < 1e-9
