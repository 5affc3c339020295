"""Fine-tuning with frozen weights (a frozen backbone, as under LoRA): parameters with
requires_grad=False are state like any other (`trace/recorder._classify`), so a budget
far below their size trains, bitwise equal to plain PyTorch. They were classed as
inputs, which stay resident until their first use: a budget below the frozen weights
was infeasible."""
from __future__ import annotations

import torch

import outcore

from ..trace.helpers import assert_bitwise_equal, state_of

WIDTH, DEPTH = 1024, 8          # 32 MiB of weights, the last layer's 4 MiB trained


def make():
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    for p in model[:-2].parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, opt


def step(model, opt, it):
    x = torch.randn(64, WIDTH, generator=torch.Generator().manual_seed(it))
    loss = (model(x) - x).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def test_frozen_weights_are_parameters_and_train_bitwise_far_below_their_size(tmp_path):
    plain, plain_opt = make()
    expected = [step(plain, plain_opt, it) for it in range(4)]
    model, opt = make()
    with outcore.record() as rec:
        step(model, opt, 0)
    model, opt = make()
    budget = 16 * 2**20                  # the frozen weights alone are 28 MiB
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path)) as ooc:
        losses = []
        for it in range(4):
            with ooc.iteration():
                losses.append(step(model, opt, it))
        report = ooc.report()
        trace = ooc.trace
    assert_bitwise_equal(state_of(model, opt), state_of(plain, plain_opt))
    assert all(torch.equal(a, b) for a, b in zip(losses, expected))
    weights = [a for a in trace.arrays if a.existed_before and a.nbytes == WIDTH * WIDTH * 4
               and (a.kind, a.category) == ("persistent", "parameter")]
    assert len(weights) == DEPTH, trace.arrays           # the 7 frozen ones and the last
    inputs = sum(a.nbytes for a in rec.trace.arrays if a.kind == "input")
    assert inputs == 0, inputs          # the batch is made in the step; no weight is an input
    replays = [it for it in report.iterations if it.mode == "replay"]
    assert replays and all(it.peak_resident <= budget for it in replays), report
    assert replays[-1].bytes_read >= 20 * 2**20                 # the frozen weights move
