"""A loop whose steps take a few shapes (optimizer.step() every n-th iteration) gets a
plan per shape, and replays every iteration once it has seen each shape (NOTE [Step
shapes] in run/plans.py): bitwise equal to plain PyTorch, within the budget, through
interrupts in any shape."""
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import outcore
from outcore.run import plans
from outcore.run.plans import Plans, predict

from ..text import flat

BUDGET = 2_500_000


def _batches(count: int, batch: int = 32) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 128, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(count)]


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 384), torch.nn.ReLU(),
                               torch.nn.Linear(384, 384), torch.nn.GELU(),
                               torch.nn.Linear(384, 10))


def _accumulating(data, n: int):
    """A step(net, opt, i) that calls optimizer.step() every n-th iteration."""
    def step(net, opt, i):
        x, y = data[i]
        (torch.nn.functional.cross_entropy(net(x), y) / n).backward()
        if i % n == n - 1:
            opt.step()
            opt.zero_grad()
    return step


def _minimal_period(pattern) -> int:
    n = len(pattern)
    return next(p for p in range(1, n + 1)
                if n % p == 0 and all(pattern[i] == pattern[i % p] for i in range(n)))


@settings(max_examples=300, deadline=None)
@given(pattern=st.lists(st.integers(0, 3), min_size=1, max_size=8),
       noise=st.lists(st.integers(10, 13), max_size=4), extra=st.integers(0, 20))
def test_predict_follows_any_period_once_it_repeated(pattern, noise, extra):
    """After a few iterations of anything, a sequence of shapes that repeats with a
    period p (p at most MAX_PERIOD) for at least two periods and one more step is
    predicted right: the next shape, and that a period said so."""
    p = _minimal_period(pattern)
    pattern = pattern[:p]
    periodic = [pattern[i % p] for i in range(2 * p + 1 + extra)]
    shape, period = predict(noise + periodic)
    assert shape == pattern[len(periodic) % p], (noise, periodic)
    assert period == p, (noise, periodic)


def test_a_one_off_shape_is_no_period_and_the_last_plan_replays():
    """An epoch's short last batch (rule 3): no period 2 around it, and the step after it
    replays the plan of the shape before, not a recording."""
    assert predict(["a"] * 9 + ["s", "a"]) == ("a", 0)
    assert predict(["a"] * 9 + ["s"]) == ("s", 0)
    kept = Plans()
    kept._plans["a"] = plan = plans.Plan("a", None, None, [], (0, 0), 0, frozenset(), {})
    for shape in ["a"] * 9 + ["s"]:
        kept.seen(shape)
    assert kept.next() is plan          # "s" was seen once: the last shape with a plan
    kept.seen("s")
    assert kept.next() is None          # "s" again: from now on, recorded


@pytest.mark.parametrize("optimizer", ["adafactor", "adam-in-backward"])
def test_a_first_step_unlike_the_rest_is_recorded_again_at_once(optimizer):
    """Adafactor's first step makes its state, under MIN_MOVE_BYTES: the step after the
    first recording has another shape, and the one after that was replayed and
    deviated again (helper-74; rule 3 of NOTE [Step shapes] had it recorded then). Now
    state an optimizer keeps for a parameter that had none asks for a second recording
    whatever its size (`Recorder.made_optimizer_state`): no deviation at all. Adam
    stepped in post-accumulate-grad hooks (optimizer in backward) did the same: the
    recorder counted the moments it makes in backward as gradients. They are optimizer
    state, and the second iteration records, as for an optimizer stepped after
    backward."""
    data = _batches(7)

    def make():
        net = _mlp()
        if optimizer == "adafactor":
            opt = torch.optim.Adafactor(net.parameters(), lr=1e-2)
        else:
            opts = {p: torch.optim.Adam([p], lr=1e-3) for p in net.parameters()}

            def hook(p):
                opts[p].step()
                opts[p].zero_grad()
            for p in net.parameters():
                p.register_post_accumulate_grad_hook(hook)
            opt = None

        def step(i):
            x, y = data[i]
            torch.nn.functional.cross_entropy(net(x), y).backward()
            if opt is not None:
                opt.step()
                opt.zero_grad()
        return net, step
    (plain, plain_step), (ours, our_step) = make(), make()
    # Adafactor's state is small: its step's peak is 2.2 MB, the smallest budget 1.4 MB.
    with outcore.OutOfCore(budget=1_700_000 if optimizer == "adafactor" else BUDGET) as ooc:
        for i in range(len(data)):
            plain_step(i)
            with ooc.iteration():
                our_step(i)
        its = ooc.report().iterations
    assert [it.mode for it in its[:3]] == ["record", "record", "replay"], its
    assert its[2].deviation is None
    assert all(it.mode == "replay" and it.deviation is None for it in its[3:]), its
    assert sum(it.bytes_written for it in its[3:]) > 0          # the budget moved arrays
    assert _same(plain, ours)


