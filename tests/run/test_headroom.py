"""NOTE [Far below the budget] (run/headroom.py): a step that left a plan that moves
nothing runs the rest op by op with less work while it holds far less than its budget,
bitwise equal to plain PyTorch, with the same report as op by op in full; it goes on in
full, within its budget, once it holds more; a storage it writes is never evicted as
clean; and what it counts as live is what lives."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import outcore
from outcore.run import headroom as headroom_module
from outcore.run.headroom import Headroom

WIDTH, BATCH = 256, 128


def _net():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"inp": torch.nn.Linear(32, WIDTH),
                                "hidden": torch.nn.Linear(WIDTH, WIDTH),
                                "out": torch.nn.Linear(WIDTH, 4)})


def _train(depths, ooc=None, optimizer=torch.optim.Adam, batches=None):
    """A net that applies its hidden layer `depth` times, a depth per iteration: a step
    whose ops follow the data, as a coin-tossed decoder's do; and a batch per iteration."""
    net = _net()
    opt = optimizer(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for depth, batch in zip(depths, batches or [BATCH] * len(depths)):
        x, y = torch.randn(batch, 32, generator=g), torch.randint(0, 4, (batch,), generator=g)
        with ooc.iteration() if ooc is not None else _nothing():
            _step(net, opt, x, y, depth)
    return net


def _step(net, opt, x, y, depth):
    """One step of the net at `depth`: forward, loss, zero_grad, backward, step."""
    h = torch.relu(net["inp"](x))
    for _ in range(depth):
        h = torch.relu(net["hidden"](h))
    loss = torch.nn.functional.cross_entropy(net["out"](h), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _counting(monkeypatch):
    """Count Headroom.run calls and Headroom.leave calls that evict."""
    calls = {"run": 0, "leave": 0}
    run, leave = Headroom.run, Headroom.leave

    def counted_run(self, *a):
        calls["run"] += 1
        return run(self, *a)

    def counted_leave(self, evict=True):
        calls["leave"] += evict
        return leave(self, evict)
    monkeypatch.setattr(Headroom, "run", counted_run)
    monkeypatch.setattr(Headroom, "leave", counted_leave)
    return calls


def _entering(monkeypatch):
    """Count deviations by whether the step left for being larger (rule 10), and those
    larger ones in which a Headroom was entered (at the first op run on demand, which
    `_deviate` runs where the op that left the plan had not run yet)."""
    from outcore.run.replay import Replayer
    counts = {False: 0, True: 0, "larger, entered": 0}
    deviate = Replayer._deviate

    def watched(self, reason, func, args, kwargs):
        larger = bool(self._larger)
        counts[larger] += 1
        enter = Headroom.enter
        made = []

        def noted(cls, *a):
            made.append(enter(*a))
            return made[-1]
        monkeypatch.setattr(Headroom, "enter", classmethod(noted))
        try:
            return deviate(self, reason, func, args, kwargs)
        finally:
            monkeypatch.setattr(Headroom, "enter", enter)
            counts["larger, entered"] += larger and any(m is not None for m in made)
    monkeypatch.setattr(Replayer, "_deviate", watched)
    return counts


def _report_rows(report):
    return [(it.mode, it.deviation, it.completed, it.bytes_written, it.bytes_read, it.outgrew)
            for it in report.iterations]


DEPTHS = [1, 1, 3, 1, 2, 4, 1, 3, 2, 1, 2, 2]
# Batches that grow where the depth stays: a replay leaves its plan reading a larger batch
# and then runs the plan's ops, so the plan grows (NOTE [Step shapes] rule 10), from what
# the ops read and made under the headroom.
GROWING = ([1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 1, 1],
           [128, 128, 128, 128, 160, 192, 128, 224, 256, 256, 288, 288])


@pytest.mark.parametrize("depths, batches", [(DEPTHS, None), GROWING],
                         ids=["depths", "growing-batches"])
def test_a_step_that_never_repeats_far_below_its_budget_runs_with_less_work(
        tmp_path, monkeypatch, depths, batches):
    """Depths (and batches) that change at a budget many times the step's peak: replays
    leave their plan and run the rest under the headroom, bitwise equal to plain PyTorch;
    the report (what ran, deviations, bytes moved, plans outgrown) and the plans kept are
    the same as with the rest run op by op in full (the headroom off)."""
    plain = _train(depths, batches=batches)
    calls = _counting(monkeypatch)
    entered = _entering(monkeypatch)
    with outcore.OutOfCore("64MiB", swap_dir=str(tmp_path)) as ooc:
        ours = _train(depths, ooc, batches=batches)
        report, shapes = ooc.report(), sorted(ooc._plans._plans)
    assert calls["run"] > 100 and calls["leave"] == 0, calls
    # Steps that left for being larger than the plan (rule 10) run under it too.
    assert entered[False] > 0 and (batches is None or entered["larger, entered"] > 0), entered
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), ours.parameters()))
    assert any(it.deviation for it in report.iterations), report
    assert batches is None or any(it.outgrew for it in report.iterations), report
    assert all(it.peak_resident <= 64 * 2**20 for it in report.iterations), report

    monkeypatch.setattr(headroom_module.Headroom, "enter", classmethod(lambda *a: None))
    calls["run"] = 0
    with outcore.OutOfCore("64MiB", swap_dir=str(tmp_path)) as ooc:
        full = _train(depths, ooc, batches=batches)
        full_report, full_shapes = ooc.report(), sorted(ooc._plans._plans)
    assert calls["run"] == 0
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), ours.parameters()))
    assert _report_rows(full_report) == _report_rows(report)
    assert full_shapes == shapes


