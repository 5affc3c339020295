"""Recompute in the plan (plan/recompute.py): which arrays, the rewritten trace, and the
rules `check` enforces on it (R1 for what a repeat reads, R9 for what it repeats)."""
from __future__ import annotations

import dataclasses
import importlib

import pytest
from hypothesis import given, settings, strategies as st

import outcore
from outcore.errors import InfeasibleBudget, ScheduleError
from outcore.plan import check, plan
from outcore.plan import recompute
from outcore.plan.feasibility import min_feasible_budget
from outcore.plan.schedule import SWAP_IN, SWAP_OUT, WAIT, Action
from outcore.simulate import machine as get_machine, simulate
from outcore.trace.model import Trace

from .helpers import build

CONV, BN, RELU = "aten.convolution.default", "aten.native_batch_norm.default", "aten.relu_.default"


def layered(sizes, *, write_between=False, dropout=False):
    """A ResNet-like step: per layer conv -> batch norm (updating its running mean) ->
    in-place ReLU, then backward in reverse, then SGD on the weights."""
    arrays = {"x": (sizes[0], "input")}
    fwd, bwd, opt = [], [], []
    h = "x"
    for l, n in enumerate(sizes[1:]):
        arrays.update({f"w{l}": (4, "param"), f"rm{l}": (4, "param"), f"c{l}": n, f"b{l}": n,
                       f"gb{l}": n, f"gc{l}": n, f"gw{l}": 4, f"gh{l}": sizes[l]})
        fwd += [f"{CONV} r:{h} r:w{l} c:c{l}", f"{BN} r:c{l} w:rm{l} c:b{l}", f"{RELU} w:b{l}"]
        if dropout and l == 0:
            arrays[f"m{l}"] = n
            fwd += [f"aten.bernoulli_.float c:m{l}", f"aten.mul_.Tensor w:b{l} r:m{l}"]
        h = f"b{l}"
    arrays["loss"] = 4
    fwd.append(f"loss r:{h} c:loss")
    if write_between:
        fwd.append("aten.add_.Tensor w:w0")          # an input of conv 0 changes after it
    bwd.append(f"lossb r:loss r:{h} c:gb{len(sizes) - 2} @backward")
    for l in reversed(range(len(sizes) - 1)):
        bwd += [f"relub r:gb{l} r:b{l} c:gc{l} @backward",
                f"bnb r:gc{l} r:c{l} c:gh{l} @backward" if l == 0 else
                f"bnb r:gc{l} r:c{l} c:gb{l - 1} @backward",
                f"convb r:gc{l} r:{'x' if l == 0 else f'b{l - 1}'} r:w{l} c:gw{l} @backward"]
        opt.append(f"sgd w:w{l} r:gw{l} @optimizer")
    used = {tok.split(":")[1] for line in fwd + bwd + opt for tok in line.split()[1:]
            if ":" in tok}
    return build({k: v for k, v in arrays.items() if k in used}, fwd + bwd + opt)


def test_candidates_follow_the_rules():
    t = layered([8, 16, 16, 16], dropout=True)
    chosen = recompute.candidates(t)
    ops = {t.functions[c.producer].op for c in chosen}
    assert ops == {CONV, BN}
    ys = {c.array for c in chosen}
    # rule 2: the first batch norm's output is written by dropout's mul_: not recomputed
    assert all(t.functions[c.producer].phase == "forward" for c in chosen)
    first_bn = next(f.index for f in t.functions if f.op == BN)
    assert not any(c.producer == first_bn for c in chosen)
    # relu_ right after a batch norm is its follower
    assert all(c.follower == c.producer + 1 for c in chosen if t.functions[c.producer].op == BN)
    # rule 3 without chains: no convolution reads a recomputed array
    for c in chosen:
        if t.functions[c.producer].op == CONV:
            assert not {a.array for a in t.functions[c.producer].accesses
                        if a.kind == "read"} & ys


def test_an_input_written_in_between_is_never_recomputed_from():
    t = layered([8, 16], write_between=True)
    assert all(t.functions[c.producer].op != CONV for c in recompute.candidates(t))


