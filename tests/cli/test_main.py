"""`outcore` on a user's mistakes: one line on stderr, a nonzero exit, no traceback."""
from __future__ import annotations

import json
import re

import pytest

import outcore
from outcore.cli import plan_cmd
from outcore.cli.main import main


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "mlp.json"
    assert main(["trace", "--model", "mlp", "--batch", "2", "-o", str(path)]) == 0
    return path


@pytest.mark.parametrize("argv, said", [
    (["plan", "{trace}", "--budget", "20MiB", "-o", "{tmp}/nodir/s.json"], "directory .* does not exist"),
    (["report", "{tmp}/nope.json"], "No such file or directory: .*nope.json"),
    (["report", "{tmp}"], "Is a directory"),
    (["plan", "{trace}", "--budget=-1MiB"], "cannot be negative"),
    (["simulate", "{trace}", "--sweep", "1"], "at least 2 and at most 100, got 1"),
    (["simulate", "{trace}", "--sweep", "100000000"], "at most 100, got 100000000"),
    (["simulate", "{trace}", "--sweep", "3", "--budget", "20MiB"], "--sweep or --budget"),
    (["simulate", "{trace}", "--budget", "20MiB", "--policy", ""], "names no policy"),
    (["plan", "{binary}", "--budget", "20MiB"], "is not a trace: not text"),
    (["report", "{binary}"], "is not JSON"),
    (["plan", "{deep}", "--budget", "20MiB"], "nests too deeply"),
    (["plan", "{freed}", "--budget", "20MiB"], r"arrays\[3\].freed_after: 1000000000 is not between"),
    (["plan", "{flops}", "--budget", "20MiB"], r"functions\[2\].flops: expected a count >= 0, found -5"),
    (["bench", "curve", "--model", "mlp-tiny", "--fractions", "1,abc"], "'abc' is not a budget"),
    (["bench", "batch", "--model", "mlp-tiny", "--factors", "0"], "'0' must be more than 0"),
    (["bench", "curve", "--model", "mlp-tiny", "--out", "{trace}"], "is a file; the results go"),
    (["plan", "{trace}", "--budget", "20MiB", "-o", "{tmp}"],
     "-o .* is a directory; pass a file path"),
    (["plan", "{trace}", "--cluster", "-o", "{tmp}/s.json"], "-o writes one device's schedule"),
    (["plan", "{trace}", "--budget", "20MiB", "-o", "{trace}/s.json"], "mlp.json is a file, not a"),
    (["simulate", "{empty}", "--budget", "1MiB"], "recorded no op .* nothing to simulate"),
    (["plan", "{trace}", "--budget", "20MiB", "--machine", "nope"], "unknown machine 'nope'"),
    (["plan", "{trace}", "--budget", "20MiB", "--machine", "v100-16gb", "--policy", "adaptive"],
     "policy adaptive plans the same on any"),
    (["demo", "--out", "{trace}/demo"], "--out .*: Not a directory"),
    (["bench", "disk", "--size", "1PiB", "--dir", "{tmp}"], "cannot reserve twice --size .* "
     "pass a smaller --size, or --dir"),
    (["report", "{modeless}"], "IterationStats has no 'mode', 'seconds', "),
    (["trace", "--model", "mlp-tiny", "--image-size", "64", "--device", "meta"],
     "mlp-tiny takes no image_size .*drop image_size=64 \\(--image-size"),
    (["trace", "--model", "resnet18-tiny", "--seq-len", "8", "--device", "meta"],
     "resnet18-tiny takes no seq_len \\(it takes image_size\\)"),
])
def test_a_bad_path_or_value_is_one_line_and_exit_2(trace_file, tmp_path, capsys, argv, said):
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00junk")
    (tmp_path / "deep.json").write_text("[" * 100_000)
    damaged = json.loads(trace_file.read_text())
    damaged["arrays"][3]["freed_after"] = 10**9
    (tmp_path / "freed.json").write_text(json.dumps(damaged))
    negative = json.loads(trace_file.read_text())
    negative["functions"][2]["flops"] = -5
    (tmp_path / "flops.json").write_text(json.dumps(negative))
    with outcore.record() as rec:
        pass
    rec.trace.save(tmp_path / "empty.json")
    from outcore.run.report import FORMAT, VERSION
    (tmp_path / "modeless.json").write_text(json.dumps(
        {"format": FORMAT, "version": VERSION, "iterations": [{"index": 0}]}))
    files = {name: tmp_path / f"{name}.json"
             for name in ("binary", "deep", "freed", "empty", "modeless", "flops")}
    argv = [a.format(trace=trace_file, tmp=tmp_path, **files) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("outcore: error: ") and "Traceback" not in err
    assert __import__("re").search(said, err), err


def test_a_report_with_a_wrong_field_type_is_refused(tmp_path, capsys):
    from outcore.run.report import FORMAT, VERSION
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"format": FORMAT, "version": VERSION, "iterations": [1]}))
    assert main(["report", str(path)]) == 2
    assert "malformed outcore report" in capsys.readouterr().err


