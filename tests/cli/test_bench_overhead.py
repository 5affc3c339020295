"""`outcore bench overhead`: outcore's own cost per op, measured (the simulator's
Machine.per_function_s)."""
import json
import logging

import pytest

from outcore.bench.overhead import measure_overhead
from outcore.cli.main import main
from outcore.errors import OutcoreError


def test_measures_a_replay_that_moves_data_against_plain_steps(capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="outcore"):
        assert main(["bench", "overhead", "--json"]) == 0
    # The plain steps train a twin: stepping the managed model between iterations ran
    # its optimizer outside the budget, and outcore's warning said so in the output.
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    fig = json.loads(capsys.readouterr().out)
    assert set(fig) == {"per_function_s", "functions", "plain_s", "outcore_s", "wait_s",
                        "bytes_read", "unsteady"}
    # Hundreds of functions, so that the per-op figure is not one op's noise; both steps
    # timed; the cost per op is a share of the difference, never negative.
    assert fig["functions"] > 500
    assert fig["bytes_read"] > 0            # a real replay: one that moves nothing is cheaper
    assert fig["plain_s"] > 0 and fig["outcore_s"] > 0 and fig["wait_s"] >= 0
    expected = max(0.0, (fig["outcore_s"] - fig["wait_s"] - fig["plain_s"]) / fig["functions"])
    assert fig["per_function_s"] == pytest.approx(expected)


def test_bad_arguments_are_clear_errors(capsys):
    assert main(["bench", "overhead", "--quick"]) != 0
    assert "neither --quick" in capsys.readouterr().err
    with pytest.raises(OutcoreError, match="at least 3 steps"):
        measure_overhead(steps=2)


def test_an_unsteady_measurement_is_named(capsys, monkeypatch):
    """helper-204: "0.0 µs per op" beside a disturbed plain step, and nothing said so."""
    from outcore.bench import overhead
    assert overhead.unsteady([0.010, 0.011, 0.010], [0.012, 0.012, 0.013], [0, 0, 0]) == []
    # One step twice the rest, on a quiet machine (5.0 to 10.6 ms seen): steady.
    quiet = [0.005] * 14 + [0.0106]
    assert overhead.unsteady(quiet, [0.007] * 15, [0.0] * 15) == []
    busy = [0.010] * 5 + [0.150] * 10
    said = overhead.unsteady(busy, [0.013] * 15, [0.001] * 15)
    assert said[0] == "the middle half of the plain steps took 10.0 to 150.0 ms", said
    assert "outcore's steps took less than plain ones (12.0 against 150.0 ms" in said[1], said
    fig = {"per_function_s": 0.0, "functions": 600, "plain_s": 0.150, "outcore_s": 0.152,
           "wait_s": 0.0, "bytes_read": 1, "unsteady": said}
    monkeypatch.setattr(overhead, "measure_overhead", lambda steps, directory=None: fig)
    assert main(["bench", "overhead"]) == 0
    out = capsys.readouterr().out
    assert "0.0 µs per op" in out and "unsteady: the middle half of the plain steps" in out
    assert "measure again with the machine quiet" in out
