"""Steps whose shape comes at random (NOTE [Step shapes] rule 9 in run/plans.py): mixup
or cutmix by a coin toss, a hook that logs a large activation on some steps, gradient
clipping on some steps. No prediction knows which shape comes; once each shape has a
plan, a replay that leaves its record where another plan's record goes on takes up that
plan there: every later iteration replays to its end, bitwise equal to plain PyTorch,
under the budget."""
from __future__ import annotations

import contextlib

import pytest
import torch

import outcore

# Which of two shapes each step has: the first two alike (the recordings), then at random.
COINS = [0, 0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0]


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1),
                                        torch.nn.BatchNorm2d(32), torch.nn.ReLU())
        self.body = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1),
                                        torch.nn.BatchNorm2d(32), torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 16 * 16, 10))

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def _train(branch, optimizer, ooc=None):
    net = _Net()
    opt = (torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(net.parameters(), lr=1e-3))
    logged, coin = [], [0]

    def log_activation(module, inputs, out):
        if coin[0]:
            logged.append(out.abs().mean())       # `abs` makes a tensor of the output's size
    net.stem.register_forward_hook(log_activation if branch == "forward" else lambda *_: None)
    g = torch.Generator().manual_seed(1)
    for c in COINS:
        x, y = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
        with ooc.iteration() if ooc is not None else contextlib.nullcontext():
            coin[0] = c
            if branch == "batch" and c:            # cutmix: a patch from the flipped batch
                x[:, :, 4:12, 4:12] = x.flip(0)[:, :, 4:12, 4:12]
            elif branch == "batch":                # mixup
                x = x.mul(0.7).add_(x.flip(0).mul_(0.3))
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            if branch == "after backward" and c:
                torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5, foreach=False)
            if branch == "eval instead of step" and c:
                with torch.no_grad():
                    logged.append(net(x).sum())
            else:
                opt.step()
            opt.zero_grad()
            if branch == "after step" and c:       # the other shape ends before this
                logged.append(net.head[1].weight.abs().sum())
    return net, opt, logged


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("branch", ["batch", "forward", "after backward",
                                    "eval instead of step", "after step"])
def test_shapes_at_random_replay_once_each_has_a_plan(branch, optimizer, tmp_path):
    plain = _train(branch, optimizer)
    budget = 2 * 2**20                             # under half the in-core peak
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path), recompute=False) as ooc:
        ours = _train(branch, optimizer, ooc)
        report = ooc.report()
    assert report.in_core_peak > 2 * budget, str(report)
    for a, b in zip(plain[0].state_dict().values(), ours[0].state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(plain[1].state_dict()["state"].values(), ours[1].state_dict()["state"].values(),
                    strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a, b) for a, b in zip(plain[2], ours[2], strict=True))
    its = report.iterations
    last_record = max(it.index for it in its if it.mode == "record")
    assert last_record <= 8, str(report)          # each shape recorded, then no more
    later = [it for it in its if it.index > last_record]
    assert [it.deviation for it in later] == [None] * len(later), str(report)
    assert any(it.switched_at is not None for it in later), str(report)
    assert all(it.peak_resident <= budget for it in its), str(report)
    assert "followed the plan of another shape" in str(report)


@pytest.mark.parametrize("branch", ["batch", "forward", "after backward",
                                    "eval instead of step"])
def test_a_plan_that_recomputes_is_taken_up_too(branch, tmp_path):
    """With recompute on, the plans recompute the convolutions' outputs. The shapes part
    at the step's first op (before any call is kept), in forward after the first
    convolution (its call kept, carried over to the plan taken up), or after backward,
    past the repeats, whose remade arrays the two plans number apart (the shapes have
    different numbers of arrays: helper-61 saw every such step deviate)."""
    plain = _train(branch, "sgd")
    budget = 2 * 2**20
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path), recompute=True) as ooc:
        ours = _train(branch, "sgd", ooc)
        report = ooc.report()
    assert report.planned_recomputed > 0, str(report)
    for a, b in zip(plain[0].state_dict().values(), ours[0].state_dict().values()):
        assert torch.equal(a, b)
    its = report.iterations
    last_record = max(it.index for it in its if it.mode == "record")
    later = [it for it in its if it.index > last_record]
    assert [it.deviation for it in later] == [None] * len(later), str(report)
    assert any(it.switched_at is not None for it in later), str(report)
    assert all(it.peak_resident <= budget for it in its), str(report)


