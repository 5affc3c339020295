"""make_movable is importable without transformers or lightning, for accelerate loops."""
import torch

import outcore


def test_make_movable_from_outcore_integrations(tmp_path):
    from outcore.integrations import make_movable
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones_like(p)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    opt.load_state_dict(torch.load(tmp_path / "opt.pt"))
    assert not opt.state[p]["exp_avg"].untyped_storage().resizable()
    with outcore.OutOfCore(budget="1MiB", swap_dir=tmp_path) as ooc:
        assert make_movable(opt, ooc) >= 2
    assert opt.state[p]["exp_avg"].untyped_storage().resizable()