def test_a_step_that_outgrows_the_headroom_goes_on_within_its_budget(tmp_path, monkeypatch):
    """Recorded at depth 1, a step of depth 40 holds 40 times two activations of 128 KiB
    (10 MiB) under a budget of 6 MiB: it leaves its plan under the headroom, which ends
    as the step nears the budget; the rest moves storages on demand, within the budget,
    bitwise equal to plain PyTorch."""
    budget = 6 * 2**20
    depths = [1, 1, 1, 40, 1, 40]
    plain = _train(depths, optimizer=torch.optim.SGD)
    calls = _counting(monkeypatch)
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path)) as ooc:
        ours = _train(depths, ooc, optimizer=torch.optim.SGD)
        report = ooc.report()
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), ours.parameters()))
    deep = [it for it, depth in zip(report.iterations, depths) if depth == 40]
    assert calls["run"] > 0 and calls["leave"] >= 1, calls
    assert deep[0].deviation is not None and deep[0].bytes_written > 0, report
    assert all(it.peak_resident <= budget for it in report.iterations), report


def test_a_clean_storage_written_under_the_headroom_is_written_when_evicted(tmp_path):
    """Rule 2: a storage resident with a clean copy on the slow tier, written in place
    under the headroom, is marked written, so that evicting it writes the new bytes (a
    clean one is let go without a write, and read back it would have its old ones)."""
    with outcore.OutOfCore("64MiB", swap_dir=str(tmp_path), min_move_bytes=0) as ooc:
        res = ooc._res
        t = torch.ones(4096)
        entry = res.track(t.untyped_storage())
        res.evict(entry)
        res.settle()
        res.ready(entry)
        assert entry.clean and torch.equal(t, torch.ones(4096))
        room = Headroom.enter(res, 64 * 2**20, [])
        assert room is not None
        room.run(torch.ops.aten.add_.Tensor, (t, torch.ones(4096)), {})
        assert not entry.clean
        res.evict(entry)
        res.settle()
        res.ready(entry)
        assert torch.equal(t, torch.full((4096,), 2.0))


