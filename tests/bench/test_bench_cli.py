"""`outcore bench curve|batch`: every run in a fresh process, results as markdown, JSON
and PNG, clear errors for bad arguments. Figures are timings: only their presence and
consistency are checked here, never their speed."""
import json

import pytest
import torch

from outcore.cli.main import main


@pytest.fixture(autouse=True)
def small_disk_measurement(monkeypatch):
    """`bench curve|batch` measures the swap disk with 1 GiB each way (3 s here) before
    it checks --policies and --baselines. The figures only feed the predictions, whose
    presence is checked, never their value: 16 MiB through the same path will do."""
    from outcore.bench.disk import measure_disk
    from outcore.cli import bench_cmd
    monkeypatch.setattr(bench_cmd, "measure_disk",
                        lambda size, directory=None: measure_disk(min(size, 16 * 2**20), directory))
    # So does the executor's cost per op (`bench overhead`, 15 steps): 3 will do.
    from outcore.bench import overhead
    real = overhead.measure_overhead
    monkeypatch.setattr(overhead, "measure_overhead",
                        lambda steps=15, directory=None: real(steps=3, directory=directory))


def test_curve_runs_every_variant_and_writes_its_results(tmp_path, capsys):
    out = tmp_path / "results"
    rc = main(["bench", "curve", "--model", "resnet18", "--batch", "2", "--image-size", "32",
               "--fractions", "0.5", "--policies", "adaptive", "--steps", "1",
               "--baselines", "in-core,offload-hooks,in-core-heap", "--out", str(out), "--dir", str(tmp_path)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    result = json.loads((out / "curve_resnet18_b2.json").read_text())
    rows = result["rows"]
    variants = [(r["variant"], r["policy"]) for r in rows]
    assert variants[:4] == [("in-core", "-"), ("offload-hooks", "-"),
                            ("in-core (glibc heap, no trim)", "-"),
                            ("in-core (the predictions' compute)", "- (THP)")]
    heap = rows[2]                      # plain PyTorch with glibc's heap kept: not the reference
    assert result["runs"][2]["config"]["env"]["MALLOC_MMAP_MAX_"] == "0"
    assert heap["vs_in_core"] == rows[0]["step_s"] / heap["step_s"] and heap["page_faults"] >= 0
    # NOTE [The predictions' compute]: plain PyTorch with huge pages as outcore runs its ops
    # gives the predictions their compute; the comparison stays with plain PyTorch.
    calibration = rows[3]
    assert result["runs"][3]["config"]["env"] == {"THP_MEM_ALLOC_ENABLE": "1"}
    assert result["compute"]["2"] == rows[0]["step_s"]
    for run in result["runs"][4:]:              # outcore's: predictions scaled to it
        assert run["config"]["compute_s"] == calibration["step_s"]
        per_function = run["config"]["per_function_s"]
        assert per_function >= 0 and run["result"]["predicted_executor_s"] == pytest.approx(
            per_function * run["result"]["functions"])
    outcore_rows = [r for r in rows if r["variant"] == "outcore"]
    # Budgets: half the in-core peak, and just above the smallest feasible one.
    assert [r["budget"] for r in outcore_rows] == result["budgets"] and len(result["budgets"]) == 2
    assert all(r["budget"] < result["in_core_peak"] for r in outcore_rows)
    for r in rows:
        assert r["step_s"] > 0 and r["peak_rss"] > 0 and r["limit_s"] > 0
    assert rows[0]["vs_in_core"] == 1.0 and rows[0]["read"] == 0
    assert rows[1]["written"] > 0                       # the hooks really went to disk
    for r in outcore_rows:
        assert r["read"] > 0 and r["written"] > 0 and r["predicted_s"] > 0
        # The step's own limit on the calibrated machine: at least its compute.
        assert r["cut_limit_s"] >= calibration["step_s"] * (1 - 1e-9)
        # The bound counts bytes read back plus held bytes written (plan/lower_bound.py).
        assert 0 < r["lower_bound"] <= r["planned_in"] + r["planned_out"]
    md = (out / "curve_resnet18_b2.md").read_text()
    assert "| outcore | adaptive |" in md and "outcore bench curve" in md
    assert "| step / cut limit |" in md
    assert (out / "curve_resnet18_b2.png").read_bytes()[:4] == b"\x89PNG"
    assert "[5/6]" in printed.err or "5/6" in printed.err              # the progress bar
    assert [p.name for p in tmp_path.iterdir()] == ["results"]        # no swap left behind


def test_repeats_run_round_robin_and_report_the_median_run(monkeypatch):
    from outcore.bench import experiments
    calls = []
    times = {"a": [3.0, 1.0, 2.0], "b": [5.0, 4.0, 6.0]}

    def fake_run(cfg, progress):
        calls.append(cfg["name"])
        return {"step_s": times[cfg["name"]][sum(1 for c in calls if c == cfg["name"]) - 1],
                "round": len(calls)}
    monkeypatch.setattr(experiments, "run_config", fake_run)
    seen_before, seen_after = [], []

    def before(cfg):                 # b is given what a measured in the same round
        seen_before.append(cfg["name"])
        if cfg["name"] == "b":
            cfg["a_s"] = seen_after[-1][1]
    configs = [{"name": "a"}, {"name": "b"}]
    runs = experiments._run_all(configs, 3, before=before,
                                after=lambda cfg, r: seen_after.append((cfg["name"], r["step_s"])))
    assert calls == ["a", "b", "a", "b", "a", "b"]                     # round-robin
    assert seen_before == ["a", "b"] * 3                                # every round
    assert seen_after == [("a", 3.0), ("b", 5.0), ("a", 1.0), ("b", 4.0), ("a", 2.0), ("b", 6.0)]
    assert [r["result"]["step_s"] for r in runs] == [2.0, 5.0]            # the median run
    assert runs[0]["result"]["round"] == 5 and runs[0]["result"]["step_s_repeats"] == [3.0, 1.0, 2.0]
    assert runs[1]["config"] == {"name": "b", "a_s": 3.0}    # the median run's, of round one
    assert configs == [{"name": "a"}, {"name": "b"}]          # each run got a copy

    from outcore.bench import output
    result = {"experiment": "curve", "model": "m", "batch": 2, "shape": {}, "in_core_peak": 1, "min_budget": 1,
              "budgets": [], "compute": {"2": 2.0},
              "machine": {"cpus": 2, "torch": "x", "torch_threads": 2, "date": "d",
                          "disk": {"read_GBps": 1.0, "write_GBps": 1.0, "both_total_GBps": 1.0}},
              "runs": [{"config": {"variant": "in-core", "batch": 2},
                        "result": dict(runs[0]["result"], peak_rss=1, page_faults=1500)}]}
    row = output.rows(result)[0]
    assert row["step_range"] == (1.0, 3.0)
    assert "| 2.00 (1.00-3.00) |" in output.markdown(result) and "| 2k |" in output.markdown(result)


def test_each_round_predicts_with_its_own_calibration_or_none(monkeypatch):
    """A curve's outcore runs are given their own round's calibration run (in-core with
    huge pages) and the executor's cost per op; where that round's calibration failed,
    plain PyTorch's step of the same round without that cost, never another round's
    figure (helper-149)."""
    from outcore.bench import experiments
    steps = {"in-core": iter([2.0, 2.2, 2.4]), "calibration": iter([1.0, None, 1.4])}
    given = []

    def fake_run(cfg, progress):
        if cfg["variant"] == "outcore":
            given.append((cfg.get("compute_s"), cfg.get("per_function_s")))
            return {"step_s": 3.0}
        step = next(steps["calibration" if cfg.get("role") else "in-core"])
        return {"step_s": step} if step is not None else {"error": "failed"}
    monkeypatch.setattr(experiments, "run_config", fake_run)
    monkeypatch.setattr(experiments, "memory_on_meta",
                        lambda *a, **k: {"peak": 100 * 2**20, "min_budget": 10 * 2**20})
    experiments.curve("mlp-tiny", 2, fractions=(0.5,), policies=("adaptive",),
                      baselines=("in-core",), repeat=3, disk={}, per_function_s=1e-5)
    # two budgets (half the peak and the floor) a round
    assert given == [(1.0, 1e-5)] * 2 + [(2.2, 0.0)] * 2 + [(1.4, 1e-5)] * 2


def test_a_failing_run_is_reported_not_hidden(tmp_path, capsys, monkeypatch):
    from outcore.bench import experiments
    # A budget below the smallest feasible one: outcore must refuse, and the table say so.
    real = experiments.memory_on_meta

    def shrunk(*a, **k):
        mem = real(*a, **k)
        return {**mem, "min_budget": mem["min_budget"] // 4}
    monkeypatch.setattr(experiments, "memory_on_meta", shrunk)
    # 1% of the peak is below even the shrunk floor: the floor is the only outcore run,
    # and it fails (a feasible budget beside it would only train, unlooked at).
    rc = main(["bench", "curve", "--model", "resnet18", "--batch", "2", "--image-size", "32",
               "--fractions", "0.01", "--policies", "adaptive", "--steps", "1", "--baselines", "in-core",
               "--out", str(tmp_path)])
    assert rc == 1
    result = json.loads((tmp_path / "curve_resnet18_b2.json").read_text())
    assert len(result["budgets"]) == 1 and "error" in result["runs"][-1]["result"]
    md = (tmp_path / "curve_resnet18_b2.md").read_text()
    assert "failed:" in md and "budget" in md


@pytest.mark.parametrize("argv, message", [
    (["--model", "nope"], "unknown model"),
    (["--model", "resnet18", "--seq-len", "8"], "resnet18 takes no seq_len (it takes "
     "image_size)"),
    (["--model", "gpt2-tiny", "--image-size", "8"], "gpt2-tiny takes no image_size (it "
     "takes seq_len)"),
    (["--model", "mlp-tiny", "--image-size", "8"], "it takes neither image_size nor"),
    (["--model", "resnet18", "--policies", "fastest"], "unknown fastest"),
    (["--model", "resnet18", "--baselines", "magic"], "unknown magic"),
    (["--model", "resnet18", "--steps", "0"], "at least 1"),
    (["--model", "resnet18", "--repeat", "0"], "at least 1"),
    (["--model", "resnet18", "--baselines", "streamed-offload"],
     "streamed-offload cannot run with --device cpu"),
] + ([] if torch.cuda.is_available() else [
    (["--model", "resnet18", "--device", "cuda"], "--device cuda needs a CUDA device"),
]))
def test_bad_arguments_get_a_clear_error(argv, message, capsys):
    assert main(["bench", "curve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_small_budgets_are_told_apart_in_the_tables():
    """Budgets a fraction of a MiB apart printed the same whole MiB (1.94 and 1.62: "2")."""
    from outcore.bench.output import _mib
    assert (_mib(int(1.94 * 2**20)), _mib(int(1.62 * 2**20))) == ("1.94", "1.62")
    assert _mib(512 * 2**20) == "512" and _mib(None) == "-"


def test_unsteady_runs_are_named_below_the_table():
    """NOTE [Unsteady runs]: a run whose timed steps or repeats differ by more than 1.5x,
    and a round whose plain and calibration runs (the same step) do, are named below the
    table with both figures; steady runs add nothing (helper-195: a disturbed baseline
    made outcore look 16.8x faster, silently)."""
    from outcore.bench import output

    def run(variant, steps, repeats, role=None, **cfg):
        cfg = {"variant": variant, "batch": 2, "model": "m", **cfg, **({"role": role} if role else {})}
        return {"config": cfg, "result": {"step_s": sorted(repeats)[(len(repeats) - 1) // 2],
                                          "steps_s": steps, "step_s_repeats": repeats,
                                          "peak_rss": 1}}
    machine = {"cpus": 2, "torch": "x", "torch_threads": 2, "date": "d",
               "disk": {"read_GBps": 1.0, "write_GBps": 1.0, "both_total_GBps": 1.0}}

    def result(*runs):
        return {"experiment": "curve", "model": "m", "batch": 2, "shape": {}, "in_core_peak": 1,
                "min_budget": 1, "budgets": [], "compute": {"2": 1.0}, "machine": machine,
                "runs": list(runs)}
    steady = result(run("in-core", [1.0, 1.1], [1.0, 1.2]),
                    run("in-core", [0.9, 0.9], [0.9, 1.0], role="the predictions' compute"),
                    run("outcore", [2.0, 2.5], [2.2, 2.4], policy="auto", budget=2**20))
    assert output.unsteady(steady) == [] and "Unsteady" not in output.markdown(steady)
    shaky = result(run("in-core", [1.26, 1.25], [1.26, 0.2]),
                   run("in-core", [0.012, 0.013], [0.012, 0.013], role="the predictions' compute"),
                   run("outcore", [1.0, 2.0, 1.1], [1.1, 1.2], policy="auto", budget=2**20))
    lines = output.unsteady(shaky)
    assert lines == [
        "in-core: its repeats took 0.200 to 1.260 s (6.3x)",
        "outcore auto at 1.00 MiB: its timed steps took 1.000 to 2.000 s (2.0x)",
        "batch 2: plain PyTorch took 1.260 s a step and the predictions' compute run (the "
        "same step with huge pages) 0.012 s in round 1",
        "batch 2: plain PyTorch took 0.200 s a step and the predictions' compute run (the "
        "same step with huge pages) 0.013 s in round 2"], lines
    md = output.markdown(shaky)
    assert "**Unsteady runs**" in md and md.rstrip().endswith("0.013 s in round 2")


@pytest.mark.parametrize("what", ["curve", "batch"])
def test_runs_larger_than_ram_are_refused_before_any(what, tmp_path, capsys, monkeypatch):
    """helper-204: `bench curve --model gpt2` at its default batch holds 214 GiB in-core;
    on a machine of 24 GiB its first run would be killed, or swap the machine to a halt,
    after the executor's and the disk's minutes. Refused first, and nothing measured."""
    from outcore.bench import overhead
    from outcore.cli import bench_cmd
    from outcore.run.movers import host
    monkeypatch.setattr(host, "memory_limit", lambda: 2**20)

    def measured(*args, **kwargs):
        raise AssertionError("measured before the check")
    monkeypatch.setattr(overhead, "measure_overhead", measured)
    monkeypatch.setattr(bench_cmd, "measure_disk", measured)      # a minute, unasked
    argv = (["--fractions", "0.5", "--policies", "auto", "--baselines", "in-core"]
            if what == "curve" else ["--factors", "2"])
    rc = main(["bench", what, "--model", "mlp-tiny", "--batch", "8", *argv,
               "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "of mlp-tiny at batch 8 holds" in err, err
    assert "more than the 1.00 MiB of RAM this process may use: pass a smaller --batch" in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_bench_batch_refuses_in_core_runs_at_its_batches_larger_than_ram(tmp_path, capsys,
                                                                         monkeypatch):
    """helper-205: the base batch fitted, and the in-core runs at the outcore batches
    (their compute time, `--factors` times the base) were started however large."""
    from outcore.bench.experiments import memory_on_meta
    from outcore.run.movers import host
    base = memory_on_meta("resnet18-tiny", 8, "in-core", image_size=32)["peak"]
    assert memory_on_meta("resnet18-tiny", 64, "in-core", image_size=32)["peak"] > 1.5 * base
    monkeypatch.setattr(host, "memory_limit", lambda: int(1.5 * base))
    rc = main(["bench", "batch", "--model", "resnet18-tiny", "--image-size", "32", "--batch",
               "8", "--factors", "8", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "the in-core run with unbounded memory" in err, err
    assert "pass smaller --factors) of resnet18-tiny at batch 64" in err, err
