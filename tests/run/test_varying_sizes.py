"""Steps whose sizes vary with the same ops (NOTE [Step shapes] in run/plans.py, rule 10):
text padded to each batch's longest sequence, an epoch's short last batch. A step no
larger than a plan replays it; one larger leaves it, and the next iteration is recorded
and planned for the larger sizes of both. Bitwise equal to plain PyTorch, never over
the budget."""
from __future__ import annotations

import contextlib
import logging
import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import outcore
from outcore.run import plans
from outcore.run.plans import GROWTH_MARGIN

from .test_small_ops import _Convs

BUDGET = 9_000_000          # the step's in-core peak is 12.9 MB at length 80


def _tokens_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(512, 64), torch.nn.Linear(64, 512),
                              torch.nn.GELU(), torch.nn.Linear(512, 64), torch.nn.LayerNorm(64),
                              torch.nn.Linear(64, 512))
    return net, torch.optim.Adam(net.parameters(), lr=1e-3)


def _cross_entropy(logits, ids):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())


def _train_tokens(lengths, ooc=None, loss=_cross_entropy):
    """Sequences of 16 token ids, a new length every step, as a collator that pads to
    each batch's longest makes them."""
    net, opt = _tokens_net()
    for it, n in enumerate(lengths):
        ids = torch.randint(0, 512, (16, n), generator=torch.Generator().manual_seed(it))
        with ooc.iteration() if ooc is not None else contextlib.nullcontext():
            loss(net(ids), ids).backward()
            opt.step()
            opt.zero_grad()
    return net, opt


def _twins(lengths, tmp_path, budget=BUDGET, loss=_cross_entropy):
    plain, plain_opt = _train_tokens(lengths, loss=loss)
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path)) as ooc:
        ours, opt = _train_tokens(lengths, ooc, loss=loss)
        report = ooc.report()
    for a, b in zip(plain.state_dict().values(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(plain_opt.state.values(), opt.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # A step that leaves its plan may pass the budget by the outputs of the op it leaves
    # at (docs/executor.md, "Deviation"): a passive replay sees that an op made more only
    # once it ran. The largest output of this net: Linear(64, 512) at the longest length.
    one_op = 16 * max(lengths) * 512 * 4
    assert all(it.peak_resident <= budget + (one_op if it.deviation else 0)
               for it in report.iterations), str(report)
    return report


def _compare(train, budget, tmp_path, **options):
    """`train(ooc)` plain and under OutOfCore(budget, **options): bitwise equal, never
    over the budget. Returns the report's iterations."""
    plain = train()
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path), **options) as ooc:
        ours = train(ooc)
        report = ooc.report()
    for a, b in zip(plain.state_dict().values(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert all(it.peak_resident <= budget for it in report.iterations), str(report)
    return report.iterations


def test_shorter_steps_replay_and_a_longer_one_grows_the_plan(tmp_path):
    """Recorded at 64 (the step before made Adam's state): 32, 40 and 56 replay that
    plan; 80 leaves it, and the next iteration (24) is recorded and planned for the
    largest size of each array in the two records and in the step that left (80's):
    from then on every length replays. (Before, every step of a length other than 64
    left the plan and ran on demand.)"""
    lengths = [48, 64, 32, 40, 56, 80, 24, 72, 80, 16, 64, 80, 48]
    report = _twins(lengths, tmp_path)
    modes = [(it.mode, it.deviation is not None) for it in report.iterations]
    R, OK, OFF = ("record", False), ("replay", False), ("replay", True)
    assert modes == [R, R, OK, OK, OK, OFF, R, OK, OK, OK, OK, OK, OK], str(report)
    assert report.iterations[5].outgrew
    assert [it.smaller for it in report.iterations[2:5]] == [True, True, True]
    assert "the next step of the same ops is recorded to plan for the larger sizes" in str(report)
    assert report.iterations[-1].bytes_read > 0          # the plan moves: not passive


def test_a_short_last_batch_replays_a_plan_that_recomputes(tmp_path):
    """An epoch's short last batch, and a short one in between, in a plan that
    recomputes convolutions' outputs: they replay it, recomputing, bitwise equal."""
    g = torch.Generator().manual_seed(1)
    data = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    sizes = [8, 8, 8, 5, 8, 8, 3]
    budget = 640 * 2**10

    def train(ooc=None):
        model = _Convs()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for n in sizes:
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(data[0][:n]), data[1][:n]).backward()
                opt.step()
        return model
    its = _compare(train, budget, tmp_path, recompute=True)
    assert [it.mode for it in its[2:]] == ["replay"] * 5, its
    assert not any(it.deviation for it in its), its
    assert its[3].bytes_recomputed > 0 and its[6].bytes_recomputed > 0, its


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(8, 80), min_size=6, max_size=10))
def test_lengths_at_random_train_bitwise_within_the_budget(lengths, tmp_path):
    """Any lengths: bitwise equal, under the budget; a replay that left its plan because
    an array was larger than planned is followed by a recording, and a replay that
    finished its plan, tracking, was of no longer a step than 9/8 of one recorded or
    outgrown before it (a plan grown plans each array that grew 1/GROWTH_MARGIN larger:
    NOTE [Step shapes] rule 10; a replay of a plan that moves nothing follows op names
    only)."""
    report = _twins(lengths, tmp_path)
    its = report.iterations
    for i, it in enumerate(its[:-1]):
        if it.outgrew:
            assert its[i + 1].mode == "record", str(report)
    seen = 0                        # the longest step recorded or outgrown so far
    for n, it in zip(lengths, its):
        if it.mode == "replay" and it.tracked and not it.deviation:
            assert n * GROWTH_MARGIN <= seen * (GROWTH_MARGIN + 1), str(report)
        if it.mode == "record" or it.outgrew:
            seen = max(seen, n)