def test_an_input_on_the_slow_tier_ends_the_headroom_before_the_op_runs(tmp_path):
    """Rule 2: `run` returns None, having run nothing, for an op whose input is not
    resident; the replayer then leaves and runs it on demand."""
    with outcore.OutOfCore("64MiB", swap_dir=str(tmp_path), min_move_bytes=0) as ooc:
        res = ooc._res
        t = torch.ones(4096)
        room = Headroom.enter(res, 64 * 2**20, [])
        entry = res.track(t.untyped_storage())
        res.evict(entry)
        res.settle()
        assert Headroom.enter(res, 64 * 2**20, []) is None       # rule 1
        assert room.run(torch.ops.aten.add_.Tensor, (t, torch.ones(1)), {}) is None
        res.ready(entry)
        assert torch.equal(t, torch.ones(4096))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["make", "drop", "grow", "inplace"]),
                          st.integers(1, 64)), max_size=30))
def test_what_the_headroom_counts_live_is_what_lives(tmp_path_factory, steps):
    """Rule 3: after any sequence of ops that make, keep, drop and write storages,
    `live` is the bytes of the storages made under the headroom that still live, and
    leaving it tracks exactly those."""
    swap = tmp_path_factory.mktemp("swap")
    with outcore.OutOfCore("64MiB", swap_dir=str(swap), min_move_bytes=0) as ooc:
        res = ooc._res
        room = Headroom.enter(res, 64 * 2**20, [])
        kept = [torch.zeros(1)]
        res.track(kept[0].untyped_storage())        # made before: tracked, not counted
        for op, n in steps:
            if op == "make":
                kept.append(room.run(torch.ops.aten.ones.default, ([n],), {})[0])
            elif op == "grow":
                a = kept[n % len(kept)]
                kept.append(room.run(torch.ops.aten.cat.default, ([a, a],), {})[0])
                del a
            elif op == "inplace":
                room.run(torch.ops.aten.mul_.Scalar, (kept[n % len(kept)], 2), {})
            elif len(kept) > 1:
                del kept[1 + n % (len(kept) - 1)]
        room.over()
        made_here = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in kept[1:]}
        assert room.live == sum(made_here.values())
        before = res.resident
        room.leave(evict=False)
        assert res.resident == before + sum(made_here.values())
        assert all(res.entry_of(t.untyped_storage()) is not None for t in kept)


def test_no_headroom_where_the_fast_tier_is_a_gpu():
    """Rule 1: on a GPU an op that passes the budget before it is seen could fail for
    want of memory; there the rest of a step always runs on demand."""
    from outcore.run.residency import Residency

    class Gpu:
        device_type, device_index = "cuda", 0

    class Ram:
        device_type = "cpu"
    assert Headroom.enter(Residency(Gpu()), 2**30, []) is None
    assert Headroom.enter(Residency(Ram()), 2**30, []) is not None