@pytest.mark.parametrize("where, key, value, said", [
    ("report", "in_core_peak", -1, "Report.in_core_peak must be a byte count"),
    ("report", "pinned_bytes", 1.5, "Report.pinned_bytes must be a byte count"),
    ("report", "policy", 5, "Report.policy must be a string"),
    ("iteration", "wait_s", -0.5, "IterationStats.wait_s must be a number >= 0"),
    ("iteration", "wait_s", float("inf"), "IterationStats.wait_s must be a number >= 0"),
    ("iteration", "completed", "yes", "IterationStats.completed must be a bool"),
    ("iteration", "deviation", 3, "IterationStats.deviation must be a string"),
    ("elided", "count", -2, "Elided.count must be a byte count"),
    ("elided", "wait_s", "1", "Elided.wait_s must be a number >= 0"),
])
def test_a_hand_edited_report_with_an_impossible_value_is_refused(tmp_path, capsys, where, key,
                                                                  value, said):
    # They loaded and printed as given: a negative peak, a policy named 5 (helper-73).
    from outcore.run.report import FORMAT, VERSION, Elided, IterationStats, Report
    from dataclasses import fields
    it = {f.name: "" if f.type.startswith("str") else True if f.type == "bool" else 1
          for f in fields(IterationStats)}
    report = {f.name: "x" if f.type == "str" else 1 for f in fields(Report)}
    report.update(format=FORMAT, version=VERSION, iterations=[it], planned_between=[0, 0],
                  elided={f.name: 1 for f in fields(Elided)})
    path = tmp_path / "run.json"
    path.write_text(json.dumps(report))
    assert main(["report", str(path)]) == 0              # the valid one prints
    capsys.readouterr()
    {"report": report, "iteration": it, "elided": report["elided"]}[where][key] = value
    path.write_text(json.dumps(report))
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert "malformed outcore report" in err and said in err, err


