"""Shared helpers for recorder tests: twin runs compared bitwise."""
from __future__ import annotations


import torch

import outcore


def state_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Every tensor the step can change: parameters, buffers, optimizer state."""
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, group in enumerate(optimizer.param_groups):
        for j, p in enumerate(group["params"]):
            for k, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    out[f"opt.{i}.{j}.{k}"] = v.detach().clone()
    return out


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k} differs"


def run_twins(make, step, iterations=2, record_at=(0, 1)):
    """Run `step` on two identical setups; record the given iterations of the second.
    Return both final states and the traces."""
    plain, recorded = make(), make()
    traces = []
    for it in range(iterations):
        torch.manual_seed(1000 + it)        # dropout draws the same masks in both twins
        step(*plain)
        torch.manual_seed(1000 + it)
        if it in record_at:
            with outcore.record() as rec:
                step(*recorded)
            traces.append(rec.trace)
        else:
            step(*recorded)
    return state_of(*plain[:2]), state_of(*recorded[:2]), traces