@pytest.mark.parametrize("optimizer, sizes, min_move_bytes", [
    ("adam", [8, 8, 8, 12, 5, 12, 7, 12, 6, 12, 3, 12], None),
    ("sgd", [8, 8, 8, 5, 12, 8, 3, 12, 12, 4], 0)])
def test_a_larger_batch_grows_the_plan_once(optimizer, sizes, min_move_bytes, tmp_path):
    """Batches of 12 after a plan for 8, in a plan that recomputes, made inside the
    iteration: the first one outgrows the plan, and the next recording's plan holds
    every array of the 12 (helper-65: Adam's small per-parameter ops, left out of the
    sizes the step showed, matched larger ones: an envelope over the budget, a
    recording after every 12 for ever; with min_move_bytes=0 the logits of 480 bytes
    were not grown, and the next 12 outgrew the plan again)."""
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    budget, extra = 800_000, {} if min_move_bytes is None else {"min_move_bytes": min_move_bytes}

    def train(ooc=None):
        model = _Convs()
        opt = (torch.optim.Adam(model.parameters(), lr=1e-3) if optimizer == "adam"
               else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
        for n in sizes:
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                x, y = X[:n].clone(), Y[:n].clone()
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        return model
    its = _compare(train, budget, tmp_path, recompute=True, **extra)
    assert [i for i, it in enumerate(its) if it.deviation] == [sizes.index(12)], its
    assert sum(it.mode == "record" for it in its) == 3, its


class _Attention(torch.nn.Module):
    """Scores of n x n per sequence; one more layer for sequences over 48 tokens."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.qkv = torch.nn.Embedding(512, 64), torch.nn.Linear(64, 192)
        self.o, self.extra, self.head = (torch.nn.Linear(64, 64), torch.nn.Linear(64, 64),
                                         torch.nn.Linear(64, 512))

    def forward(self, ids):
        x = self.emb(ids)
        q, k, v = self.qkv(x).chunk(3, -1)
        x = x + self.o(((q @ k.transpose(-1, -2)) / 8.0).softmax(-1) @ v)
        if ids.shape[1] > 48:
            x = x + torch.tanh(self.extra(x))
        return self.head(x)


def test_two_lengths_with_a_branch_for_the_long_one_converge(tmp_path):
    """Lengths 32 and 64 at random, the 64 taking one more layer: two shapes of step,
    not one size of the other. A 32 replaying the 64's plan as a smaller step leaves it
    at the branch and takes up the 32's plan there (rule 9 on the step's own sizes,
    helper-65: it compared the 64's sizes, found none, and recorded again and again)."""
    import random
    coin = random.Random(1)
    lengths = [coin.choice([32, 64]) for _ in range(40)]

    def train(ooc=None):
        net = _Attention()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for it, n in enumerate(lengths):
            ids = torch.randint(0, 512, (8, n), generator=torch.Generator().manual_seed(it))
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                torch.nn.functional.cross_entropy(net(ids).flatten(0, 1), ids.flatten()).backward()
                opt.step()
                opt.zero_grad()
        return net
    its = _compare(train, 4_000_000, tmp_path)
    assert sum(it.mode == "record" for it in its) <= 6, its
    assert not any(it.deviation or it.mode == "record" for it in its[-12:]), its


def test_a_longer_step_leaves_a_plan_that_moves_nothing(tmp_path):
    """Recorded at 16 tokens, where nothing moves: the replays only follow op names
    (passive) and track nothing. A step of 80 (in-core peak 18.3 MB against a 9 MB
    budget) leaves the plan at its first op that makes more than recorded, runs on
    demand under the budget, and grows the plan (helper-65: it replayed passively, 18.3
    MB resident, the report showing the schedule's 4.9 MB)."""
    report = _twins([16] * 4 + [80] * 4, tmp_path)
    its = report.iterations
    assert not its[3].tracked and its[4].outgrew, str(report)
    assert its[5].mode == "record" and its[6].tracked and not its[6].deviation, str(report)


def test_a_passive_replay_that_leaves_counts_what_it_made_before(tmp_path):
    """A passive replay tracks nothing while it follows; when a longer step leaves it,
    the arrays made before are tracked then (helper-66: untracked until an op read them,
    so the rest of the step ran on demand beside bytes it did not count, and the report
    showed 8.1 MB where the step held 14.3). Checked in the last module's forward of the
    step that leaves: every activation made so far is tracked, and the resident count
    holds them all."""
    net, opt = _tokens_net()
    made, seen = [], []
    for module in net[:5]:
        module.register_forward_hook(lambda m, i, out: made.append(out))

    def at_the_end(module, inputs, out):
        res = ooc._res
        alive = {t.untyped_storage()._cdata: t.untyped_storage() for t in (*made, out)}
        seen.append((all(res.entry_of(s) is not None for s in alive.values()),
                     res.resident >= sum(s.nbytes() for s in alive.values())))
    net[5].register_forward_hook(at_the_end)
    with outcore.OutOfCore(BUDGET, swap_dir=str(tmp_path)) as ooc:
        for it, n in enumerate([16] * 4 + [80]):
            made.clear()
            ids = torch.randint(0, 512, (16, n), generator=torch.Generator().manual_seed(it))
            with ooc.iteration():
                _cross_entropy(net(ids), ids).backward()
                opt.step()
                opt.zero_grad()
        its = ooc.report().iterations
    assert not its[3].tracked and its[4].deviation and its[4].outgrew, str(ooc.report())
    assert seen[-1] == (True, True)


def test_a_tensor_made_in_the_step_does_not_stop_growth(tmp_path):
    """`torch.tensor(0.5)` in the step: the recorder counts what `lift_fresh` lifts as
    made, the step run on demand does not; the step that outgrew still ran the plan's
    ops, and grows it (helper-66: no growth, every longer step deviated)."""
    def halved(logits, ids):
        return _cross_entropy(logits, ids) * torch.tensor(0.5)
    its = _twins([48, 64, 32, 80, 24, 80, 80], tmp_path, loss=halved).iterations
    R, OK, OFF = ("record", False), ("replay", False), ("replay", True)
    assert [(it.mode, it.deviation is not None) for it in its] == [R, R, OK, OFF, R, OK, OK]


def test_a_loss_over_masked_tokens_stays_passive(tmp_path):
    """A budget far above the peak, a loss over the tokens a mask keeps (`logits[keep]`:
    a size that follows the data, a few bytes more than recorded now and then): the
    replays stay passive (helper-66: the first step that made more left the plan and
    every later one was tracked)."""
    def masked(logits, ids):
        keep = ids % 3 == 0
        return torch.nn.functional.cross_entropy(logits[keep], ids[keep])
    its = _twins([64] * 10, tmp_path, budget=200_000_000, loss=masked).iterations
    assert not any(it.deviation or it.tracked for it in its[2:]), its


def test_accumulation_over_micro_batches_of_varying_sizes_settles(tmp_path):
    """A step every second iteration, the micro-batches 32, 24, 32, 16 (helper-80). The
    second micro-batch first replays the first's plan and leaves it (it adds to the
    gradients the first made); its shape is now computed on the sizes it ran, as a
    recording of it has them. On the plan's sizes it matched no recording: each such
    step added a shape never planned, and in the last 75 of 150 iterations 28 recorded
    and 28 deviated. Now all replay after a few cycles."""
    sizes = [32, 24, 32, 16]

    def train(ooc=None):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                  torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                  torch.nn.Linear(256, 10))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        for it in range(32):
            g = torch.Generator().manual_seed(it)
            x = torch.randn(sizes[it % 4], 256, generator=g)
            y = torch.randint(0, 10, (sizes[it % 4],), generator=g)
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                (torch.nn.functional.cross_entropy(net(x), y) / 2).backward()
                if it % 2:
                    opt.step()
                    opt.zero_grad()
        return net
    its = _compare(train, 2**20, tmp_path)
    assert not any(it.deviation or it.mode == "record" for it in its[-12:]), its
    assert sum(it.bytes_written for it in its[-12:]) > 0, its