def test_a_report_with_no_budget_and_sizes_below_one_are_refused(tmp_path, capsys):
    from outcore.run.report import FORMAT, VERSION
    path = tmp_path / "run.json"
    from dataclasses import fields
    from outcore.run.report import Report
    fields = {f.name: "" if f.type == "str" else 0 for f in fields(Report)
              if f.name not in ("planned_between", "elided")}
    path.write_text(json.dumps({**fields, "format": FORMAT, "version": VERSION,
                                "iterations": [], "budget": 0}))
    assert main(["report", str(path)]) == 2
    assert "budget must be a positive byte count" in capsys.readouterr().err
    with pytest.raises(SystemExit):               # argparse: exit 2, one line
        main(["trace", "--model", "resnet18-tiny", "--image-size", "0"])
    assert "argument --image-size: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["trace", "--model", "mlp", "--warmup", "-1"])
    assert "argument --warmup: must be 0 or more, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):                # it listed from the end, as a slice
        main(["plan", str(path), "--budget", "1MiB", "--lines", "-3"])
    assert "argument --lines: must be 0 or more, got -3" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(trace_file, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(plan_cmd, "run", interrupted)    # main() builds its parser anew
    assert main(["plan", str(trace_file), "--budget", "20MiB"]) == 130
    assert capsys.readouterr().err == "outcore: interrupted\n"


def test_bench_dir_that_does_not_exist_names_the_flag(tmp_path, capsys):
    assert main(["bench", "disk", "--dir", str(tmp_path / "missing")]) == 2
    assert "--dir " in capsys.readouterr().err


def test_the_report_shows_no_overlap_for_an_iteration_that_moved_nothing():
    from outcore.run.report import IterationStats, Report
    still = IterationStats(index=1, mode="replay", seconds=1.0, bytes_read=0, bytes_written=0,
                           unplanned_bytes=0, wait_s=0.0, transfer_s=0.0, restore_s=0.0,
                           peak_resident=10)
    assert still.overlap == 1.0                       # the property: nothing to hide
    report = Report(budget=100, policy="auto", swap="x", functions=1, in_core_peak=200,
                    planned_peak=100, planned_in=0, planned_out=0, pinned_bytes=0,
                    iterations=(still,))
    row = [line for line in str(report).splitlines() if line.strip().startswith("1  replay")]
    assert row and "100.0%" not in row[0] and " - " in row[0], str(report)


def test_plan_picks_on_the_machine_given(trace_file, capsys):
    """`plan --machine M` (no --cluster) is the machine auto picks its plan on; it was
    ignored, and cpu-disk used whatever was given."""
    assert main(["plan", str(trace_file), "--budget", "20MiB", "--lines", "0",
                 "--machine", "v100-16gb"]) == 0
    out = capsys.readouterr().out
    assert "machine=v100-16gb" in out and "simulated iteration on v100-16gb" in out


def test_a_ctrl_c_in_bench_disk_stops_its_threads_before_the_file_closes(tmp_path, monkeypatch):
    """The Ctrl-C lands while the main thread waits for the measuring threads: they stop
    before the swap file is closed (they went on with a closed descriptor, and printed
    "Bad file descriptor" tracebacks)."""
    import threading
    from outcore.bench.disk import measure_disk
    failures, joins = [], []
    monkeypatch.setattr(threading, "excepthook", failures.append)
    real_join = threading.Thread.join

    def join(self, timeout=None):
        joins.append(self)
        if len(joins) == 1:
            raise KeyboardInterrupt
        return real_join(self, timeout)
    monkeypatch.setattr(threading.Thread, "join", join)
    with pytest.raises(KeyboardInterrupt):
        measure_disk(64 << 20, str(tmp_path))
    monkeypatch.undo()
    assert not any(t.is_alive() for t in joins) and failures == []
    assert list(tmp_path.iterdir()) == []


def test_a_ctrl_c_while_the_command_starts_is_one_line_and_exit_130(monkeypatch, capsys):
    """SIGINT while `outcore` imports torch (its first seconds) came out as a long
    traceback of the import: the entry point (src/outcore_main.py) catches it too. Here
    the import of the command's module is what the Ctrl-C interrupts."""
    import importlib.abc
    import sys
    import outcore_main

    class Interrupted(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "outcore.cli.main":
                raise KeyboardInterrupt
            return None
    monkeypatch.delitem(sys.modules, "outcore.cli.main")
    monkeypatch.setattr(sys, "meta_path", [Interrupted(), *sys.meta_path])
    assert outcore_main.main() == 130
    assert capsys.readouterr().err == "outcore: interrupted\n"


@pytest.mark.parametrize("how", ["python -m outcore", "import outcore"])
def test_a_ctrl_c_while_python_m_outcore_imports_the_package_is_one_line(tmp_path, how):
    """`python -m outcore` imports the package (and torch) before its `__main__` runs the
    entry point above: a Ctrl-C there came out as the import's traceback (helper-225).
    The package's import says "outcore: interrupted" and exits 130 where it is that
    command's; a program that imports outcore itself gets its KeyboardInterrupt."""
    import os
    import subprocess
    import sys
    import textwrap
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import importlib.abc, sys
        class Interrupted(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "outcore.plan":          # a Ctrl-C in the package's import
                    raise KeyboardInterrupt
        sys.meta_path.insert(0, Interrupted())
        """))
    src = os.path.dirname(os.path.dirname(os.path.abspath(__import__("outcore").__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), src])}
    args = (["-m", "outcore", "--version"] if how == "python -m outcore"
            else ["-c", "import outcore"])
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=120)
    if how == "python -m outcore":
        assert (done.returncode, done.stderr) == (130, "outcore: interrupted\n"), done.stderr
    else:
        assert done.returncode != 0 and "KeyboardInterrupt" in done.stderr, done.stderr


def test_the_policies_table_adds_up(trace_file, capsys):
    """Each row of `simulate --policy a,b`: step = in-core + recompute + stall + the
    mover's CPU (the last had no column, so on cpu-disk the row did not add up)."""
    from outcore import Trace
    peak = Trace.load(trace_file).peak()[0]
    assert main(["simulate", str(trace_file), "--budget", f"{peak // 3}B",
                 "--policy", "adaptive,fixed"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if " adaptive " in line or " fixed " in line]
    assert len(rows) == 2
    for row in rows:
        step, in_core, _speed, recompute, stall, cpu, between = row[-7:]
        assert abs(float(step) - float(in_core) - float(recompute) - float(stall)
                   - float(cpu)) < 0.3, row
        assert float(between) >= 0, row


def test_the_policies_table_shows_what_auto_ranks_by(trace_file, capsys):
    """helper-73: auto keeps the plan whose step plus the state moved between iterations
    simulates fastest, but the table showed the step alone, so auto could look slower
    than a policy it had beaten. The table shows both; auto's sum is the least."""
    from outcore import Trace
    peak = Trace.load(trace_file).peak()[0]
    assert main(["simulate", str(trace_file), "--budget", f"{peak // 3}B",
                 "--policy", "auto,adaptive,fixed"]) == 0
    out = capsys.readouterr().out
    assert "between ms" in out and "auto ranks plans by step + between" in out
    rows = {p: line.split() for line in out.splitlines()
            for p in ("auto", "adaptive", "fixed") if f" {p} " in line}
    total = {p: float(r[-7]) + float(r[-1]) for p, r in rows.items()}
    assert total["auto"] <= min(total.values()) + 0.2, rows


def test_plan_says_the_budget_outofcore_takes_for_the_step(tmp_path, capsys):
    """`outcore plan` gave the plan's smallest feasible budget, which counts every array
    as movable; OutOfCore keeps those under min_move_bytes in memory, and refused that
    budget. The command now says OutOfCore's too, and OutOfCore trains at it."""
    from outcore.workloads import build

    def step(w):
        w.step()
    w = build("mlp-tiny", batch=64, optimizer="adam")
    step(w)                                    # Adam's state exists: a steady step
    with outcore.record() as rec:
        step(w)
    path = tmp_path / "t.json"
    rec.trace.save(path)
    assert main(["plan", str(path), "--budget", "1KiB"]) == 2
    said = re.search(r"OutOfCore, .* needs at least .* \(([\d,]+) B\) for this step",
                     capsys.readouterr().err)
    assert said, "the error names no budget for OutOfCore"
    least = int(said.group(1).replace(",", ""))
    from outcore.plan import min_feasible_budget
    assert least > min_feasible_budget(rec.trace) and least == outcore.smallest_budget(rec.trace)
    ours = build("mlp-tiny", batch=64, optimizer="adam")
    step(ours)
    with outcore.OutOfCore(budget=least) as ooc:
        for _ in range(3):
            with ooc.iteration():
                step(ours)
        assert any(it.bytes_written for it in ooc.report().iterations)