def _deviating(budget, extra, tmp_path, optimizer=torch.optim.SGD, before=None):
    """Three iterations at `budget`, the third deeper (it leaves its plan), which runs
    `extra(objects)` after its optimizer step; `before()` made before the loop. Returns
    (the error raised, if any; per iteration (peak, bytes written); the parameters; what
    `extra` returned)."""
    net = _net()
    opt = optimizer(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    made, error, got = before() if before else None, None, None
    tmp_path.mkdir(parents=True, exist_ok=True)
    with outcore.OutOfCore(budget, swap_dir=str(tmp_path)) as ooc:
        for it, depth in enumerate([1, 1, 3]):
            x, y = torch.randn(BATCH, 32, generator=g), torch.randint(0, 4, (BATCH,), generator=g)
            try:
                with ooc.iteration():
                    _step(net, opt, x, y, depth)
                    if it == 2:
                        got = extra(made)
            except outcore.InfeasibleBudget as err:
                error = err
        rows = [(it.peak_resident, it.bytes_written) for it in ooc.report().iterations]
    return error, rows, [p.detach().clone() for p in net.parameters()], got


def _on_and_off(monkeypatch, tmp_path, *args, **kwargs):
    """`_deviating` with the headroom, then without it."""
    on = _deviating(*args, tmp_path / "on", **kwargs)
    with monkeypatch.context() as m:
        m.setattr(Headroom, "enter", classmethod(lambda *a: None))
        off = _deviating(*args, tmp_path / "off", **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(on[2], off[2]))
    return on, off


def test_an_op_under_the_headroom_that_needs_more_than_the_budget_raises(tmp_path,
                                                                         monkeypatch):
    """helper-123: one op makes 24 MB under a budget of 16 MiB after the deviation; on
    demand the iteration raises InfeasibleBudget at its end, and so it does where the op
    ran under the headroom (it had returned before the check)."""
    def big(_):
        torch.full((6_000_000,), 2.0)
    on, off = _on_and_off(monkeypatch, tmp_path, 16 * 2**20, big)
    assert off[0] is not None and on[0] is not None
    assert on[0].min_feasible_bytes == off[0].min_feasible_bytes


def test_an_input_first_seen_under_the_headroom_gets_its_room_first(tmp_path, monkeypatch):
    """helper-123: a tensor made before the loop, read first after the deviation: 15 MiB
    by an op that makes 32 bytes, 9 MiB by one that makes 6 MiB of it. Tracked without
    room made first, the step passed its budget of 16 MiB; now such an op leaves the
    headroom and runs on demand, which makes the room (rules 2 and 4)."""
    def small(t):
        return torch.mul(t[:8], 2).sum().item()

    def large(t):
        return torch.mul(t[:6 * 2**20 // 4], 2).sum().item()
    for use, mib in ((small, 15), (large, 9)):
        on, off = _on_and_off(monkeypatch, tmp_path / use.__name__, 16 * 2**20, use,
                              optimizer=torch.optim.Adam,
                              before=lambda: torch.arange(mib * 2**20 // 4, dtype=torch.float32))
        assert on[0] is None and on[3] == off[3]
        assert max(peak for peak, _ in on[1]) <= 16 * 2**20, on[1]


def test_the_op_that_left_the_plan_is_counted_before_the_headroom_is_asked(tmp_path,
                                                                           monkeypatch):
    """helper-123: a replay left its plan after an op made 15 MiB where the record had
    4 KiB; rule 1 was asked before that op's output was counted, so the step ran under
    the headroom near its budget and the next op passed it. Now rule 1 is asked at the
    first op run on demand (the headroom is refused there), and the step stays within."""
    budget = 16 * 2**20
    depths = [1, 1, 2, 2, 1, 2, 1, 2, 1]
    pads = [1024] * 8 + [int(15.2 * 2**20) // 4]

    def run(path):
        net = _net()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        path.mkdir()
        with outcore.OutOfCore(budget, swap_dir=str(path)) as ooc:
            for n, depth in zip(pads, depths):
                x = torch.randn(BATCH, 32, generator=g)
                y = torch.randint(0, 4, (BATCH,), generator=g)
                with ooc.iteration():
                    _step(net, opt, x, y, depth)
                    pad = torch.full((n,), 1.0)             # a size the data gives
                    small = torch.full((64 * 1024,), 2.0)   # 256 KiB: below the margin
                    (pad.sum() + small.sum()).item()
                    del pad, small
            return [it.peak_resident for it in ooc.report().iterations]
    on = run(tmp_path / "on")
    with monkeypatch.context() as m:
        m.setattr(Headroom, "enter", classmethod(lambda *a: None))
        off = run(tmp_path / "off")
    assert max(on) <= budget and on[-1] <= off[-1], (on, off)


def test_what_an_op_makes_past_its_meta_kernel_is_learnt_under_the_headroom(tmp_path,
                                                                           monkeypatch):
    """helper-123: `OnDemand.after` remembers what an op made past what its meta kernel
    said (a size the data gives), so that its next call on demand gets the room; under
    the headroom that was skipped. The same is learnt now with it on as off."""
    def interleave(_):
        torch.repeat_interleave(torch.tensor([500_000]))
    _learnt_as_on_demand(interleave, "repeat_interleave", tmp_path, monkeypatch)


def _learnt_as_on_demand(extra, name, tmp_path, monkeypatch) -> None:
    """`_deviating` runs `extra` under the headroom, then with it off: what `learn_created`
    remembers of the ops called `name` is the same, and something."""
    from outcore.run import on_demand
    learnt = []
    for state in ("on", "off"):
        on_demand._CREATED.clear()
        on_demand._LEARNED.clear()
        with monkeypatch.context() as m:
            if state == "off":
                m.setattr(Headroom, "enter", classmethod(lambda *a: None))
            _deviating("64MiB", extra, tmp_path / state)
        learnt.append({str(key[0]): n for key, n in on_demand._LEARNED.items()
                       if name in str(key[0])})
    assert learnt[0] == learnt[1] and learnt[0], learnt


def test_a_storage_made_on_another_device_is_in_the_steps_shape(tmp_path, monkeypatch):
    """helper-123: an op under the headroom that made a storage on another device (a
    4 MiB meta tensor here; on a GPU tier a `.cpu()` copy) left it out of the step's
    shape, which op by op counts it (Residency NOTE 6: outside the budget, in the
    shape): the shapes now agree."""
    from outcore.run.replay import Replayer
    shapes = []
    finish = Replayer.finish

    def noted(self):
        finish(self)
        shapes.append((self.shape(), self.family()))
    monkeypatch.setattr(Replayer, "finish", noted)

    def meta(_):
        torch.empty(1024, 1024, device="meta")
    _on_and_off(monkeypatch, tmp_path, "64MiB", meta)
    assert len(shapes) == 4 and shapes[:2] == shapes[2:], shapes


def test_a_step_that_leaves_its_plan_at_a_collective_runs_it_on_demand(tmp_path, monkeypatch):
    """helper-124: a step that left its plan at a collective (an all_reduce the record
    does not have) entered the headroom inside `compose.around` and ran the collective
    under it, noted as small and left out of the step's shape; with it every second
    iteration, the plans kept and the report differed from op by op. Rule 5: a
    collective runs on demand, in the shape."""
    import torch.distributed as dist
    from outcore.run.replay import Replayer
    ran, shapes = [], []
    run, finish = Headroom.run, Replayer.finish

    def watched(self, func, *a):
        ran.append(func.namespace)
        return run(self, func, *a)

    def noted(self):
        finish(self)
        shapes.append(self.shape())
    monkeypatch.setattr(Headroom, "run", watched)
    monkeypatch.setattr(Replayer, "finish", noted)

    def train(path):
        net = _net()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        path.mkdir()
        with outcore.OutOfCore("64MiB", swap_dir=str(path)) as ooc:
            for it in range(10):
                x = torch.randn(BATCH, 32, generator=g)
                y = torch.randint(0, 4, (BATCH,), generator=g)
                with ooc.iteration():
                    h = torch.relu(net["hidden"](torch.relu(net["inp"](x))))
                    loss = torch.nn.functional.cross_entropy(net["out"](h), y)
                    opt.zero_grad()
                    loss.backward()
                    if it >= 3 and it % 2:
                        dist.all_reduce(net["out"].bias.grad)     # 16 bytes, off the record
                    opt.step()
            return (_report_rows(ooc.report()), sorted(ooc._plans._plans),
                    [p.detach().clone() for p in net.parameters()])

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        on = train(tmp_path / "on")
        on_shapes = shapes[:]
        shapes.clear()
        with monkeypatch.context() as m:
            m.setattr(Headroom, "enter", classmethod(lambda *a: None))
            off = train(tmp_path / "off")
    finally:
        dist.destroy_process_group()
    assert "c10d" not in ran and ran, sorted(set(ran))
    assert on[0] == off[0] and on[1] == off[1] and on_shapes == shapes
    assert all(torch.equal(a, b) for a, b in zip(on[2], off[2]))


def test_an_op_whose_largest_input_never_moves_is_learnt_as_on_demand(tmp_path, monkeypatch):
    """helper-124: `nonzero` (no meta kernel) of a 1 MiB `from_numpy` tensor (it never
    moves): op by op its room is its largest movable input, none, and what it made is
    learnt; the headroom compared with its largest input, moving or not, and learnt
    nothing."""
    import numpy as np
    values = np.zeros(262144, dtype=np.float32)
    values[::10] = 1.0

    def nonzero(_):
        torch.nonzero(torch.from_numpy(values))
    _learnt_as_on_demand(nonzero, "nonzero", tmp_path, monkeypatch)
