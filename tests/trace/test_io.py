"""Traces round-trip through JSON; malformed or foreign files raise TraceError."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import outcore
from outcore import workloads


@pytest.fixture(scope="module")
def trace():
    w = workloads.build("mlp", batch=4, optimizer="adam")
    w.step()
    with outcore.record(label="mlp test") as rec:
        w.step()
    return rec.trace


def test_round_trip(trace, tmp_path):
    path = tmp_path / "t.json"
    trace.save(path)
    loaded = outcore.Trace.load(path)
    assert loaded == trace
    assert loaded.info["label"] == "mlp test"
    assert str(loaded) == str(trace)
    assert not list(tmp_path.glob("*.tmp"))


def test_summary_names_peak_and_categories(trace):
    text = str(trace)
    for word in ("functions per phase", "in-core peak", "parameter", "optimizer_state",
                 "gradient", "largest arrays", "forward", "backward", "optimizer"):
        assert word in text
    assert "Trace(" in repr(trace)


def _write(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize("content,message", [
    ("", "not valid JSON"),
    ("{not json", "not valid JSON"),
    ("[1, 2, 3]", "not an outcore trace"),
    ({"hello": "world"}, "not an outcore trace"),
    ({"format": "outcore.trace", "version": 99}, "version 99"),
    ({"format": "outcore.trace", "version": 1}, "missing field 'device'"),
])
def test_malformed_files(tmp_path, content, message):
    with pytest.raises(outcore.TraceError, match=message):
        outcore.Trace.load(_write(tmp_path, content))


def test_missing_file_is_a_trace_error(tmp_path):
    with pytest.raises(outcore.TraceError, match="cannot read"):
        outcore.Trace.load(tmp_path / "nope.json")


def test_targeted_corruptions(trace, tmp_path):
    good = trace.to_dict()

    def corrupt(edit):
        data = json.loads(json.dumps(good))
        edit(data)
        return _write(tmp_path, data)

    cases = [
        (lambda d: d["functions"][3]["accesses"].append([10**6, "r"]), "does not exist"),
        (lambda d: d["functions"][3]["accesses"].append([0, "x"]), "r/w/c"),
        (lambda d: d["arrays"][2].update(nbytes=-5), "negative"),
        (lambda d: d["arrays"][2].update(id=7), "count up"),
        (lambda d: d["arrays"][2].pop("kind"), "missing field 'kind'"),
        (lambda d: d["arrays"][2].update(kind="forever"), "not one of"),
        (lambda d: d["functions"][0].update(phase="sideways"), "not one of"),
        (lambda d: d["functions"][0].update(duration_s="fast"), "expected int or float"),
        (lambda d: d["arrays"][2].update(last_use=10**6), "outside"),
        (lambda d: d["arrays"][5].update(first_use=0, last_use=0) if d["arrays"][5]["first_use"] else
         d["arrays"][5].update(first_use=1), "first_use"),
    ]
    for edit, message in cases:
        with pytest.raises(outcore.TraceError, match=message):
            outcore.Trace.load(corrupt(edit))


def _mutations(data):
    """Paths to every leaf of a (small) trace dict."""
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node[:3]):
                walk(v, path + [i])
        paths.append(path)
    walk(data, [])
    return paths


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_corruptions_raise_only_trace_error(trace, data):
    doc = json.loads(json.dumps(trace.to_dict()))
    paths = [p for p in _mutations(doc) if p]
    path = data.draw(st.sampled_from(paths), label="path")
    replacement = data.draw(st.one_of(st.none(), st.integers(-3, 10**7), st.text(max_size=3),
                                      st.booleans(), st.just([]), st.just({})))
    node = doc
    for key in path[:-1]:
        node = node[key]
    if data.draw(st.booleans()) and isinstance(node, dict):
        node.pop(path[-1])
    else:
        node[path[-1]] = replacement
    try:
        outcore.Trace.from_dict(doc)
    except outcore.TraceError:
        pass          # a clear error: fine; anything else propagates and fails the test


def test_workspace_round_trips_older_traces_load_it_as_zero_and_a_negative_one_is_refused(tmp_path):
    from outcore.trace.io import from_dict
    from outcore.trace.model import Trace

    from ..plan.helpers import build
    t = build({"x": (8, "input"), "h": 8}, ["f0 r:x c:h", "f1 r:h"], workspace={1: 32})
    path = tmp_path / "t.json"
    t.save(path)
    assert [f.workspace_bytes for f in Trace.load(path).functions] == [0, 32]
    data = json.loads(path.read_text())
    for fn in data["functions"]:
        del fn["workspace_bytes"]
    assert [f.workspace_bytes for f in from_dict(data).functions] == [0, 0]
    data["functions"][1]["workspace_bytes"] = -1
    with pytest.raises(outcore.TraceError, match="workspace_bytes.*negative workspace -1"):
        from_dict(data)


@pytest.mark.parametrize("field", ["duration_s", "host_s", "host_cpu_s"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_time_that_is_no_finite_number_is_refused(trace, tmp_path, field, value):
    from outcore.trace.io import to_dict      # the submodule by itself, whatever ran first
    data = json.loads(json.dumps(to_dict(trace)))
    data["functions"][3][field] = value                  # json writes NaN / Infinity
    with pytest.raises(outcore.TraceError, match=rf"functions\[3\].{field}: expected a finite"):
        outcore.Trace.load(_write(tmp_path, data))


def test_a_failed_save_keeps_what_the_file_held(trace, tmp_path, monkeypatch):
    """trace.save and Schedule.save write atomically: a write that fails (a full disk,
    seen when the bytes are flushed) leaves the old file whole and no temporary beside
    it. Before, Schedule.save truncated the file first, and trace.save left its .tmp."""
    from outcore.run import checkpoint
    path = tmp_path / "t.json"
    path.write_text("the old contents")

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    schedule = outcore.plan(trace, trace.peak(actual=True)[0] // 2)
    for save in (trace.save, schedule.save):
        monkeypatch.setattr(checkpoint.os, "fsync", disk_full)
        with pytest.raises(OSError, match="No space"):
            save(path)
        monkeypatch.undo()
        assert path.read_text() == "the old contents" and sorted(tmp_path.iterdir()) == [path]
    schedule.save(path)
    assert outcore.Schedule.load(path) == schedule