def test_rewrite_moves_each_recompute_before_its_first_backward_use_and_check_agrees():
    t = layered([8, 16, 16, 16])
    chosen = recompute.candidates(t, chains=True)
    r = recompute.rewrite(t, chosen)
    assert len(r.functions) == len(t.functions) + sum(2 if c.follower >= 0 else 1 for c in chosen)
    for fn in r.functions:
        if fn.repeats is not None:
            made = [a.array for a in fn.accesses if a.kind != "read"]
            later = [g for g in r.functions[fn.index + 1:] if made[0] in g.arrays()]
            assert fn.phase == "backward" and later
    for budget in (r.peak()[0], min_feasible_budget(r)):
        check(r, plan(r, budget), budget)


def test_temporaries_are_made_for_one_repeat_and_freed_after_it():
    # NOTE [Temporaries]: every chained input is a temporary where an earlier repeat
    # needs it, and is made again where backward first needs it.
    t = layered([8, 16, 16, 16])
    chosen = [dataclasses.replace(c, temporary=True)
              for c in recompute.candidates(t, chains=True)]
    r = recompute.rewrite(t, chosen)
    made = [(fn.index, a.array) for fn in r.functions if fn.repeats is not None
            for a in fn.accesses if a.kind == "create"]
    assert len(made) > len(chosen)                       # some arrays are made twice
    temporary = [a for _, a in made if r.arrays[a].freed_after == r.arrays[a].last_use
                 and r.functions[r.arrays[a].last_use].repeats is not None]
    assert len(temporary) == len(made) - len(chosen)
    for a in temporary:                                  # read by the next repeat alone
        readers = [fn.index for fn in r.functions if a in fn.arrays()]
        assert all(r.functions[f].repeats is not None for f in readers)
    recompute.verify(r)
    for budget in (r.peak()[0], min_feasible_budget(r)):
        check(r, plan(r, budget), budget)


@pytest.mark.parametrize("temporary", [False, True])
def test_what_plain_pytorch_holds_is_the_recorded_steps_whatever_is_recomputed(temporary,
                                                                               tmp_path):
    """The views' in-core curve (plain PyTorch) of a trace with repeats is the recorded
    step's, function by function; a repeat's row is the one before it (helper-204: the
    recomputing step's memory was drawn as plain PyTorch's). It survives save and load."""
    t = layered([8, 16, 16, 16])
    chosen = [dataclasses.replace(c, temporary=temporary)
              for c in recompute.candidates(t, chains=True)]
    r = recompute.rewrite(t, chosen)
    r.save(tmp_path / "r.json")
    for rewritten in (r, Trace.load(tmp_path / "r.json")):
        plain = recompute.plain_live_bytes(rewritten)
        assert len(plain) == len(rewritten.functions)
        originals = [b for fn, b in zip(rewritten.functions, plain) if fn.repeats is None]
        assert originals == t.live_bytes(actual=True)
        assert max(plain) == t.peak(actual=True)[0]
        held = rewritten.live_bytes(actual=True)        # the recomputing step's, lower
        assert any(p > h for p, h in zip(plain, held))
        for fn in rewritten.functions[1:]:
            if fn.repeats is not None:
                assert plain[fn.index] == plain[fn.index - 1]
    assert recompute.plain_live_bytes(t) == t.live_bytes(actual=True)
    from outcore.view.occupancy import by_category
    assert list(by_category(r, plan(r, r.peak()[0])).in_core) == recompute.plain_live_bytes(r)


def test_the_rewritten_trace_saves_and_loads(tmp_path):
    t = layered([8, 16, 16])
    r = recompute.rewrite(t, recompute.candidates(t))
    r.save(tmp_path / "t.json")
    assert Trace.load(tmp_path / "t.json").functions == r.functions


def test_r9_refuses_a_repeat_whose_input_was_written_in_between():
    t = layered([8, 16, 16])
    r = recompute.rewrite(t, recompute.candidates(t))
    k = next(f for f in r.functions if f.repeats is not None and f.op == recompute.PREFIX + CONV)
    x = next(a.array for a in k.accesses if a.kind == "read" and r.arrays[a.array].kind == "persistent")
    writer = r.functions[k.index - 1]
    bad = dataclasses.replace(writer, accesses=writer.accesses + (outcore.trace.model.Access(x, "write"),))
    broken = Trace(functions=r.functions[:k.index - 1] + (bad,) + r.functions[k.index:],
                   arrays=r.arrays, device=r.device, durations=r.durations)
    with pytest.raises(ScheduleError, match="R9.*written by function"):
        recompute.verify(broken)


