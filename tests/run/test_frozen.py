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


def test_module_buffers_only_read_are_inputs_and_the_warning_says_how_to_move_them(
        tmp_path, caplog):
    """helper-122: masks registered as buffers (as `torch.nn.utils.prune` adds them) that
    the step only reads are inputs, resident from the step's start to their first use:
    eight 1 MiB masks make a budget of 6 MiB unplannable (every step runs op by op,
    within it), where the same masks as frozen parameters replay a plan. The warning
    names module buffers among such inputs and the way out."""
    import logging

    class Masked(torch.nn.Module):
        def __init__(self, as_parameter):
            super().__init__()
            self.lin = torch.nn.Linear(512, 512)
            mask = (torch.rand(512, 512) > 0.5).float()
            if as_parameter:
                self.mask = torch.nn.Parameter(mask, requires_grad=False)
            else:
                self.register_buffer("mask", mask)

        def forward(self, x):
            return torch.tanh(torch.nn.functional.linear(x, self.lin.weight * self.mask,
                                                         self.lin.bias))

    def train(as_parameter):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[Masked(as_parameter) for _ in range(8)])
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.randn(64, 512)
        with outcore.OutOfCore("6MiB", swap_dir=str(tmp_path)) as ooc:
            for _ in range(4):
                with ooc.iteration():
                    model(x).square().mean().backward()
                    opt.step()
                    opt.zero_grad()
            return [it.mode for it in ooc.report().iterations], {
                k: v.clone() for k, v in model.state_dict().items()}

    with caplog.at_level(logging.WARNING, logger="outcore"):
        buffers, as_buffers = train(False)
    assert "replay" not in buffers, buffers
    assert "module buffers" in caplog.text and "nn.Parameter(t, requires_grad=False)" in caplog.text
    frozen, as_frozen = train(True)
    assert frozen[-1] == "replay", frozen
    assert as_buffers.keys() == as_frozen.keys()
    assert all(torch.equal(as_buffers[k], as_frozen[k]) for k in as_buffers)
