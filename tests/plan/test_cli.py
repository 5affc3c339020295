"""`outcore plan` and `outcore simulate` on a hand-built trace file."""
from outcore.cli.main import main

from .helpers import build

PREFETCH = {"w": (2, "param"), "a": 4, "b": 4, "c": 4, "d": 2}
PREFETCH_FNS = ["f0 r:w c:a", "f1 r:a c:b", "f2 r:b c:c", "f3 r:c c:d", "f4 @backward r:d r:w"]


def test_plan_prints_summary_and_writes_json(tmp_path, capsys):
    path = tmp_path / "t.json"
    build(PREFETCH, PREFETCH_FNS).save(path)
    out_path = tmp_path / "s.json"
    assert main(["plan", str(path), "--budget", "8B", "--policy", "adaptive", "-o", str(out_path)]) == 0
    out = capsys.readouterr().out
    assert "moved in            2 B  (1 swap-ins)" in out   # w stays resident at the start
    assert "f3 f3 (forward): before [in a0] after [free a3]" in out
    assert "lower bound          2 B" in out and out_path.exists()


def test_plan_reports_infeasible_budget_as_user_error(tmp_path, capsys):
    path = tmp_path / "t.json"
    build(PREFETCH, PREFETCH_FNS).save(path)
    assert main(["plan", str(path), "--budget", "5B"]) == 2
    err = capsys.readouterr().err
    assert "cannot run function 1 (f1, forward): it needs 8 B" in err
    assert "smallest feasible budget for this trace is 8 B" in err
    # simulate says the same where nothing could run; in a table, the row says it.
    assert main(["simulate", str(path), "--budget", "5B"]) == 2
    err = capsys.readouterr().err
    assert "smallest feasible budget for this trace is 8 B" in err
    assert "OutOfCore, which keeps arrays under min_move_bytes" in err     # as plan says
    assert main(["simulate", str(path), "--budget", "5B,8B"]) == 0
    assert "infeasible: needs 8 B" in capsys.readouterr().out
    assert main(["plan", str(path), "--budget", "0B"]) == 2
    assert "the budget must be positive, got 0 bytes" in capsys.readouterr().err
    # A negative value after its option is the option's value, not an unknown option.
    assert main(["plan", str(path), "--budget", "-5MiB"]) == 2
    assert "cannot be negative, got '-5MiB'" in capsys.readouterr().err


def test_simulate_says_where_a_budget_is_larger_than_the_machine(tmp_path, capsys):
    """A budget past the machine's memory predicts a device that does not exist
    (helper-81): said on stderr, the prediction still printed."""
    path = tmp_path / "t.json"
    build(PREFETCH, PREFETCH_FNS).save(path)
    assert main(["simulate", str(path), "--budget", "64GiB", "--machine", "v100-16gb"]) == 0
    captured = capsys.readouterr()
    assert "the budget 64.00 GiB is more than the 14.90 GiB of memory v100-16gb has" in captured.err
    assert "step" in captured.out
    assert main(["simulate", str(path), "--budget", "8B,64GiB", "--machine", "v100-16gb"]) == 0
    assert "64.00 GiB is more than" in capsys.readouterr().err
    assert main(["simulate", str(path), "--budget", "8B", "--machine", "v100-16gb"]) == 0
    assert "is more than" not in capsys.readouterr().err