def test_the_one_off_exception_is_taken_once_and_never_after_a_warm_up():
    """Rule 3's exception (the only plan, seen at its recording alone, made state):
    once per OutOfCore, and not where warm-up recordings were made already. LBFGS,
    whose history grows for several steps, had it recorded three times more, the
    exception starting a new run of warm-up recordings (helper-76)."""
    def plans_after(history, warm_up=()):
        kept = Plans()
        kept._plans["a"] = plans.Plan("a", None, None, [], (0, 0), 0, frozenset(), {},
                                      made_state=True)
        kept.warm_up.update(warm_up)
        for shape in history:
            kept.seen(shape)
        return kept
    kept = plans_after(["a", "b"])
    assert kept.next() is None                       # "a" was the one-off: record
    kept.seen("c")
    assert kept.next() is kept._plans["a"]           # not a second time
    assert plans_after(["w", "a", "b"], warm_up={"w"}).next() is not None


def test_a_first_step_that_made_no_state_is_no_one_off():
    """Rule 3's exception is for a first step that made optimizer state: the first
    micro-batch of an accumulation over two iterations makes none and comes back, so
    the third iteration replays its plan (a recording there cost one more, in a first
    version of the exception)."""
    report = _train(2, 4, "adam")[2]
    assert [it.mode for it in report.iterations] == ["record", "replay", "replay", "replay"]
    assert report.iterations[2].deviation is None


def _train(n: int, iterations: int, optimizer: str, budget=BUDGET, interrupt_at=()):
    """An MLP whose loop calls optimizer.step() every n-th iteration, plainly and under
    `budget`; a forward hook raises KeyboardInterrupt in the iterations in
    `interrupt_at` (both runs, at the same op), and the loop goes on. Returns (plain
    model, ours, the OutOfCore's report, its number of plans)."""
    def make():
        net = _mlp()
        opt = (torch.optim.Adam(net.parameters()) if optimizer == "adam" else
               torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
        state = {"raise": False}

        def hook(*_):
            if state["raise"]:
                state["raise"] = False
                raise KeyboardInterrupt
        net[2].register_forward_hook(hook)
        return net, opt, state
    accumulate = _accumulating(_batches(iterations), n)

    def step(net, opt, state, i):
        state["raise"] = i in interrupt_at
        accumulate(net, opt, i)
    plain, ours = make(), make()
    with outcore.OutOfCore(budget=budget) as ooc:
        for i in range(iterations):
            try:
                step(*plain, i)
            except KeyboardInterrupt:
                pass
            try:
                with ooc.iteration():
                    step(*ours, i)
            except KeyboardInterrupt:
                assert i in interrupt_at
        return plain[0], ours[0], ooc.report(), len(ooc._plans)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) and (x.grad is None) == (y.grad is None)
               and (x.grad is None or torch.equal(x.grad, y.grad))
               for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("n,optimizer", [(2, "adam"), (3, "sgd"), (4, "adam")])
