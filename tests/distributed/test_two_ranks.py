"""outcore under torchrun, 2 ranks on gloo: DDP, FSDP2 and a 2-stage pipeline, each
with SGD and Adam, bitwise equal to the same distributed run without outcore, at a
budget well below each rank's in-core peak (tests/distributed/worker.py runs them all
in one launch)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from . import worker

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCH_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         os.path.join(HERE, "worker.py"), str(out)],
        capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)
    found = {}
    for case in worker.CASES:
        for rank in (0, 1):
            path = out / f"{case}.rank{rank}.json"
            if path.exists():
                found[case, rank] = json.loads(path.read_text())
    return proc, found


@pytest.mark.parametrize("case", worker.CASES)
def test_bitwise_under_torchrun(results, case):
    proc, found = results
    for rank in (0, 1):
        result = found.get((case, rank))
        assert result is not None, (f"rank {rank} wrote nothing for {case}; torchrun exited "
                                    f"{proc.returncode}:\n{proc.stderr[-4000:]}")
        assert "error" not in result, f"rank {rank}: {result.get('traceback', result['error'])}"
        assert result["params_equal"] and result["losses_equal"], result
        # Well below the in-core peak, and outcore really moved data in the steady state.
        assert result["budget"] <= 0.6 * result["in_core_peak"] + 1, result
        replays = [i for i, (mode, deviation) in enumerate(zip(result["modes"], result["deviations"]))
                   if mode == "replay" and deviation is None]
        assert len(replays) >= 2, result
        for i in replays:
            assert result["bytes_read"][i] > 0, result
            assert result["peak_resident"][i] <= result["budget"], result
