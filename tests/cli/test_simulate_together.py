"""`outcore simulate T0 T1 --together`: the ranks of one step, simulated together."""
import pytest

from outcore.cli.main import main

from ..plan.helpers import build


def _save(tmp_path, traces):
    paths = []
    for rank, trace in enumerate(traces):
        path = tmp_path / f"trace.rank{rank}.json"
        trace.save(path)
        paths.append(str(path))
    return paths


def _stages():
    # Rank 0 computes for 1 s and sends 8 MB; rank 1 receives them and computes 1 s.
    send = build({"x": (4, "input"), "a": 8 * 10**6},
                 ["aten.mm.default r:x c:a", "c10d.send.default r:a"], durations=[1.0, 1.0])
    recv = build({"b": (8 * 10**6, "input"), "c": 4},
                 ["c10d.recv_.default w:b", "aten.mul.default r:b c:c"], durations=[1.0, 1.0])
    return send, recv


def test_the_receiver_waits_for_its_sender(tmp_path, capsys):
    paths = _save(tmp_path, _stages())
    assert main(["simulate", *paths, "--together", "--interconnect", "loopback-gloo"]) == 0
    out = capsys.readouterr().out
    assert "2 ranks simulated together on cpu-disk, collectives over loopback-gloo" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()
            and len(line.split()) == 10]
    step = {int(r[0]): float(r[6]) for r in rows}       # step ms per rank
    stall = {int(r[0]): float(r[8]) for r in rows}
    # The receiver cannot start its op before the sender's 1 s of compute and the transfer.
    assert step[1] > step[0] >= 1000.0 and stall[1] >= 1000.0, out
    assert "(rank 1, the slowest)" in out
    # Host time and outcore's own cost per op count on cpu-disk: 1 ms on each op, the
    # send's too (the executor dispatches it on the host before it is issued).
    assert main(["simulate", *paths, "--together", "--per-op-us", "1000"]) == 0
    out2 = capsys.readouterr().out
    rows2 = [line.split() for line in out2.splitlines() if line.strip()[:1].isdigit()
             and len(line.split()) == 10]
    assert float(rows2[0][7]) == pytest.approx(float(rows[0][7]) + 2.0)   # compute ms, rank 0


def test_ranks_that_fill_the_cores_default_to_gloo_beside_compute(tmp_path, capsys, monkeypatch):
    # On 2 cores, 2 ranks on one node leave none to spare, so collectives are priced as
    # `bench comm --busy` measured them; one rank per node leaves one.
    import dataclasses

    from outcore.simulate.machines import PRESETS
    monkeypatch.setitem(PRESETS, "cpu-disk", dataclasses.replace(PRESETS["cpu-disk"], cores=2))
    paths = _save(tmp_path, _stages())
    assert main(["simulate", *paths, "--together"]) == 0
    out = capsys.readouterr().out
    assert "collectives over loopback-gloo-busy" in out and "no core to spare" in out
    assert main(["simulate", *paths, "--together", "--ranks-per-node", "1"]) == 0
    out = capsys.readouterr().out
    assert "collectives over loopback-gloo" in out and "loopback-gloo-busy" not in out
    assert "no core to spare" not in out


@pytest.mark.parametrize("extra,message", [
    (["--ranks-per-node", "0"], "--ranks-per-node must be from 1 to the 2 ranks"),
    (["--ranks-per-node", "3"], "--ranks-per-node must be from 1 to the 2 ranks"),
    (["--ranks", "2"], "no --ranks"),
    (["--budget", "1MB,2MB"], "one --budget"),
    (["--policy", "all"], "one --policy"),
    (["--per-op-us", "-1"], "must be >= 0"),
    (["--interconnect", "smoke-signals"], "unknown interconnect"),
    (["--machine", "a100-40gb", "--per-op-us", "5"], "use the trace's own durations"),
])
def test_bad_arguments_are_clear_errors(tmp_path, capsys, extra, message):
    paths = _save(tmp_path, _stages())
    assert main(["simulate", *paths, "--together", *extra]) != 0
    assert message in capsys.readouterr().err


def test_one_trace_or_unmatched_ranks_are_refused(tmp_path, capsys):
    send, recv = _stages()
    assert main(["simulate", _save(tmp_path, [send])[0], "--together"]) != 0
    assert "at least 2" in capsys.readouterr().err
    assert main(["simulate", *_save(tmp_path, [send, recv, recv]), "--together"]) != 0
    assert "does not say which rank" in capsys.readouterr().err
    assert main(["simulate", "--per-op-us", "3", _save(tmp_path, [send])[0]]) != 0
    assert "--per-op-us goes with --together" in capsys.readouterr().err
    assert main(["simulate", "--ranks-per-node", "2", _save(tmp_path, [send])[0]]) != 0
    assert "--ranks-per-node goes with --together" in capsys.readouterr().err


def test_traces_with_no_communication_are_not_ranks(tmp_path, capsys):
    """helper-152: the traces of two separate runs were simulated as one step's ranks."""
    one = build({"x": (4, "input"), "y": 4}, ["aten.mm.default r:x c:y"], durations=[1.0])
    assert main(["simulate", *_save(tmp_path, [one, one]), "--together"]) != 0
    assert "none of the 2 traces has a collective" in capsys.readouterr().err