def test_optimizer_step_every_nth_iteration_replays_every_shape(n, optimizer):
    """The first micro-batch makes the gradients, the middle ones add to them, the last
    one steps: a plan for each, and from the fifth cycle on at the latest (the first
    step, which makes Adam's state, is a shape of its own) every iteration replays one
    without deviating, moving state, within the budget, bitwise equal to plain PyTorch.
    (Before, every stepping iteration left its record and ran op by op, for ever.)"""
    plain, ours, report, kept = _train(n, 8 * n, optimizer)
    assert _same(plain, ours)
    assert kept == min(n, 3), report
    last = report.iterations[-4 * n:]
    assert all(it.mode == "replay" and it.deviation is None for it in last), report
    assert all(it.peak_resident <= BUDGET for it in report.iterations), report
    assert sum(it.bytes_written for it in last) > 0           # the budget made state move
    assert report.step_shapes == kept
    assert (f"plans: {kept} shapes of step, a plan each" in flat(report)) == (kept > 1)
    assert (f"recorded: the step of the last iteration, one of {kept} planned: "
            in flat(report)) == (kept > 1)
    assert type(report).from_dict(report.to_dict()).step_shapes == kept


def test_an_interrupt_in_any_shape_loses_nothing_and_training_goes_on():
    """Ctrl-C in each shape of the cycle once the plans are made (the first, a middle
    and the stepping micro-batch of an accumulation of 3): every parameter and
    gradient stays whole and equal to a plain run interrupted at the same op, and the
    loop replays again after it (an interrupted iteration leaves its shape unknown, and
    its cycle's steps take other shapes: the period is learnt again)."""
    n = 3
    plain, ours, report, _ = _train(n, 12 * n, "adam", interrupt_at=(4 * n, 5 * n + 1, 6 * n + 2))
    assert _same(plain, ours)
    assert [it.completed for it in report.iterations].count(False) == 3, report
    assert all(it.peak_resident <= BUDGET for it in report.iterations), report
    assert all(it.mode == "replay" and it.deviation is None for it in report.iterations[-n:]), report


def test_a_plan_that_moves_nothing_makes_ready_what_an_earlier_step_left_out():
    """The micro-batches' plans fit and move nothing (a replay then only follows the
    ops); the stepping one does not, and while it is learnt it runs on demand, leaving
    parameters on the slow tier. The next replay of a plan that moves nothing must make
    them ready: it ran an op on an emptied storage ("data is not allocated yet") where
    only a recording could come after a deviation."""
    n, width = 4, 512

    def make():
        torch.manual_seed(0)
        net = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(width, width),
                                                                   torch.nn.ReLU())])
        return net, torch.optim.Adam(net.parameters())
    x, y = torch.randn(64, width), torch.randn(64, width)

    def step(net, opt, i):
        torch.nn.functional.mse_loss(net(x), y).div(n).backward()
        if i % n == n - 1:
            opt.step()
            opt.zero_grad()
    plain, ours = make(), make()
    with outcore.OutOfCore(budget=12 * 2**20) as ooc:
        for i in range(4 * n):
            step(*plain, i)
            with ooc.iteration():
                step(*ours, i)
        report = ooc.report()
    assert _same(plain[0], ours[0])
    assert all(it.peak_resident <= 12 * 2**20 for it in report.iterations), report


def _loop(make, step, iterations, budget):
    """`step(net, opt, i)` plainly and under `budget`: (plain, ours, report)."""
    plain, ours = make(), make()
    with outcore.OutOfCore(budget=budget) as ooc:
        for i in range(iterations):
            step(*plain, i)
            with ooc.iteration():
                step(*ours, i)
        return plain, ours, ooc.report()