def test_r9_refuses_a_repeat_of_another_op():
    t = layered([8, 16])
    r = recompute.rewrite(t, recompute.candidates(t))
    k = next(f for f in r.functions if f.repeats is not None)
    fns = list(r.functions)
    fns[k.index] = dataclasses.replace(k, repeats=k.repeats + 1)
    broken = Trace(functions=tuple(fns), arrays=r.arrays, device=r.device, durations=r.durations)
    with pytest.raises(ScheduleError, match="R9"):
        recompute.verify(broken)


def _starve(schedule, k: int, x: int):
    """The schedule with array x made to be on the slow tier when function k runs: its
    swap-in serving k removed, or (resident since before) written out right before k."""
    begin, end = [list(a) for a in schedule.begin], [list(a) for a in schedule.end]
    for j in range(k, -1, -1):
        hit = [a for a in begin[j] if a == Action(SWAP_IN, x)]
        if hit:
            begin[j].remove(hit[0])
            break
    else:
        end[k - 1] += [Action(SWAP_OUT, x), Action(WAIT, x)]
    return dataclasses.replace(schedule, begin=tuple(map(tuple, begin)),
                               end=tuple(map(tuple, end)))


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(4, 64), min_size=2, max_size=5),
       fraction=st.floats(0.3, 1.0), chains=st.booleans(), data=st.data())
def test_check_rejects_a_recompute_whose_inputs_are_not_resident(sizes, fraction, chains, data):
    t = layered(sizes)
    r = recompute.rewrite(t, recompute.candidates(t, chains=chains))
    low, peak = min_feasible_budget(r), r.peak()[0]
    budget = max(low, int(peak * fraction))
    try:
        s = plan(r, budget)
    except InfeasibleBudget:
        return
    check(r, s, budget)                                  # the plan itself is valid
    repeats = [f for f in r.functions if f.repeats is not None and f.op.endswith(CONV)]
    if not repeats:
        return
    k = data.draw(st.sampled_from(repeats))
    x = data.draw(st.sampled_from([a.array for a in k.accesses if a.kind == "read"]))
    # x is last accessed before k by some function; find where it was last used
    last = max((g.index for g in r.functions[:k.index] if x in g.arrays()), default=-1)
    if last < 0 and not r.arrays[x].existed_before:
        return
    with pytest.raises(ScheduleError, match="R1|R4|R5|R7"):
        check(r, _starve(s, k.index, x), budget)


def _link(bytes_per_s: float):
    return dataclasses.replace(get_machine("cpu-disk"), name="test", link_in=bytes_per_s,
                               link_out=bytes_per_s)


@pytest.mark.parametrize("sizes", [[16, 16, 16], [4, 64, 64, 64], [8, 64, 64], [4, 32, 32, 32, 32]])
def test_auto_recomputes_where_moving_is_slow_and_not_where_it_is_fast(sizes):
    t = layered(sizes)                       # every function takes 1 ms
    budget = max(min_feasible_budget(t), int(t.peak()[0] * 0.9))
    chosen, r, s = recompute.choose(t, budget, mode="auto", machine=_link(1e3))  # 16 B: 16 ms
    assert chosen and r is not t
    check(r, s, budget)
    slow = simulate(r, s, _link(1e3)).iteration_time_s
    assert slow <= (1 - recompute.MARGIN) * simulate(t, plan(t, budget), _link(1e3)).iteration_time_s
    chosen, r, _ = recompute.choose(t, budget, mode="auto", machine=_link(1e12))  # 0.2 ms
    assert chosen == [] and r is t
    assert recompute.candidates(t, machine=_link(1e12)) == []


def test_speed_is_against_the_step_without_its_recomputes():
    """A rewritten trace's simulation counts the repeats' compute apart (recompute_s):
    its in-core time for the speed is plain PyTorch's step, the trace as recorded, not
    the recorded step plus the recomputes (which overstated the speed)."""
    t = layered([4, 64, 64, 64])
    budget = max(min_feasible_budget(t), int(t.peak()[0] * 0.9))
    chosen, r, s = recompute.choose(t, budget, mode="auto", machine=_link(1e3))
    sim = simulate(r, s, _link(1e3))
    plain = simulate(t, plan(t, t.peak(actual=True)[0]), _link(1e3))
    repeats = sum(fn.duration_s for fn in r.functions if fn.repeats is not None)
    assert chosen and repeats > 0 and sim.recompute_s == pytest.approx(repeats)
    assert sim.plain_time_s == pytest.approx(plain.in_core_time_s)
    assert sim.speed_vs_in_core == pytest.approx(plain.in_core_time_s / sim.step_time_s)