def test_three_shapes_that_part_at_two_places(tmp_path):
    """Three shapes: a log in the stem's hook, one in the body's, or none. A step taken up
    by the wrong plan where the first two part takes up another where it parts from that
    one, later in the same step (helper-61: deviated there)."""
    coins = [0, 0, 1, 2, 0, 1, 2, 2, 1, 0, 2, 1, 0, 0, 2, 1, 1, 2, 0, 1,
             2, 0, 1, 1, 0, 2, 0, 1, 2, 2]      # the third plan comes at the 17th

    def train(ooc=None):
        net = _Net()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        logged, now = [], [0]
        net.stem.register_forward_hook(
            lambda m, i, out: logged.append(out.abs().mean()) if now[0] == 1 else None)
        net.body.register_forward_hook(
            lambda m, i, out: logged.append(out.abs().mean()) if now[0] == 2 else None)
        g = torch.Generator().manual_seed(1)
        for c in coins:
            x, y = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                now[0] = c
                torch.nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
                opt.zero_grad()
        return net, logged
    plain = train()
    budget = 2 * 2**20
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path), recompute=False) as ooc:
        ours = train(ooc)
        report = ooc.report()
    for a, b in zip(plain[0].state_dict().values(), ours[0].state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(plain[1], ours[1], strict=True))
    its = report.iterations
    last_record = max(it.index for it in its if it.mode == "record")
    later = [it for it in its if it.index > last_record]
    assert len(later) >= 8 and [it.deviation for it in later] == [None] * len(later), str(report)
    assert all(it.peak_resident <= budget for it in its), str(report)


def test_a_random_depth_takes_up_the_plan_that_reads_the_same_weights(tmp_path):
    """Stochastic depth: 2, 5 or 8 layers at random, then the head. The step of one depth
    leaves the plan of another where that one reads the next layer's weight and the step
    the head's: another plan goes on with the same op there, but only one reads the
    same weight. Taken up by the op's name alone, the wrong one was left at once and both
    plans dropped as replaced state; 30-45% of steps recorded again, for ever
    (helper-172). Now each depth has its plan and every later step replays one."""
    depths = [2, 5, 8, 2, 2, 8, 5, 5, 2, 8, 8, 5, 2, 5, 8, 2, 8, 5, 5, 2, 8, 2, 5, 8, 8, 2,
              5, 2, 8, 5, 5, 8, 2, 2, 5, 8]

    def train(ooc=None):
        torch.manual_seed(0)
        layers = torch.nn.ModuleList([torch.nn.Linear(256, 256) for _ in range(8)])
        head = torch.nn.Linear(256, 10)
        opt = torch.optim.SGD([*layers.parameters(), *head.parameters()], lr=0.01,
                              momentum=0.9)
        g = torch.Generator().manual_seed(1)
        for d in depths:
            x, y = torch.randn(64, 256, generator=g), torch.randint(0, 10, (64,), generator=g)
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                for layer in layers[:d]:
                    x = torch.relu(layer(x))
                torch.nn.functional.cross_entropy(head(x), y).backward()
                opt.step()
                opt.zero_grad()
        return [*layers.state_dict().values(), *head.state_dict().values()]
    plain = train()
    budget = 1_500_000
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path)) as ooc:
        ours = train(ooc)
        report = ooc.report()
    assert all(torch.equal(a, b) for a, b in zip(plain, ours, strict=True))
    its = report.iterations
    later = its[-16:]
    assert [it.mode for it in later] == ["replay"] * 16, str(report)
    assert [it.deviation for it in later] == [None] * 16, str(report)
    assert all(it.peak_resident <= budget for it in its), str(report)


def test_a_step_reading_one_more_array_is_named_so_and_binds_none_to_an_output(tmp_path):
    """A function that both reads and creates (`torch.cat` of kept tensors) and reads one
    storage more than its record: the step is off its record ("reads more arrays than
    recorded"), and the extra input is not bound to the id of the array the record
    created (which called the step "smaller" and reported "produced [...] new bytes,
    recorded []")."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(4096, 128), torch.nn.Linear(128, 4096))
    opt = torch.optim.SGD(lin.parameters(), 0.1)
    keep = [torch.randn(8, 4096) for _ in range(3)]     # kept across steps, 128 KiB each
    picks = [[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 2, 1]]
    with outcore.OutOfCore(budget="6MiB", swap_dir=str(tmp_path)) as ooc:
        for p in picks:
            with ooc.iteration():
                loss = lin(torch.cat([keep[i] for i in p])).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
        last = ooc.report().iterations[-1]
    assert last.mode == "replay" and not last.smaller
    assert "reads more arrays than recorded" in last.deviation


def test_a_tensor_lifted_in_the_step_replays(tmp_path):
    """`torch.tensor(values)` in the step: `lift_fresh` reads the storage made just before
    it, which the recorder counts as created there. Counted as no read, every replay left
    its plan at function 0 ("reads more arrays than recorded") and recorded again."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(1024, 256), torch.nn.Linear(256, 1024))
    opt = torch.optim.SGD(lin.parameters(), 0.1)
    values = [float(i % 7) for i in range(64 * 1024)]          # 256 KiB once lifted
    with outcore.OutOfCore(budget="3MiB", swap_dir=str(tmp_path)) as ooc:
        for _ in range(4):
            with ooc.iteration():
                lin(torch.tensor(values).view(64, 1024)).square().mean().backward()
                opt.step()
                opt.zero_grad()
        its = ooc.report().iterations
    assert [(it.mode, it.deviation) for it in its[1:]] == [("replay", None)] * 3, its