def test_small_state_only_the_stepping_shape_touches_stays_out_of_the_other_plans_budget():
    """Thirty layers whose parameters are under min_move_bytes: their Adam moments never
    move and only the stepping micro-batch touches them. The plan of the first
    micro-batch after a step counted none of them and ran 0.78 MB over the budget every
    cycle (a helper's review); unmovable storages the plan does not start from are let
    go as a step's end does (Residency NOTE 8)."""
    n, budget = 3, 7_200_000

    def make():
        torch.manual_seed(0)
        layers = [torch.nn.Linear(128, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 90)]
        for _ in range(30):
            layers += [torch.nn.ReLU(), torch.nn.Linear(90, 90)]
        net = torch.nn.Sequential(*layers, torch.nn.ReLU(), torch.nn.Linear(90, 10))
        return net, torch.optim.Adam(net.parameters())
    plain, ours, report = _loop(make, _accumulating(_batches(8 * n, 256), n), 8 * n, budget)
    assert _same(plain[0], ours[0])
    replays = [it for it in report.iterations if it.mode == "replay" and not it.deviation]
    assert replays and all(it.peak_resident <= budget for it in replays), report


@pytest.mark.parametrize("sizes", [6, 7])
def test_more_shapes_in_a_period_than_plans_kept_stop_recording(sizes):
    """A batch size that cycles through `sizes` sizes (a bucketed loader). Six get a
    plan each and replay; with seven, each recording dropped the plan needed next, and
    every iteration was recorded for ever (a helper's review): past MAX_PLANS the
    period's shapes are not recorded again, and the iterations deviate instead."""
    g = torch.Generator().manual_seed(0)
    batches = [16 + 8 * (i % sizes) for i in range(6 * sizes)]
    data = [(torch.randn(b, 128, generator=g), torch.randint(0, 10, (b,), generator=g))
            for b in batches]

    def make():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(128, 384), torch.nn.ReLU(),
                                  torch.nn.Linear(384, 384), torch.nn.GELU(),
                                  torch.nn.Linear(384, 10))
        return net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    def step(net, opt, i):
        x, y = data[i]
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    plain, ours, report = _loop(make, step, len(data), BUDGET)
    assert _same(plain[0], ours[0])
    last = report.iterations[-2 * sizes:]
    assert not [it for it in last if it.mode == "record"], report
    if sizes <= plans.MAX_PLANS:
        assert not [it for it in last if it.deviation], report