def test_small_arrays_are_not_recomputed():
    t = layered([8, 16, 64])
    assert {t.arrays[c.array].nbytes for c in recompute.candidates(t, min_bytes=32)} == {64}


def test_r9_refuses_a_repeat_that_reads_less_than_its_original():
    t = layered([8, 16])
    r = recompute.rewrite(t, recompute.candidates(t))
    k = next(f for f in r.functions if f.repeats is not None and f.op.endswith(CONV))
    fns = list(r.functions)
    fns[k.index] = dataclasses.replace(k, accesses=k.accesses[1:])
    broken = Trace(functions=tuple(fns), arrays=r.arrays, device=r.device, durations=r.durations)
    with pytest.raises(ScheduleError, match="does not read what the original read"):
        recompute.verify(broken)


def test_r9_refuses_a_follower_away_from_its_producer():
    t = layered([8, 16])
    r = recompute.rewrite(t, recompute.candidates(t))
    k = next(f for f in r.functions if f.repeats is not None and f.op.endswith(RELU))
    fns = list(r.functions)
    fns[k.index - 1], fns[k.index] = fns[k.index], fns[k.index - 1]
    fns = [dataclasses.replace(f, index=i) for i, f in enumerate(fns)]
    broken = Trace(functions=tuple(fns), arrays=r.arrays, device=r.device, durations=r.durations)
    with pytest.raises(ScheduleError, match="R9"):
        recompute.verify(broken)


def test_cuda_traces_recompute_only_with_deterministic_algorithms(monkeypatch):
    import torch
    t = dataclasses.replace(layered([8, 16]), device="cuda:0")
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    assert recompute.candidates(t) == []
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert recompute.candidates(t)


def test_choose_refuses_a_bad_mode():
    with pytest.raises(outcore.OutcoreError, match="recompute must be"):
        recompute.choose(layered([8, 16]), 1 << 20, mode="sometimes")
    # The command line's word for True is refused with it named (helper-204).
    with pytest.raises(outcore.OutcoreError, match="True .*the command line's --recompute all"):
        outcore.OutOfCore(1 << 20, recompute="all")