def test_simulate_single_and_sweep_table(tmp_path, capsys):
    path = tmp_path / "t.json"
    build(PREFETCH, PREFETCH_FNS, durations=[1.0] * 5).save(path)
    assert main(["simulate", str(path), "--budget", "8B", "--machine", "cpu-disk"]) == 0
    out = capsys.readouterr().out
    assert "% of in-core speed" in out
    step = float(out.split("step time")[1].split("ms")[0])
    limit = float(out.split("physical limit")[1].split("ms")[0])
    assert f"this step takes {step / limit:.2f}x it (no schedule under this budget" in out
    assert main(["simulate", str(path), "--sweep", "3", "--policy", "all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if "adaptive-belady" in line]) == 3
    # budgets 8 (smallest feasible), 9, 10 (in-core peak) x 5 policies; at 10 B nothing moves
    rows = [line.split() for line in lines if line.startswith(str(path)[:34])]
    assert [(r[1], r[3]) for r in rows][::5] == [("8", "auto"), ("9", "auto"), ("10", "auto")]
    assert all(r[4:8] == ["0", "B", "0", "B"] for r in rows if r[1] == "10")


def test_window_options_pick_their_policy(tmp_path, capsys):
    path = tmp_path / "t.json"
    build(PREFETCH, PREFETCH_FNS, durations=[1.0] * 5).save(path)
    assert main(["plan", str(path), "--budget", "8B"]) == 0
    assert "Schedule (auto, chosen=" in capsys.readouterr().out
    assert main(["plan", str(path), "--budget", "8B", "--window", "6"]) == 0
    assert "Schedule (adaptive, keep_state=True, window=6)" in capsys.readouterr().out
    assert main(["plan", str(path), "--budget", "8B", "--k", "2"]) == 0
    assert "Schedule (fixed, k=2" in capsys.readouterr().out
    assert main(["plan", str(path), "--budget", "8B", "--k", "2", "--window", "6"]) == 2
    assert "give --policy too" in capsys.readouterr().err
    assert main(["simulate", str(path), "--budget", "8B", "--window", "6"]) == 0
    assert "Schedule (adaptive, keep_state=True, window=6)" in capsys.readouterr().out
    assert main(["plan", str(path), "--budget", "8B", "--policy", "auto", "--window", "6"]) == 2
    assert "policy 'auto' takes no option(s) window" in capsys.readouterr().err
    assert main(["plan", str(path), "--budget", "8B", "--wait-order", "completion"]) == 0
    assert "Schedule (adaptive, keep_state=True, wait_order=completion" in capsys.readouterr().out
    assert main(["simulate", str(path), "--budget", "8B", "--policy", "all",
                 "--wait-order", "completion"]) == 0     # only adaptive takes it
    for command in ("plan", "simulate"):
        assert main([command, str(path), "--budget", "8B", "--policy", "fixed",
                     "--wait-order", "completion"]) == 2
        assert "policy 'fixed' takes no option(s) wait_order" in capsys.readouterr().err


def test_out_of_core_refuses_options_its_policy_does_not_take_before_anything_runs():
    import pytest

    import outcore
    with pytest.raises(outcore.OutcoreError, match=r"policy='auto'\) takes no plan option\(s\) "
                                                    r"window.*policy='adaptive'"):
        outcore.OutOfCore("1MiB", plan_options={"window": "3MiB"})
    ooc = outcore.OutOfCore("1MiB", policy="adaptive", plan_options={"window": "3MiB"})
    ooc.close()


def test_out_of_core_refuses_bad_plan_option_values_before_anything_runs(tmp_path):
    """helper-70: a plan_options that is no dict of names escaped as a bare TypeError (or,
    a string, was split into letters), and an option value the policy refuses passed
    construction and was refused after two recordings, naming neither the argument nor
    the option. Now each is an OutcoreError from the constructor that names both, and
    nothing is left behind."""
    import pytest

    import outcore
    for bad in ([1], {1: 2}, "window", [("window", 3)]):
        with pytest.raises(outcore.OutcoreError, match="plan options must be a dict of option names"):
            outcore.OutOfCore("1MiB", plan_options=bad, swap_dir=str(tmp_path))
    for policy, options, says in [("adaptive", {"window": "big"}, "cannot read 'big'"),
                                  ("adaptive", {"window": -3}, "cannot be negative"),
                                  ("adaptive", {"outputs": "never"}, "outputs must be one of"),
                                  ("fixed", {"k": 0}, "k must be a positive number"),
                                  ("auto", {"machine": "tpu"}, "unknown machine 'tpu'")]:
        with pytest.raises(outcore.OutcoreError) as err:
            outcore.OutOfCore("1MiB", policy=policy, plan_options=options, swap_dir=str(tmp_path))
        assert f"plan_options={options!r}" in str(err.value) and says in str(err.value), err.value
    assert not list(tmp_path.iterdir())
    outcore.OutOfCore("1MiB", policy="adaptive", plan_options={"window": 0}).close()
    import types                           # any mapping of names will do (helper-72)
    outcore.OutOfCore("1MiB", policy="adaptive",
                      plan_options=types.MappingProxyType({"window": "3MiB"})).close()
