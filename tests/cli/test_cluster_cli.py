"""`outcore plan --cluster`, `outcore simulate --ranks` and `outcore bench comm`."""
import glob
import json
import os
import tempfile

import pytest

from outcore.cli.main import main

from ..simulate.test_cluster import record_tiny


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cluster") / "tiny.json"
    record_tiny().save(path)
    return str(path)


def test_plan_cluster_prints_the_ranking(trace_path, capsys):
    assert main(["plan", trace_path, "--cluster", "--machine", "a100-40gb", "--interconnect",
                 "pcie4", "--max-devices", "4", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "devices" in out and "fsdp" in out and "pp" in out and "single" in out
    assert "best:" in out
    assert main(["plan", trace_path, "--cluster", "--markdown", "--strategies", "ddp"]) == 0
    out = capsys.readouterr().out
    assert "| devices |" in out and "fsdp" not in out


def test_simulate_ranks_predicts_one_configuration(trace_path, capsys):
    assert main(["simulate", trace_path, "--ranks", "2", "--strategy", "fsdp", "--interconnect",
                 "nvlink-a100", "--machine", "a100-40gb"]) == 0
    out = capsys.readouterr().out
    assert "fsdp on 2 x a100-40gb over nvlink-a100" in out and "per-rank peak" in out
    assert main(["simulate", trace_path, "--ranks", "2", "--budget", "3MiB", "--machine",
                 "a100-40gb"]) == 0
    assert "out-of-core under 3.00 MiB" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["simulate", "{}", "--ranks", "2", "--interconnect", "tin-cans"], "presets: loopback-gloo"),
    (["simulate", "{}", "--ranks", "2", "--strategy", "tp"], "choose from ddp, fsdp, pp"),
    (["simulate", "{}", "--ranks", "0"], "--ranks must be at least 1"),
    (["plan", "{}"], "needs --budget"),
    (["plan", "{}", "--cluster", "--strategies", "ddp,zero"], "choose from ddp, fsdp, pp"),
    # --cluster's options without --cluster were ignored (a typo passed; helper-73)
    (["plan", "{}", "--budget", "3MiB", "--interconnect", "foo"], "--interconnect goes with --cluster"),
    (["plan", "{}", "--budget", "3MiB", "--max-devices", "4", "--markdown"],
     "--max-devices, --markdown go with --cluster"),
    (["simulate", "{}", "--budget", "3MiB", "--batch", "8"], "--batch checks the split"),
    (["plan", "{}", "--budget", "3MiB", "--max-devices", "0"], "--max-devices goes with"),
    (["plan", "{}", "--budget", "3MiB", "--batch", "0"], "--batch goes with --cluster"),
    # a bare small budget asks for its unit on the cluster paths too (helper-82)
    (["simulate", "{}", "--ranks", "2", "--budget", "16"], "write the unit"),
    (["plan", "{}", "--cluster", "--budget", "16"], "write the unit"),
])
def test_bad_cluster_arguments_are_clear_errors(trace_path, capsys, argv, message):
    assert main([a.format(trace_path) for a in argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_comm_quick(capsys):
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "outcore-comm-*")))

    def quick():
        assert main(["bench", "comm", "--quick", "--json"]) == 0
        return json.loads(capsys.readouterr().out)
    fig = quick()
    for _ in range(2):
        if not (any(f["beta_s_per_byte"] == 0 for f in fig["ops"].values())
                or not fig["ops"]["allreduce"]["alpha_s"] > 0):
            break
        # A stall of the machine during one size's three repeats can leave a fit with a
        # term pinned at 0 (β of one op once in CI, 2026-12-05, and again beside the
        # other test worker the same night): measured again, twice at most.
        fig = quick()
    assert fig["ranks"] == 2 and fig["bytes"] == [4096, 262144, 4194304]
    assert set(fig["ops"]) == {"allreduce", "allgather", "reduce_scatter", "p2p"}
    for op, f in fig["ops"].items():
        assert len(f["times_s"]) == 3 and all(t > 0 for t in f["times_s"])
        # Fitted with both terms non-negative; a noisy small-size point may pin α at 0.
        assert f["alpha_s"] >= 0 and f["beta_s_per_byte"] > 0 and f["bandwidth_Bps"] > 0
    assert fig["ops"]["allreduce"]["alpha_s"] > 0
    # gloo's threads copy and reduce on the CPU (Interconnect.cpu_share).
    assert all(f["cpu_share"] > 0 for f in fig["ops"].values()) and fig["busy"] is False
    # Nothing left behind: the temporary directory is gone.
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "outcore-comm-*"))) <= before


def test_bench_comm_beside_compute(capsys):
    # --busy: each rank computes meanwhile, as in a training step; the compute thread's
    # CPU is not counted as gloo's.
    assert main(["bench", "comm", "--quick", "--busy", "--json"]) == 0
    fig = json.loads(capsys.readouterr().out)
    assert fig["busy"] is True
    for f in fig["ops"].values():
        assert all(t > 0 for t in f["times_s"]) and 0 < f["cpu_share"] < 1.5