def test_outcore_plan_recompute_all_writes_the_trace_its_schedule_is_for(tmp_path, capsys):
    from outcore.cli.main import main
    from outcore.plan.schedule import Schedule
    path, out = tmp_path / "t.json", tmp_path / "s.json"
    t = layered([8, 16, 16])
    t.save(path)
    budget = f"{min_feasible_budget(recompute.rewrite(t, recompute.candidates(t)))}B"
    assert main(["plan", str(path), "--budget", budget, "--recompute", "all", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recomputes" in printed and "recompute:aten.convolution.default" in printed
    r = Trace.load(str(out) + ".trace.json")
    check(r, Schedule.load(out))
    assert main(["plan", str(path), "--budget", f"{t.peak()[0]}B"]) == 0
    assert "recomputes" not in capsys.readouterr().out      # default: the trace as given


def test_a_repeat_needs_no_more_than_its_producer_did():
    # Rule 5: y's storage takes over the repeat's output memory, so a repeat holds what
    # its producer held (its inputs, y, its workspace and other outputs): every budget
    # the step fits, its rewritten step fits too, down to the smallest.
    for t in (layered([64, 64, 64]), layered([16, 64, 32, 8], dropout=True)):
        low = min_feasible_budget(t)
        chosen = recompute.candidates(t)
        assert chosen and min_feasible_budget(recompute.rewrite(t, chosen)) == low
        chosen, r, s = recompute.choose(t, low, mode=True)
        assert chosen and r is not t
        check(r, s, low)


def test_outcore_simulate_recompute(tmp_path, capsys):
    from outcore.cli.main import main
    path = tmp_path / "t.json"
    t = layered([4, 64, 64, 64])
    t.save(path)
    budget = f"{int(t.peak()[0] * 0.9)}B"
    assert main(["simulate", str(path), "--budget", budget, "--recompute", "all"]) == 0
    rewritten = recompute.rewrite(t, recompute.candidates(t))
    remade = len(rewritten.functions) - len(t.functions)
    assert (f"trace: {len(rewritten.functions):,} functions ({remade:,} of them recomputing "
            f"activations), {len(rewritten.arrays):,} arrays, in-core peak "
            f"{outcore.units.format_bytes(t.peak()[0])},") in capsys.readouterr().out
    assert main(["simulate", str(path), "--budget", budget + "," + f"{t.peak()[0]}B",
                 "--recompute", "all"]) == 0
    assert " rc " in capsys.readouterr().out
    assert main(["simulate", str(path), "--budget", budget, "--ranks", "2",
                 "--recompute", "all"]) == 2
    assert "--recompute goes with a single-device" in capsys.readouterr().err
    # `outcore plot` takes --recompute as simulate does (helper-81: it had none).
    assert main(["plot", str(path), "--budget", budget, "--recompute", "all",
                 "-o", str(tmp_path / "r.svg")]) == 0
    assert f"({len(recompute.candidates(t))} activations recomputed)" in capsys.readouterr().out
    assert "<svg" in (tmp_path / "r.svg").read_text()


def test_nothing_touching_a_foreign_array_is_recomputed():
    """Rule 8: a producer that reads a storage another library manages (FSDP2's
    unsharded parameters) is never repeated."""
    t = layered([8, 16, 16])
    w0 = next(a.id for a in t.arrays if a.kind == "persistent")
    touching = {c.producer for c in recompute.candidates(t)
                if w0 in t.functions[c.producer].arrays()}
    assert touching
    kept = recompute.candidates(t, foreign=frozenset({w0}))
    assert kept and not touching & {c.producer for c in kept}


def test_a_step_that_fits_is_never_recomputed():
    t = layered([8, 16, 16])
    chosen, r, s = recompute.choose(t, t.peak(actual=True)[0], mode=True)
    assert chosen == [] and r is t and s.bytes_moved == 0


@pytest.mark.parametrize("sizes", [[4, 64, 64, 64], [4, 32, 32, 32, 32]])
def test_auto_keeps_the_faster_of_recomputing_without_chains_and_with_them(sizes):
    t = layered(sizes)
    budget = max(min_feasible_budget(t), int(t.peak()[0] * 0.9))
    m = _link(1e3)
    planned = {}
    for chains in (False, True):
        c = recompute.candidates(t, machine=m, chains=chains)
        r = recompute.rewrite(t, c)
        planned[chains] = (simulate(r, plan(r, budget, machine=m), m).iteration_time_s, c)
    assert planned[False][1] != planned[True][1]          # chains add convolutions
    chosen, r, s = recompute.choose(t, budget, mode="auto", machine=m)
    check(r, s, budget)
    fastest = min(planned.values(), key=lambda v: v[0])   # a tie keeps the one without
    assert chosen == fastest[1]
    assert recompute.choose(t, budget, mode=True, machine=m)[0] == planned[False][1]


def test_auto_plans_the_rewritten_trace_with_the_configuration_it_chose_for_the_recorded_one():
    t = layered([4, 64, 64, 64])
    budget = max(min_feasible_budget(t), int(t.peak()[0] * 0.5))   # moves with recompute too
    m = _link(1e3)
    base = plan(t, budget, machine=m)
    chosen, r, s = recompute.choose(t, budget, mode="auto", machine=m)
    assert chosen
    assert len(s.options["screened"]) == 1
    assert s.options["configuration"] == base.options["configuration"]
    check(r, s, budget)


def test_auto_plans_the_rewritten_trace_with_the_share_it_chose_for_the_recorded_one(monkeypatch):
    # auto chose the whole budget for state kept at the end (its NOTE [Shares at the
    # end]) for the trace as recorded; each rewritten trace is planned with it too.
    t = layered([4, 32, 32, 32, 32])
    m = _link(1e3)
    base = plan(t, 120, machine=m)
    assert base.options["end_keep_share"] == 1.0
    planned = []

    def spy(trace, budget, policy="auto", **options):
        planned.append((trace is t, options))
        return plan(trace, budget, policy, **options)
    api = importlib.import_module("outcore.plan.api")      # outcore.plan is the function
    monkeypatch.setattr(api, "plan", spy)                  # recompute.choose imports
    recompute.choose(t, 120, mode="auto", machine=m)
    rewritten = [options for original, options in planned if not original]
    assert rewritten and all(o["end_keep_share"] == 1.0 and o["screen"] ==
                             [base.options["configuration"]] for o in rewritten)