def _training_and_eval(iterations: int, optimizer):
    """(make, step) for `_loop`: a training step on batches of 32 and, every fourth
    iteration, an eval step under no_grad on a batch of 2048."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 128, generator=g), torch.randint(0, 10, (32,), generator=g))
            for _ in range(iterations)]
    evaluated = torch.randn(2048, 128, generator=g)

    def make():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(128, 384), torch.nn.ReLU(),
                                  torch.nn.Linear(384, 10))
        return net, optimizer(net.parameters())

    def step(net, opt, i):
        if i % 4 == 3:
            with torch.no_grad():
                net(evaluated).sum()
            return
        x, y = data[i]
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    return make, step


def test_an_eval_step_under_a_budget_that_moves_nothing_learns_its_shape():
    """Training every iteration and, every fourth, an eval step under no_grad with
    another batch size, at a budget where nothing moves. A replay that only follows
    op names took the record's sizes for the eval step's (a helper's review): the same
    step went into the history as two shapes, with recordings and deviations long
    after. Now both shapes are learnt and the last cycles replay without deviating."""
    plain, ours, report = _loop(*_training_and_eval(24, torch.optim.Adam), 24, 9_000_000)
    assert _same(plain[0], ours[0])
    last = report.iterations[-8:]
    assert all(it.mode == "replay" and not it.deviation for it in last), report


@pytest.mark.parametrize("stop", [5, 6])
def test_a_run_kept_in_state_dir_resumes_in_the_middle_of_an_accumulation(tmp_path, stop):
    """optimizer.step() every third iteration, with state_dir; the process stops after
    `stop` iterations (5: in the middle of a cycle, with two micro-batches' gradients
    accumulated; 6: at its end) and a new one resumes. The model, Adam's state and the
    gradients go on bitwise as in one plain run: the gradients are kept with the state
    (NOTE [Durable state], rule 10); before, a resume in the middle of a cycle lost
    them (a helper's review)."""
    n, total = 3, 12
    step = _accumulating(_batches(total), n)

    def make():
        net = _mlp()
        return net, torch.optim.Adam(net.parameters())
    plain = make()
    for i in range(total):
        step(*plain, i)
    state = str(tmp_path / "state")
    ours = make()
    with outcore.OutOfCore(BUDGET, state_dir=state, swap_dir=str(tmp_path)) as ooc:
        ooc.resume(*ours)
        for i in range(stop):
            with ooc.iteration():
                step(*ours, i)
    ours = make()                      # as a new process would build it
    with outcore.OutOfCore(BUDGET, state_dir=state, swap_dir=str(tmp_path)) as ooc:
        start = ooc.resume(*ours)
        assert start == stop
        for i in range(start, total):
            with ooc.iteration():
                step(*ours, i)
    assert _same(plain[0], ours[0])
    for a, b in zip(plain[1].state.values(), ours[1].state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_state_dir_of_a_loop_with_small_state_does_not_grow(tmp_path):
    """Every tensor under min_move_bytes, Adam, a step every third iteration, state_dir:
    each commit writes the small state it keeps to the file. Those the next plan does
    not start from are let go (Residency NOTE 8), and with them their slow copies;
    before, the copy stayed allocated while the storage lived, the next commit wrote a
    fresh one, and the file grew by about 1 MB a cycle without end (a helper's
    review)."""
    import glob
    import os
    n = 3
    data = _batches(15 * n)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.ReLU(), torch.nn.Linear(96, 96),
                              torch.nn.ReLU(), torch.nn.Linear(96, 10))
    opt = torch.optim.Adam(net.parameters())
    sizes = []
    with outcore.OutOfCore(3_000_000, state_dir=str(tmp_path / "state"),
                           swap_dir=str(tmp_path)) as ooc:
        ooc.resume(net, opt)
        for i, (x, y) in enumerate(data):
            with ooc.iteration():
                (torch.nn.functional.cross_entropy(net(x), y) / n).backward()
                if i % n == n - 1:
                    opt.step()
                    opt.zero_grad()
            sizes.append(sum(os.path.getsize(f) for f in glob.glob(str(tmp_path / "state" / "*.swap"))))
    assert sizes[-1] <= sizes[5 * n], sizes[::n]


def test_more_families_in_turn_than_plans_replay_the_last_plan():
    """Rule 2 with rule 3's guard: eight families in turn (a head per task, sizes that
    vary: a new shape every step) hold a period of 8, more than MAX_PLANS. A family
    with no plan is not recorded then (each recording would drop the plan needed
    next): the most recent plan replays (helper-86: every iteration was recorded)."""
    kept = Plans()
    for k in range(plans.MAX_PLANS):
        kept.add(plans.Plan(f"p{k}", None, None, [], (0, 0), 0, frozenset(), {}, family=f"f{k}"))
    for i in range(38):            # a replay of a plan has its shape; the others are new
        k = i % 8
        kept.seen(f"p{k}" if k < plans.MAX_PLANS else f"s{i}", f"f{k}")
    assert predict([s.family for s in kept.history]) == ("f6", 8)
    assert kept.next() is kept._plans[f"p{plans.MAX_PLANS - 1}"]
    kept.seen("s38", "f6")
    kept.seen("s39", "f7")          # then f0, which has a plan: it replays
    assert kept.next() is kept._plans["p0"]
    few = Plans()                   # three families in turn: the one with no plan is recorded
    few.add(plans.Plan("p0", None, None, [], (0, 0), 0, frozenset(), {}, family="f0"))
    for i in range(12):
        few.seen(f"s{i}", f"f{i % 3}")
    assert few.next() is few._plans["p0"]
    few.seen("s12", "f0")
    assert few.next() is None


def test_a_switch_at_a_larger_array_takes_up_no_plan_that_has_it_smaller():
    """Rule 9's `fits`: a step that left its plan at an array a function reads, larger
    than the plan has it, takes up another plan of the family only if that plan has the
    array no smaller there; else the step left that plan at the same array too, and the
    plan grew beside the one it left (helper-85: at function 0, where rule 9 compares no
    array yet, a first micro-batch's smaller plan was taken up; two or three plans a
    family). The most recently used plan that fits comes first and becomes the most
    recently used; none that fits: None."""
    from ..plan.helpers import build

    def plan(shape, batch):
        trace = build({"x": (batch, "input"), "w": (4096, "param"), "h": batch},
                      ["aten.mm r:x r:w c:h", "aten.relu_ w:h"])
        return plans.Plan(shape, trace, None, plans.function_keys(trace), (0, 0), 0,
                          frozenset(), {}, family="f")

    kept = Plans()
    for shape, batch in (("larger", 32768), ("large", 16384), ("small", 4096),
                         ("current", 8192)):
        kept.add(plan(shape, batch))
    current = kept._plans["current"]

    def taken(fits):
        found = kept.continuing(current, [], [], [], "aten.mm", fits=fits)
        return None if found is None else found[0].shape

    assert taken(None) == "small"                  # no array compared: the most recent
    assert taken((0, 12000)) == "large"            # x read at 12,000 B: small's is smaller
    assert list(kept._plans)[-1] == "large"        # ... and large is the most recent now
    assert taken((0, 20000)) == "larger"           # large's 16,384 B is too small
    assert taken((0, 40000)) is None               # none has x that large
    assert taken((1, 4096)) == "larger"            # w, the second array read: 4,096 B
    assert taken((1, 4097)) is None
    assert taken((5, 1)) is None                   # no such access: no plan has it


def test_the_envelope_of_two_records_holds_each_array_until_the_later_death():
    """Rule 10: two recordings of the same ops can differ in where a storage died (a
    collective's thread lets go of a buffer when its work completes: FSDP2's
    reduce-scatter input under gloo, after function 523 in one recording and 527 in the
    next, helper-92). The envelope took them for other steps: no growth took, the
    plan's `grows` turned False, and every longer step of the family ran on demand. It
    holds each array until the later of the two deaths (None: past the step's end) and
    is as large as the larger."""
    from ..plan.helpers import build

    def record(x_bytes, held):
        return build({"x": (x_bytes, "input"), "w": (64, "param"), "h": 32, "y": 32},
                     ["mm r:x r:w c:h", "relu r:h c:y", "sum r:y", "log r:w"], held=held)

    old, new = record(64, {"h": 1, "x": 2}), record(96, {"h": 3, "x": None})
    grown = plans.envelope(old, new, {2: 48})
    assert grown is not None
    assert [a.freed_after for a in grown.arrays] == [None, None, 3, 2]
    assert [a.nbytes for a in grown.arrays] == [96, 64, 48, 32]
    assert plans.envelope(new, old, {}) is not None
    assert [a.freed_after for a in plans.envelope(new, old).arrays] == [None, None, 3, 2]
    other = build({"x": (64, "input"), "w": (64, "param"), "h": 32, "y": 32},
                  ["mm r:x r:w c:h", "relu r:h c:y", "sum r:y", "log r:x"])
    assert plans.envelope(old, other) is None          # another array read: another step


def test_the_report_names_the_largest_in_core_peak_of_the_steps_planned():
    """With an eval step on a larger batch every fourth iteration, `in_core_peak` is the
    peak of the plan in use last (a training step's here), which is not the figure a
    user reading it to choose a budget wants (helper-92 read 2.29 MiB, the eval plan's,
    on one rank of FSDP2). `largest_in_core_peak` is the largest of every step planned,
    printed beside it, and kept through JSON."""
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    plain, ours, report = _loop(*_training_and_eval(23, sgd), 23, 9_000_000)
    assert _same(plain[0], ours[0])
    assert report.step_shapes == 2, report
    eval_peak = 2048 * 384 * 4                       # the eval step's hidden activations
    assert report.in_core_peak < eval_peak <= report.largest_in_core_peak, report
    assert "the largest of the steps planned" in flat(report)
    again = type(report).from_dict(report.to_dict())
    assert again.largest_in_core_peak == report.largest_in_core_peak
