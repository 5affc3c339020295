"""`outcore bench disk` measures through the swap file path and leaves nothing behind."""
import json

from outcore.cli.main import main


def test_bench_disk_json(tmp_path, capsys):
    assert main(["bench", "disk", "--size", "16MiB", "--dir", str(tmp_path), "--json"]) == 0
    fig = json.loads(capsys.readouterr().out)
    assert fig["bytes"] == 16 * 2**20
    assert all(fig[k] > 0 for k in ("write_GBps", "read_GBps", "both_total_GBps"))
    # The mover's threads spend CPU on their syscalls, never more than they are busy.
    assert 0 < fig["transfer_cpu_share"] <= 1.05
    assert list(tmp_path.iterdir()) == []


def test_bench_disk_rejects_tiny_sizes(capsys):
    assert main(["bench", "disk", "--size", "1KiB"]) == 2
    assert "--size must be at least" in capsys.readouterr().err


def test_options_of_curve_and_batch_are_refused_by_disk_comm_and_overhead(capsys):
    # `bench overhead --model bogus` measured its own fixed step and said nothing.
    assert main(["bench", "overhead", "--model", "bogus"]) == 2
    assert "`bench overhead` takes no --model: those are for `bench curve`" in capsys.readouterr().err
    assert main(["bench", "disk", "--batch", "3", "--optimizer", "adam", "--out", "x"]) == 2
    assert "takes no --batch, --optimizer, --out" in capsys.readouterr().err
    assert main(["bench", "comm", "--device", "cuda"]) == 2
    assert "takes no --device" in capsys.readouterr().err


def test_busy_is_for_bench_comm(capsys):
    assert main(["bench", "disk", "--busy"]) == 2
    assert "--busy is for `bench comm`, not `bench disk`" in capsys.readouterr().err


def test_thp_and_no_thp_together_are_refused_before_anything_runs(capsys):
    assert main(["bench", "curve", "--model", "resnet50", "--thp", "--no-thp"]) == 2
    assert "--thp and --no-thp contradict each other" in capsys.readouterr().err