def test_a_step_that_left_a_plan_it_switched_to_has_the_shape_a_recording_has(tmp_path):
    """Rule 9 then a deviation: a batch-8 step with gradient clipping replays the plan of
    batch 8 without clipping, takes up the plan of batch 16 with clipping where they
    part (a switch), and leaves it at an op neither has. Its shape took the batch-16
    plan's sizes for the functions before the switch, a shape no recording has
    (helper-84); it is now that of a recording of the same step."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU())
            self.body = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU())
            self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 16 * 16, 10))

        def forward(self, x):
            return self.head(self.body(self.stem(x)))

    def run(seq):
        net = Net()
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(1)
        with outcore.OutOfCore(2 * 2**20, swap_dir=str(tmp_path), recompute=False) as ooc:
            for bs, clip, extra in seq:
                x, y = torch.randn(bs, 3, 16, 16, generator=g), torch.randint(0, 10, (bs,), generator=g)
                with ooc.iteration():
                    torch.nn.functional.cross_entropy(net(x), y).backward()
                    if clip:
                        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5, foreach=False)
                    opt.step()
                    opt.zero_grad()
                    if extra:
                        net.head[1].weight.abs().sum()
            return ooc.report().iterations, ooc._plans.history[-1]
    its, shape = run([(16, 1, 0)] * 3 + [(8, 0, 0)] * 4 + [(8, 1, 0)] + [(8, 0, 0)] * 2 + [(8, 1, 1)])
    assert its[-1].switched_at is not None and its[-1].deviation, its[-1]
    recorded, recorded_shape = run([(8, 1, 1)])
    assert recorded[0].mode == "record"
    assert shape == recorded_shape


@pytest.mark.parametrize("every", [2, 4])
def test_accumulation_over_lengths_at_random_settles(every, tmp_path, caplog):
    """Text padded to each batch's longest sequence, lengths at random, a step every
    2nd or 4th iteration (helper-83: tiny GPT-2, 18 recordings and 43 deviations in the
    last 75 of 150). No period holds for the shapes, whose sizes follow the data: the
    last shape predicted the next, the wrong micro-batch every other iteration. The
    families (the ops without sizes) hold the period and predict; each family's plan
    grows to the longest length seen (rule 10), and a step that leaves it for a larger
    array takes up no plan of other ops on the way (it deviated there, and its plan
    never grew). Then every iteration replays. (Before: in the last 24 of 72, 2
    recordings and 3 deviations with a step every 2nd iteration, and 12 that took up
    another plan midway; 2, 7 and 8 with one every 4th.) Its deviations are learnt
    from: said at INFO, no warning (helper-85: every accumulation warned)."""
    lengths = [int(n) for n in torch.randint(8, 49, (72,), generator=torch.Generator().manual_seed(3))]

    def train(ooc=None):
        net, opt = _tokens_net()
        for it, n in enumerate(lengths):
            ids = torch.randint(0, 512, (16, n), generator=torch.Generator().manual_seed(it))
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                (_cross_entropy(net(ids), ids) / every).backward()
                if it % every == every - 1:
                    opt.step()
                    opt.zero_grad()
        return net
    with caplog.at_level(logging.INFO, logger="outcore"):
        its = _compare(train, 6_000_000, tmp_path)
    assert any("deviated" in r.getMessage() for r in caplog.records)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    tail = its[-24:]
    assert sum(it.bytes_written for it in tail) > 0, its
    if every == 2:
        assert not any(it.deviation or it.mode == "record" for it in tail), its
    else:
        # Each of the four micro-batches grows its plan to the longest length it meets
        # itself: here still a step now and then outgrows its plan (a deviation), and the
        # next of its family is recorded. Nothing else leaves a plan.
        assert not any(it.deviation and not it.outgrew for it in tail), its
        assert (sum(it.mode == "record" for it in tail)
                <= sum(it.outgrew for it in its[-24 - every:])), its


def test_an_evaluation_of_a_larger_batch_takes_up_its_plan(tmp_path):
    """Training at one size, and every 34 iterations (past MAX_PERIOD: no period
    foretells it) an evaluation of 3 no_grad batches twice as large. After many training
    steps the families hold a firm period 1; the first evaluation step of a round leaves
    the training plan at its first (larger) array and takes up the evaluation's plan
    there (rule 9): a family outside the period is none the period rules out (helper-86:
    a first version refused every plan of another family there, and the first step of
    each evaluation deviated)."""
    def train(ooc=None):
        net, opt = _tokens_net()
        for it in range(102):
            evaluating = it % 34 >= 31
            ids = torch.randint(0, 512, (32 if evaluating else 16, 32),
                                generator=torch.Generator().manual_seed(it))
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                if evaluating:
                    with torch.no_grad():
                        _cross_entropy(net(ids), ids)
                    continue
                _cross_entropy(net(ids), ids).backward()
                opt.step()
                opt.zero_grad()
        return net
    its = _compare(train, 6_000_000, tmp_path)
    firsts = [its[i] for i in (65, 99)]
    assert all(it.mode == "replay" and not it.deviation and it.switched_at is not None
               for it in firsts), its
    assert not any(it.deviation or it.mode == "record" for it in its[64:]), its


class _PositionIds(torch.nn.Module):
    """Token and position embeddings: the position ids, `arange(n)`, are a small array
    the step makes (8 n bytes) before it reads the ids, and reads after."""

    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(1000, 512)
        self.pos = torch.nn.Embedding(128, 512)
        self.mlp = torch.nn.Sequential(*[m for _ in range(5)
                                         for m in (torch.nn.Linear(512, 512), torch.nn.ReLU())])

    def forward(self, ids):
        pos = torch.arange(ids.shape[1])            # before the ids are read
        return self.mlp(self.tok(ids) + self.pos(pos)[None])


def _frozen_batch_norm():
    """Convolutions with batch norms in eval mode (frozen statistics): their
    `native_batch_norm` makes two storages of no bytes beside its output."""
    layers = []
    for cin, cout in [(3, 16), (16, 16), (16, 16)]:
        layers += [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.BatchNorm2d(cout).eval(),
                   torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def _late_reads(kind):
    """`train(ooc)` for `test_what_a_step_reads_after_it_left_its_plan_grows_with_it`."""
    def train(ooc=None):
        torch.manual_seed(0)
        if kind == "position ids":
            net = _PositionIds()
        elif kind == "frozen batch norm":
            net = _frozen_batch_norm()
        else:
            layers = 6 if kind == "target" else 2
            net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), *[
                m for _ in range(layers - 1) for m in (torch.nn.Linear(512, 512), torch.nn.ReLU())],
                torch.nn.Linear(512, 256))
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        for it, n in enumerate(LATE_LENGTHS):
            g = torch.Generator().manual_seed(it)
            x = (torch.randint(0, 1000, (16, n), generator=g) if kind == "position ids"
                 else torch.randn(8, 3, n, n, generator=g) if kind == "frozen batch norm"
                 else torch.randn(16, n, 256, generator=g))
            y = torch.randn(16, n, 256, generator=g)        # read by the loss only
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                out = net(x)
                loss = (torch.nn.functional.mse_loss(out, y) if kind.endswith("target")
                        else out.pow(2).mean())
                loss.backward()
                opt.step()
                opt.zero_grad()
        return net
    return train


LATE_LENGTHS = [32, 64, 16, 48, 48, 16, 48]


@pytest.mark.parametrize("kind, budget", [
    ("target", 12 << 20), ("passive", 10 << 20), ("passive target", 14 << 20),
    ("position ids", 12 << 20), ("frozen batch norm", 7 << 20), ("frozen batch norm", 14 << 20)])
def test_what_a_step_reads_after_it_left_its_plan_grows_with_it(kind, budget, tmp_path):
    """Recorded at 32; 64 leaves the plan and outgrows it; 16 is recorded and planned
    for the larger sizes of both. A step of 48 then replays: the plan grew to what 64
    read after it left, not only to what it made (helper-85: the target, read first by
    the loss; the position ids, made before and read after; in a passive replay, what
    it made larger before it left, which a passive replay binds nothing of, and what
    the function it left at read: helper-87), where each 48 deviated at that array and
    was recorded again. Frozen batch norms make storages of no bytes, which the record
    has no arrays for: counted, they made every size of the step unusable (helper-87)."""
    its = _compare(_late_reads(kind), budget, tmp_path)
    assert [it.mode for it in its] == ["record", "replay", "record"] + ["replay"] * 4, its
    assert its[1].outgrew and not any(it.deviation for it in its[2:]), its


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.a, self.b = (torch.nn.LayerNorm(128), torch.nn.Linear(128, 512),
                                   torch.nn.Linear(512, 128))

    def forward(self, x):
        return x + self.b(torch.nn.functional.gelu(self.a(self.ln(x))))


def test_small_state_beside_a_micro_batch_is_no_reason_to_record_it_again(tmp_path, monkeypatch):
    """Accumulation over 4 micro-batches of lengths at random, AdamW, a model whose
    LayerNorms and biases are under min_move_bytes: their gradients and Adam's moments
    never move. A replay lets go of those its plan does not start from (Residency NOTE
    8), so they are no storages kept beside it (rule 8 of NOTE [Step shapes]): before,
    counted there, they dropped the plan and recorded the step again at 16, 20, 24
    and 28 (helper-85: with sizes that follow the data, once per shape is every time)."""
    lengths = [int(n) for n in torch.randint(16, 97, (32,), generator=torch.Generator().manual_seed(2))]

    def train(ooc=None):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Embedding(1000, 128), *[_Block() for _ in range(4)],
                                  torch.nn.LayerNorm(128), torch.nn.Linear(128, 1000))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        for it, n in enumerate(lengths):
            ids = torch.randint(0, 1000, (4, n), generator=torch.Generator().manual_seed(it))
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                (_cross_entropy(net(ids), ids) / 4).backward()
                if it % 4 == 3:
                    opt.step()
                    opt.zero_grad()
        return net

    outgrown = []
    check = outcore.OutOfCore._outgrown

    def spy(self, *args):
        outgrown.append(check(self, *args))
        return outgrown[-1]
    monkeypatch.setattr(outcore.OutOfCore, "_outgrown", spy)
    _compare(train, 6 << 20, tmp_path)
    assert outgrown and not any(outgrown), outgrown


def test_a_loop_whose_steps_no_plan_follows_is_warned_about_once(tmp_path, caplog):
    """A depth that follows the data: every step a shape of its own, each deviation
    said at INFO as a shape being learnt. Most replays running on demand get one
    warning that says so (helper-87: 23 of 30 on demand, not one warning)."""
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Linear(512, 512) for _ in range(40))
    opt = torch.optim.SGD(layers.parameters(), lr=0.01)
    rng = random.Random(0)
    with caplog.at_level(logging.INFO, logger="outcore"), \
            outcore.OutOfCore(3 << 20, swap_dir=str(tmp_path)) as ooc:
        for _ in range(30):
            x = torch.randn(64, 512)
            with ooc.iteration():
                for layer in layers[:rng.randint(1, 40)]:
                    x = torch.relu(layer(x))
                x.pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        deviated = sum(bool(it.deviation) for it in ooc.report().iterations)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert deviated >= 12 and len(warned) == 1, (deviated, warned)
    assert warned[0].startswith("12 of the last 12 replayed iterations deviated"), warned


def test_a_loss_logged_in_the_recorded_step_does_not_stop_growth(tmp_path):
    """`loss.item()` in the recorded step only, then batches twice as large: the first
    of those outgrows the plan (its ops are the plan's, the small `.item()` aside) and
    the next is recorded, planned for them; every step after replays (helper-88:
    counted as another shape of step, not outgrown, the plan never grew and the larger
    steps deviated until a shape seen twice was recorded)."""
    logged = []

    def train(ooc=None):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(),
                                  torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                  torch.nn.Linear(1024, 10))
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        for it in range(8):
            g = torch.Generator().manual_seed(it)
            n = 32 if it == 0 else 64
            x, y = torch.randn(n, 512, generator=g), torch.randint(10, (n,), generator=g)
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                loss = torch.nn.functional.cross_entropy(net(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                if it == 0:
                    logged.append(loss.item())
        return net
    its = _compare(train, 10 << 20, tmp_path)
    assert logged[0] == logged[1]
    assert [it.mode for it in its] == ["record", "replay", "record"] + ["replay"] * 5, its
    assert its[1].outgrew and not any(it.deviation for it in its[2:]), its


def _fake_trace(functions, sizes):
    """A trace of `functions` ((op, ((access kind, array id), ...)) each) on arrays of
    `sizes` bytes, as far as `plans.sizes_made` reads one."""
    return SimpleNamespace(
        functions=[SimpleNamespace(op=op, repeats=None, accesses=[
            SimpleNamespace(kind=kind, array=a) for kind, a in accesses])
            for op, accesses in functions],
        arrays=[SimpleNamespace(id=i, nbytes=n) for i, n in enumerate(sizes)])


def test_a_large_op_run_on_demand_grows_its_own_function_not_a_small_one_of_its_name():
    """Ops run on demand pair with the plan's functions as the replayer matches them
    (NOTE [Small ops off the record], rule 4): a large op passes small functions for a
    large one of its name, and a large function small ops for one, before either pairs
    with a small one of its name; one that does not pair so is the small function's op
    on larger tensors (position ids of a longer sequence). Before, they paired as they
    came: a large `add` took the small `add` that only the recorded step ran, or the
    large `mul` the small one after it that a small extra before it left, and the
    scalars grew to the large array's size, the large array not (helper-89's
    `sizes_made_g.py`)."""
    big, scalar, add, mul = 1 << 16, 4, "aten.add.Tensor", "aten.mul.Tensor"

    def grown(functions, sizes, ran):
        trace = _fake_trace(functions, sizes)
        return plans.sizes_made(trace, plans.function_keys(trace), range(len(functions)), [
            plans.Ran(op, (n,), (n,), n <= plans.SMALL_OP_BYTES) for op, n in ran])

    # arrays: 0 a large input, 1 the large output, 2 and 4 scalars made, 3 a scalar input
    adds = [(add, (("read", 3), ("create", 2))), (add, (("read", 0), ("create", 1))),
            (add, (("read", 3), ("create", 4)))]
    assert grown(adds, [big, big, scalar, scalar, scalar],
                 [(add, 2 * big), (add, scalar)]) == {0: 2 * big, 1: 2 * big}
    muls = [(mul, (("read", 0), ("create", 1))), (mul, (("read", 3), ("create", 2)))]
    assert grown(muls, [big, big, scalar, scalar],
                 [(mul, scalar), (mul, 2 * big), (mul, scalar)]) == {0: 2 * big, 1: 2 * big}
    assert grown(muls[:1], [big, big], [(mul, scalar), (mul, 2 * big)]) == {0: 2 * big, 1: 2 * big}
    # ... and a small function grown, a large one, a small one the step did not run, all
    # of one name: the large op takes the large function, not the grown small one's
    # (helper-93: the first pass paired them one off and took the small's op for the large)
    threes = [(add, (("read", 0), ("create", 1))), (add, (("read", 2), ("create", 3))),
              (add, (("read", 4), ("create", 5)))]
    assert grown(threes, [scalar, scalar, big, big, scalar, scalar],
                 [(add, 8192), (add, 2 * big)]) == {0: 8192, 1: 8192, 2: 2 * big, 3: 2 * big}
    # ... but a large op smaller than its function (a step smaller there, larger later)
    # still pairs past the small function of its name, and the later op grows its own
    # (helper-94: with that rule alone, no pairing was found and nothing grew)
    ab = [(add, (("read", 3), ("create", 0))), (add, (("read", 4), ("create", 1))),
          (mul, (("read", 4), ("create", 2)))]
    assert grown(ab, [scalar, big, big, scalar, big],
                 [(add, big // 2), (mul, 2 * big)]) == {2: 2 * big, 4: 2 * big}
    # A small function on larger tensors, a large one of its name next: as they come.
    views = [("aten.view.default", (("read", 2), ("create", 3))),
             ("aten.view.default", (("read", 0), ("create", 1)))]
    assert grown(views, [big, big, scalar, scalar], [("aten.view.default", 2048),
                                                     ("aten.view.default", 2 * big)]) == {
        0: 2 * big, 1: 2 * big, 2: 2048, 3: 2048}


def test_a_growth_recorded_at_a_logging_step_grows_the_plan(tmp_path):
    """`loss.item()` every second step, lengths growing at random: a step that
    outgrows its plan is followed by a recording, and that recording, at a logging step
    or not, grows the plan (NOTE [Step shapes], rule 10). A recording whose small ops
    were not the plan's was of another family: the plan's entry waited, and the next
    step of its family was recorded again (iteration 20 here: helper-86's sixth,
    helper-89). Every recording after Adam's warm-up follows a step that outgrew its
    plan."""
    rng = random.Random(1)
    lengths = [rng.randint(8, min(8 + 3 * i, 80)) for i in range(22)]
    logged, calls = [], []

    def loss(logits, ids):
        out = _cross_entropy(logits, ids)
        calls.append(None)
        if len(calls) % 2:
            logged.append(out.item())
        return out
    its = _twins(lengths, tmp_path, loss=loss).iterations
    assert logged[:11] == logged[11:]
    assert all(its[i - 1].outgrew for i in range(2, len(its)) if its[i].mode == "record"), its


def _coin_toss_branch(steps, optimizer, leading_zero=False):
    """The training loop of a tiny transformer over `steps` of (batch, length, branch,
    ...): where `branch`, an auxiliary head on the mean of the hidden states adds to the
    loss. `leading_zero`: the loss starts from a scalar zero (one small op more)."""
    def train(ooc=None):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Embedding(512, 64), torch.nn.Linear(64, 512),
                                  torch.nn.GELU(), torch.nn.Linear(512, 64), torch.nn.LayerNorm(64))
        head, aux = torch.nn.Linear(64, 512), torch.nn.Linear(64, 8)
        whole = torch.nn.ModuleList([net, head, aux])
        opt = optimizer(whole.parameters(), lr=1e-3)
        for it, (batch, n, branch, *_) in enumerate(steps):
            ids = torch.randint(0, 512, (batch, n), generator=torch.Generator().manual_seed(it))
            with ooc.iteration() if ooc is not None else contextlib.nullcontext():
                h = net(ids)
                loss = (torch.zeros(()) + _cross_entropy(head(h), ids) if leading_zero
                        else _cross_entropy(head(h), ids))
                if branch:
                    loss = loss + torch.nn.functional.cross_entropy(aux(h.mean(1)), ids[:, 0] % 8)
                loss.backward()
                opt.step()
                opt.zero_grad()
        return whole
    return train


def test_a_branch_by_a_coin_toss_over_sizes_at_random_settles(tmp_path):
    """Batches of 4 or 8 sequences of 8 to 64 tokens, and 30% of steps (a coin toss) add
    an auxiliary head on the mean of the hidden states (helper-98: a tiny transformer so,
    18 recordings and 80 deviations in 300 iterations, 3 to 10 deviations in every 25 to
    the end). The branch is never predicted: its steps replay the plan of the other ops
    for the largest sizes and take up the branch's plan where they reach it (rule 9). That
    plan was taken up only where its labels' slice was small in both (which functions are
    small follows the sizes recorded), and it never grew: only a replay of it that
    outgrew it grew it, and it is only ever reached partway. A branch step larger than it
    now grows it (`Plans.outgrown_by`), and the recordings that asked for the branch and
    got the other ops grow that plan instead of adding one (`_plan_recording(asked=)`)."""
    coin = random.Random(4)
    steps = [(coin.choice([4, 8]), coin.randrange(8, 65, 8), coin.random() < 0.3)
             for _ in range(70)]

    its = _compare(_coin_toss_branch(steps, torch.optim.Adam), 4_500_000, tmp_path)
    assert sum(it.mode == "record" for it in its) <= 8, its
    # Before: the steps of the branch larger than its first recording deviated to the end.
    assert not any(it.deviation for it in its[-20:]), its
    assert sum(it.switched_at is not None for it in its[-20:]) >= 5, its


def test_a_plan_recorded_for_another_family_whose_envelope_does_not_fit_still_grows(
        tmp_path, monkeypatch):
    """A recording asked for one family (`Plans.asked`) that caught a step of another
    with a plan grows that plan (`_plan_recording(asked=...)`); where the two together do
    not fit the budget, the step's own record is planned. No step outgrew anything there:
    that plan grows as any other. Before, it was marked as one whose growth failed
    (`grows=False`), and the steps larger than it deviated to the end (here every grown
    trace is refused: 15 deviations in the last 20 iterations; 5 on the code before the
    borrowing)."""
    from outcore.errors import InfeasibleBudget
    from outcore.run import ooc as ooc_module
    last = {}
    without_held = ooc_module.without_held

    def remember(trace, *args, **kwargs):
        last["trace"] = trace
        return without_held(trace, *args, **kwargs)

    require = ooc_module.OutOfCore._require_feasible

    def only_records(self, plannable, budget, kept, recording, *args, **kwargs):
        if last["trace"] is not recording.trace:          # an envelope: "does not fit"
            err = InfeasibleBudget.__new__(InfeasibleBudget)
            Exception.__init__(err, "the envelope does not fit")
            raise err
        return require(self, plannable, budget, kept, recording, *args, **kwargs)

    monkeypatch.setattr(ooc_module, "without_held", remember)
    monkeypatch.setattr(ooc_module.OutOfCore, "_require_feasible", only_records)
    coin = random.Random(4)
    steps = [(coin.choice([2, 4, 6, 8]), coin.randrange(8, 65), coin.random() < 0.3,
              coin.random()) for _ in range(80)]

    its = _compare(_coin_toss_branch(steps, torch.optim.AdamW, leading_zero=True), 4_500_000,
                   tmp_path)
    assert sum(bool(it.deviation) for it in its[-20:]) <= 8, its
