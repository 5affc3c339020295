"""`outcore state DIR` (helper-215: a loop that adds an optimizer could not ask a state
directory what it keeps without trying a resume)."""
from __future__ import annotations

import pytest
import torch

import outcore
from outcore.cli.main import main

from ..run.test_state_dir import _two_adam_iterations


def test_state_says_what_a_state_dir_keeps_and_what_resume_takes(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    opts = [torch.optim.Muon([p for p in model.parameters() if p.ndim == 2]),
            torch.optim.AdamW([p for p in model.parameters() if p.ndim != 2])]
    sched = torch.optim.lr_scheduler.StepLR(opts[1], 2)
    assert main(["state", str(tmp_path)]) == 0
    assert "keeps no committed state: resume() there loads nothing and returns 0" in (
        capsys.readouterr().out)
    with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
        ooc.resume(model, opts, extra={"sched": sched})
        for _ in range(3):
            with ooc.iteration():
                model(torch.randn(4, 64)).sum().backward()
                for opt in opts:
                    opt.step()
                    opt.zero_grad()
                sched.step()
        before = sorted(p.name for p in tmp_path.iterdir())
        assert main(["state", str(tmp_path)]) == 0     # beside the open OutOfCore: reads only
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    said = capsys.readouterr().out
    assert "the state after 3 iterations, in state-0.swap" in said
    assert "model: 4 tensors, 18.28 KiB; gradients of 0 parameters" in said
    assert ("optimizers: torch.optim.Muon over 2 parameters; torch.optim.adamw.AdamW over 2 "
            "parameters") in said
    assert "extra=: sched" in said
    assert "resume(model, [<Muon>, <AdamW>], extra={'sched': ...}) there returns 3" in said
    assert main(["state", str(tmp_path / "nope")]) == 2
    assert "nope is no directory" in capsys.readouterr().err
    (tmp_path / "manifest.pt").write_bytes(b"not a manifest")
    assert main(["state", str(tmp_path)]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_state_says_a_damaged_state_dir_is_refused(tmp_path, capsys):
    """helper-225: `outcore state` said "resume(...) there returns 2", exit 0, of a
    directory whose state file was removed or cut short, where resume() refuses it as
    damaged: now it says so and exits 1."""
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    opt = _two_adam_iterations(model, tmp_path)
    assert main(["state", str(tmp_path)]) == 0
    assert "there returns 2" in capsys.readouterr().out
    state = next(tmp_path.glob("state-*.swap"))
    with open(state, "r+b") as fh:
        fh.truncate(4096)
    assert main(["state", str(tmp_path)]) == 1
    said = capsys.readouterr().out
    assert "returns" not in said
    assert "resume() there refuses it: its state file ends at 4,096 B, before the" in said
    assert "the directory is damaged. Move it away" in said
    with pytest.raises(outcore.OutcoreError, match="damaged"):      # as resume() does
        with outcore.OutOfCore("1MiB", state_dir=tmp_path) as ooc:
            ooc.resume(model, opt)
    state.unlink()
    assert main(["state", str(tmp_path)]) == 1
    assert "its state file is missing, so the directory is damaged" in capsys.readouterr().out
