"""The memory picture, the report's JSON, the traffic comparison and the demo's files."""
from __future__ import annotations

import json
import sys

import pytest
import torch

import outcore
from outcore.cli.main import main
from outcore.run.report import Elided, Report
from outcore.view.plot import plot_memory
from outcore.view.traffic import compare

from .chrome_format import nest_properly, validate
from ..text import flat


def _train(tmp_path, iterations=4):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU())
                                  for _ in range(6)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(64, 256)
    ooc = outcore.OutOfCore(budget="2MiB", swap_dir=str(tmp_path))
    for _ in range(iterations):
        with ooc.iteration():
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
    return ooc


def test_plot_png_and_svg_of_a_run(tmp_path):
    with _train(tmp_path) as ooc:
        ooc.plot(tmp_path / "m.png")
        ooc.plot(tmp_path / "m.svg")
        with pytest.raises(outcore.OutcoreError, match="PNG or SVG"):
            ooc.plot(tmp_path / "m.jpg")
    png = (tmp_path / "m.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    svg = (tmp_path / "m.svg").read_text()
    assert "<svg" in svg and "budget" in svg and "managed tensors" in svg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png", "m.svg"]


def _panel_setup():
    """pyplot (Agg), outcore.view.plot, and a recording of four Linear layers."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from outcore.view import plot as view_plot
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    with outcore.record() as rec:
        model(torch.randn(8, 256)).sum().backward()
    return plt, view_plot, rec


def test_the_planned_panel_names_the_budget_it_was_given():
    """helper-73: the top panel's budget line read "plan's budget 2.00 MiB (the budget
    2 B less what never moves)": the user's budget was overwritten by the line's height
    in MiB. It names the plan's budget alone, or beside the user's where that differs."""
    plt, view_plot, rec = _panel_setup()
    schedule = outcore.plan(rec.trace, "512KiB")
    sim = outcore.simulate(rec.trace, schedule, "cpu-disk")
    for budget, label in ((None, "budget 512.00 KiB"),
                          (2**20, "plan's budget 512.00 KiB (the budget 1.00 MiB less what "
                                  "never moves)")):
        fig, ax = plt.subplots()
        view_plot._planned(ax, rec.trace, schedule, sim, budget)
        assert label in [line.get_label() for line in ax.get_lines()]
        plt.close(fig)


def test_a_budget_far_above_the_step_does_not_flatten_the_picture():
    """helper-162: at a budget 32x the step's peak the axis ran to the budget, the step a
    sliver along the bottom. The axis ends a little above the most shown, and the budget
    is named at the top; near the step, the axis still runs to the budget line."""
    plt, view_plot, rec = _panel_setup()
    peak = rec.trace.peak(actual=True)[0]
    for budget, far in ((64 * peak, True), (peak // 2, False)):
        schedule = outcore.plan(rec.trace, budget)
        sim = outcore.simulate(rec.trace, schedule, "cpu-disk")
        fig, ax = plt.subplots()
        view_plot._planned(ax, rec.trace, schedule, sim)
        top = ax.get_ylim()[1] * 2**20
        notes = [t.get_text() for t in ax.texts]
        plt.close(fig)
        if far:
            assert peak < top < 1.5 * peak
            assert notes == ["the budget, " + outcore.units.format_bytes(schedule.budget)
                             + ", is above the scale: 64x the most shown"], notes
        else:
            assert top >= schedule.budget and not notes


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    with _train(tmp_path) as ooc:
        trace, schedule = ooc._last_replay.trace, ooc._last_replay.schedule
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(outcore.OutcoreError, match=r"pip install 'outcore\[plot\]'"):
        plot_memory(trace, schedule, outcore.simulate(trace, schedule), tmp_path / "x.png")


def test_cli_plot(tmp_path, capsys):
    with _train(tmp_path) as ooc:
        trace = ooc.trace
    path = tmp_path / "t.json"
    trace.save(path)
    assert main(["plot", str(path), "--budget", "2MiB", "-o", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


def test_the_report_says_what_unplanned_counts_where_a_replay_has_some(tmp_path):
    """helper-162, helper-165: replays showed a small constant "unplanned" figure (the
    batch the loop holds while the next loads), said nowhere in the report."""
    with _train(tmp_path) as ooc:
        report = ooc.report()
    data = report.to_dict()
    assert any(it["mode"] == "replay" and it["unplanned_bytes"] for it in data["iterations"])
    legend = "unplanned: bytes read or written outside the plan: "
    assert legend in flat(report)
    for it in data["iterations"]:
        if it["mode"] == "replay":
            it["unplanned_bytes"] = 0
    assert legend not in str(Report.from_dict(data))


def test_report_json_round_trips(tmp_path, capsys):
    with _train(tmp_path) as ooc:
        report = ooc.report()
    assert len(report.iterations) == 4 and report.iterations[-1].mode == "replay"
    assert Report.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    path = tmp_path / "run.json"
    report.save(path)
    assert Report.load(path) == report
    assert main(["report", str(path)]) == 0
    assert capsys.readouterr().out.strip() == str(report)
    assert main(["report", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == report.to_dict()
    # Unknown fields (a newer outcore) are ignored; a missing one or another file is an error.
    data = report.to_dict()
    data["iterations"][0]["from_the_future"] = 1
    assert Report.from_dict(data) == report
    del data["budget"]
    with pytest.raises(outcore.OutcoreError, match="malformed outcore report"):
        Report.from_dict(data)
    (tmp_path / "x.json").write_text("[1, 2]")
    assert main(["report", str(tmp_path / "x.json")]) == 2
    assert "not an outcore report" in capsys.readouterr().err
    (tmp_path / "y.json").write_text("{nope")
    assert main(["report", str(tmp_path / "y.json")]) == 2
    assert "is not JSON" in capsys.readouterr().err
    # Another of outcore's files is named for what it is (a newcomer passed a trace to
    # `report`, and a schedule to `simulate` and `plot`: "not an outcore trace").
    (tmp_path / "t.json").write_text(json.dumps({"format": "outcore.trace", "version": 1}))
    assert main(["report", str(tmp_path / "t.json")]) == 2
    assert f"{tmp_path / 't.json'} is not an outcore report" in (err := capsys.readouterr().err)
    assert "it is a trace" in err
    data["budget"] = 1
    (tmp_path / "r.json").write_text(json.dumps(data))
    (tmp_path / "s.json").write_text(json.dumps({"format": "outcore.schedule", "version": 1}))
    for command in ("simulate", "plot", "plan"):
        for path, kind in (("s.json", "a schedule"), ("r.json", "a run's report")):
            out = ["-o", str(tmp_path / "x.png")] if command == "plot" else []
            assert main([command, str(tmp_path / path), "--budget", "1GiB", *out]) == 2
            assert f"not an outcore trace (expected \"format\": \"outcore.trace\"); it is {kind}" \
                in capsys.readouterr().err


def test_traffic_comparison_accounts_for_every_byte(tmp_path):
    with _train(tmp_path) as ooc:
        trace, schedule, log = ooc._last_replay[:3]
        last = ooc.report().iterations[-1]
        shown = ooc.traffic()           # the public form docs/see.md shows (helper-195)
    t = compare(trace, schedule, log)
    assert shown == t
    assert t.measured == {"in": last.bytes_read, "out": last.bytes_written}
    for d in ("in", "out"):
        assert (t.planned[d] + t.boundary[d] + t.extra[d] - t.skipped[d] + t.unbound[d]
                == t.measured[d])
    assert t.planned == {"in": schedule.bytes_in, "out": schedule.bytes_out}
    assert str(t).startswith("read: planned")


def test_demo_prints_both_runs_and_writes_valid_files(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--iterations", "3", "--batch", "4", "--image-size", "32",
                 "--swap-dir", str(tmp_path), "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "losses bitwise equal: yes" in text
    assert "peak - start" in text and "planned against measured bytes" in text
    timeline = json.loads((out / "timeline.json").read_text())
    assert validate(timeline) == [] and nest_properly(timeline["traceEvents"]) == []
    assert (out / "memory.png").read_bytes().startswith(b"\x89PNG")
    assert Report.load(out / "report.json").iterations[-1].mode == "replay"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


@pytest.mark.parametrize("args, says", [
    (["--iterations", "2"], "--iterations must be at least 3"),
    # helper-204: batch 0 trained on NaN losses, a bad policy failed after the in-core
    # run, two iterations drew nothing and said nothing.
    (["--batch", "0"], "--batch and --image-size must be at least 1"),
    (["--batch", "1", "--image-size", "32"],
     "one value per channel (batch 1, 1x1), and training needs more: pass --batch 2 or more"),
    (["--policy", "foo"], "'foo' is not a planning policy"),
    (["--fraction", "1.5"], "--fraction must be in (0, 1]"),
    (["--swap-dir", "{tmp}/missing"], "missing does not exist; create it first"),
    (["--swap-dir", "{tmp}/file"], "file is a file, not a directory"),
])
def test_demo_refuses_bad_arguments_before_it_trains(tmp_path, capsys, args, says):
    (tmp_path / "file").write_text("")
    code = main(["demo", *[a.format(tmp=tmp_path) for a in args]])
    printed = capsys.readouterr()
    assert code == 2 and says in printed.err, printed
    assert "ResNet-50" not in printed.out              # refused before the first run began
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_the_library_logs_plans_and_deviations(tmp_path, caplog, capsys):
    import logging
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with caplog.at_level(logging.INFO, logger="outcore"), \
            outcore.OutOfCore(budget="1MiB", swap_dir=str(tmp_path)) as ooc:
        for batch in (64, 64, 96):             # the third step is larger: it deviates
            with ooc.iteration():
                model(torch.randn(batch, 256)).sum().backward()
                opt.step()
                opt.zero_grad()
    planned = [r for r in caplog.records if r.getMessage().startswith("planned ")]
    deviated = [r for r in caplog.records if "deviated from the recorded step" in r.getMessage()]
    assert len(planned) == 1 and planned[0].levelno == logging.INFO
    # Learnt from (the next step is recorded, its plan grows): said, no warning.
    assert len(deviated) == 1 and deviated[0].levelno == logging.INFO
    assert capsys.readouterr() == ("", "")        # nothing printed


def test_the_report_says_what_the_allocator_gave_back():
    from outcore.run.report import IterationStats
    it = IterationStats(index=3, mode="replay", seconds=1.0, bytes_read=1, bytes_written=1,
                        unplanned_bytes=0, wait_s=0.0, transfer_s=0.5, restore_s=0.0,
                        peak_resident=10, page_faults=45000, trims=3, trimmed_bytes=643 * 2**20)
    report = Report(budget=100, policy="auto", swap="disk", functions=5, in_core_peak=400,
                    planned_peak=100, planned_in=1, planned_out=1, pinned_bytes=0,
                    iterations=(it,), huge_pages="on (THP_MEM_ALLOC_ENABLE=1, set by outcore at import)")
    lines = str(report).splitlines()
    assert ("        the allocator gave back 643.00 MiB in 3 trims (to keep rss+ within the "
            "budget + 128.00 MiB + budget/5); the step faulted in again what it reused") in lines
    assert "  huge pages for tensors: on (THP_MEM_ALLOC_ENABLE=1, set by outcore at import)" in lines
    assert Report.from_dict(report.to_dict()) == report


def _unwrapped(report) -> list[str]:
    """The report's lines with the header's wrapped ones joined again (a continuation
    is indented 12 spaces: run/report.py `_wrapped`)."""
    lines = []
    for line in str(report).splitlines():
        if lines and line.startswith(" " * 12) and not line.startswith(" " * 13):
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    return lines


def test_the_report_wraps_its_header_and_not_its_rows():
    """helper-165: header lines of 400+ characters. Each is wrapped at run/report.WIDTH,
    continued 12 spaces in; the table's rows are not (their columns must line up)."""
    from outcore.run.report import WIDTH, IterationStats
    it = IterationStats(index=1, mode="replay", seconds=1.0, bytes_read=1, bytes_written=1,
                        unplanned_bytes=0, wait_s=0.0, transfer_s=0.0, restore_s=0.0,
                        peak_resident=10)
    report = Report(budget=20 * 2**20, policy="auto", swap="disk", functions=5,
                    in_core_peak=40 * 2**20, planned_peak=9 * 2**20, planned_in=1, planned_out=1,
                    pinned_bytes=7 * 2**20, planned_budget=9 * 2**20, iterations=(it,),
                    rss_start=300 * 2**20, rss_bound=130 * 2**20)
    lines = str(report).splitlines()
    table = next(i for i, line in enumerate(lines) if line.startswith("  iter  mode"))
    assert all(len(line) <= WIDTH for line in lines[:table]), lines
    assert sum(line.startswith(" " * 12) for line in lines[:table]) >= 4, lines
    assert lines[table + 1].startswith("     1  replay") and len(lines[table]) > WIDTH
    resident = next(line for line in _unwrapped(report) if line.startswith("  resident set:"))
    assert resident.endswith("budget + 128.00 MiB + budget/5 (here 130.00 MiB)"), resident


def test_the_report_counts_what_the_plan_moves_between_iterations():
    """A plan may end with state in fast memory that the next iteration starts without
    (plan/api.py `_cycle` keeps it where that moves fewer bytes in all); the report said
    only the step's own moves, 4.5 MiB short of what every FSDP2 replay wrote. It says
    both now, and the figure survives a save and a malformed one is refused."""
    report = Report(budget=100, policy="auto", swap="disk", functions=5, in_core_peak=400,
                    planned_peak=100, planned_in=2**20, planned_out=2**20, pinned_bytes=0,
                    planned_between=(0, 9 * 2**19))
    planned = [line for line in _unwrapped(report) if "planned:" in line]
    assert planned == ["  planned:  peak 100 B, per iteration 1.00 MiB in, 1.00 MiB out; and "
                       "4.50 MiB written between iterations (state the step ends with on one "
                       "tier and the next starts with on the other: the plan moves fewer bytes "
                       "in all so)"], planned
    assert Report.from_dict(report.to_dict()) == report
    data = {**report.to_dict(), "planned_between": ["4 MiB", 0]}
    with pytest.raises(outcore.OutcoreError, match="planned_between must be two byte counts"):
        Report.from_dict(data)
    older = {k: v for k, v in report.to_dict().items() if k != "planned_between"}
    assert "between" not in str(Report.from_dict(older))


def test_the_report_says_what_the_plan_leaves_to_arrays_that_never_move():
    """The planned peak is the plan's alone, the measured one counts the pinned arrays
    too; the report said only the pinned bytes alive at its end (7.04 MiB under FSDP2)
    beside a plan that had left them 10.54 MiB. It says both now; a malformed figure
    is refused on loading, not when printed."""
    report = Report(budget=20 * 2**20, policy="auto", swap="disk", functions=5,
                    in_core_peak=40 * 2**20, planned_peak=9 * 2**20, planned_in=1, planned_out=1,
                    pinned_bytes=7 * 2**20, planned_budget=9 * 2**20)
    assert ("  pinned in fast memory (small, not resizable, or kept by a collective or FSDP): "
            "7.00 MiB now; the plan leaves them up to 11.00 MiB of the budget (their most alive "
            "at once), and plans the rest: the measured peak counts both, the planned one only "
            "the plan's") in _unwrapped(report)
    assert Report.from_dict(report.to_dict()) == report
    with pytest.raises(outcore.OutcoreError, match="planned_budget must be a byte count"):
        Report.from_dict({**report.to_dict(), "planned_budget": "9 MiB"})


def test_a_plan_counts_the_state_it_moves_between_iterations():
    """Schedule.boundary: the persistent state the step ends with in fast memory and
    starts without is written between iterations, the reverse read."""
    from outcore.plan.schedule import Schedule
    schedule = Schedule(policy="x", budget=1, begin=(), end=(), resident_at_start=(0, 2),
                        resident_at_end=(1, 2, 3), bytes_in=0, bytes_out=0, peak_bytes=0,
                        resident_curve=())

    class A:
        def __init__(self, id, nbytes, kind="persistent", existed_before=True):
            self.id, self.nbytes, self.kind, self.existed_before = id, nbytes, kind, existed_before

    class T:
        arrays = [A(0, 10), A(1, 100), A(2, 1000), A(3, 5, existed_before=False)]
    assert schedule.boundary(T()) == (10, 100)


def test_a_long_run_keeps_the_first_and_last_iterations_and_sums_the_rest(tmp_path, monkeypatch):
    """A run of a million iterations kept every IterationStats (about 600 B each: 600 MB
    outside the budget) and printed a million lines. The log keeps the first and the
    last ones (here 3 and 5 of 20) and sums those between, a deviation among them too."""
    from outcore.run import report as report_module
    monkeypatch.setattr(report_module, "KEEP_FIRST", 3)
    monkeypatch.setattr(report_module, "KEEP_LAST", 5)
    monkeypatch.setattr(report_module, "PRINT_FIRST", 2)
    monkeypatch.setattr(report_module, "PRINT_LAST", 2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU())
                                  for _ in range(6)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    seen = []
    with outcore.OutOfCore(budget="2MiB", swap_dir=str(tmp_path)) as ooc:
        for i in range(20):
            x = torch.randn(96 if i == 9 else 64, 256)      # iteration 10 deviates
            with ooc.iteration():
                model(x).sum().backward()
                opt.step()
                opt.zero_grad()
            seen.append(ooc.report().iterations[-1])
        report = ooc.report()
    assert [it.index for it in seen] == list(range(1, 21))
    assert [it.index for it in report.iterations] == [1, 2, 3, 16, 17, 18, 19, 20]
    assert report.iterations == (*seen[:3], *seen[15:])
    middle = seen[3:15]
    assert any(it.deviation for it in middle), "iteration 10 was to deviate"
    e = report.elided
    assert (e.count, e.first_index, e.last_index) == (12, 4, 15)
    for name in ("bytes_read", "bytes_written", "unplanned_bytes", "page_faults", "trims",
                 "trimmed_bytes", "bytes_recomputed", "skipped_actions"):
        assert getattr(e, name) == sum(getattr(it, name) for it in middle), name
    for name in ("seconds", "plan_s", "wait_s", "transfer_s", "restore_s"):
        assert getattr(e, name) == pytest.approx(sum(getattr(it, name) for it in middle)), name
    assert e.transfer_s > 0, "the middle iterations moved bytes"

    assert e.plan_s > 0, "the recording after iteration 10's deviation was planned"
    assert e.peak_resident == max(it.peak_resident for it in middle)
    assert e.rss_above_start == max(it.rss_above_start for it in middle)
    assert e.deviations == sum(bool(it.deviation) for it in middle)
    assert report.deviations == sum(bool(it.deviation) for it in seen)
    assert report.recordings == sum(it.mode == "record" for it in seen)
    assert report.iteration_count == 20
    # Printed: 2 rows, one line for iterations 3-18 (listed and elided), 2 rows.
    text = str(report)
    rows = [line for line in text.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [int(r.split()[0]) for r in rows] == [1, 2, 19, 20]
    assert "     3-18: 16 iterations" in text and f"{e.deviations + 0} deviated" in text
    # The printed line sums its listed rows a column at a time (helper-189: one summary
    # per row made each print of a long run's report 7.8 ms): as one by one, exactly.
    one_by_one = Elided()
    for it in seen:
        one_by_one = one_by_one.add(it, report.budget)
    assert Elided.over(seen, report.budget) == one_by_one and one_by_one.count == 20
    # Saved and loaded, the summary stays.
    path = tmp_path / "run.json"
    report.save(path)
    again = Report.load(path)
    assert again.elided == e and again.iterations == report.iterations
    assert again.deviations == report.deviations
    # With few listed rows (saved with other constants, or hand-edited) the summed ones
    # still have their line, between the rows before and after them (helper-99).
    few = Report.from_dict({**report.to_dict(), "iterations": [
        dict(vars(it)) for it in (report.iterations[0], report.iterations[-1])]})
    text = str(few)
    assert "     4-15: 12 iterations" in text, text
    assert text.index("     4-15:") > text.index("\n     1  ") and \
        text.index("\n    20  ") > text.index("     4-15:"), text
    # Every iteration listed, none summed: the line between says where they are, and
    # `elided` is an empty sum, not None (helper-138: it said 4 were listed, of 20).
    full = Report.from_dict({**report.to_dict(), "elided": None,
                             "iterations": [dict(vars(it)) for it in seen]})
    assert full.elided == Elided() and full.iteration_count == 20
    text = str(full)
    assert "     3-18: 16 iterations" in text, text
    assert "not printed: listed in ooc.report().iterations" in text, text
    assert "summed in" not in text, text
    # A report of the version before `elided` still loads.
    old = {**report.to_dict(), "version": 1}
    del old["elided"]
    assert Report.from_dict(old).elided == Elided()


def test_the_views_simulate_with_the_steps_host_time(tmp_path):
    """`ooc.plot()` and `ooc.timeline()` simulate on cpu-disk with the recorded host time
    counted (the Python between ops, which the replay runs too): without it a small
    model's predicted step was a third of the measured one beside it (helper-170). A
    machine passed is used as it is."""
    from outcore.simulate import simulate
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(6)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with outcore.OutOfCore(budget="1MiB", swap_dir=str(tmp_path)) as ooc:
        for _ in range(4):
            with ooc.iteration():
                model(torch.randn(16, 128)).sum().backward()
                opt.step()
                opt.zero_grad()
        trace, schedule = ooc._last_replay.trace, ooc._last_replay.schedule
        shown = ooc._shown_on(None)
        assert shown.host_time and ooc._shown_on("v100-16gb") == "v100-16gb"
        host = sum(f.host_s for f in trace.functions)
        bare = simulate(trace, schedule, "cpu-disk").step_time_s
        assert host > 0 and simulate(trace, schedule, shown).step_time_s >= bare + 0.9 * host
        ooc.timeline(tmp_path / "step.json")
