"""Multi-device predictions from a single-process trace (outcore.simulate.cluster)."""
import dataclasses
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import outcore
from outcore.plan import min_feasible_budget
from outcore.simulate import PRESETS
from outcore.simulate import cluster
from outcore.errors import OutcoreError
from outcore.units import format_bytes
from outcore.simulate.comm import Interconnect


def record_tiny(width=256, depth=4, batch=8, optimizer="adam"):
    """A recorded training step of a small MLP: state-heavy (Adam keeps two moments per
    parameter) with activations a fraction of it. Costs are taken from the a100 model's
    roofline (FLOPs and bytes recorded), so predictions are deterministic."""
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, width), torch.randint(0, 10, (batch,))

    def step():
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    step()                              # optimizer state exists, as in steady state
    with outcore.record(label="tiny mlp") as rec:
        step()
    return rec.trace


@pytest.fixture(scope="module")
def tiny():
    return record_tiny()


def _machine(**changes):
    return dataclasses.replace(PRESETS["a100-40gb"], **changes)


def _link(bw, alpha=5e-6):
    return Interconnect(f"bw{bw:g}", alpha_s=alpha, bandwidth_Bps=bw, source="tests")


@pytest.mark.parametrize("strategy", cluster.STRATEGIES)
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_comm_never_makes_a_step_faster_and_exposed_is_part_of_it(tiny, strategy, ranks):
    p = cluster.predict(tiny, machine="a100-40gb", interconnect=_link(1e9), ranks=ranks,
                        strategy=strategy)
    assert p.step_s >= p.compute_s > 0
    assert 0 <= p.exposed_comm_s <= p.comm_s + 1e-15
    assert p.exposed_comm_s == pytest.approx(p.step_s - p.compute_s, abs=1e-12)
    assert p.fits and p.budget is None and p.ranks == ranks
    if ranks == 1:
        single = sum(PRESETS["a100-40gb"].compute_time(f) for f in tiny.functions)
        assert p.step_s == pytest.approx(single) and p.comm_s == 0
        assert p.throughput_relative == pytest.approx(1.0)


def test_ddp_buckets_follow_gradient_production(tiny):
    grads = [a for a in tiny.arrays if a.category == "gradient"]
    produced = cluster.gradient_production(tiny)
    assert sorted(a for _, a in produced) == sorted(a.id for a in grads)
    buckets = cluster.ddp_buckets(tiny, 64 * 1024)
    assert sum(b for _, b in buckets) == sum(a.nbytes for a in grads)
    ready = [i for i, _ in buckets]
    assert ready == sorted(ready)
    assert all(tiny.functions[i].phase == "backward" for i in ready)
    # One big bucket: the allreduce can only start when backward is over -> more exposed.
    late = cluster.predict(tiny, interconnect=_link(1e8), ranks=4, buckets="1GiB")
    early = cluster.predict(tiny, interconnect=_link(1e8), ranks=4, buckets="64KiB")
    assert early.exposed_comm_s <= late.exposed_comm_s


@settings(max_examples=15, deadline=None)
@given(bw=st.floats(1e6, 1e12), factor=st.floats(1.0, 100.0), alpha=st.floats(0, 1e-3),
       strategy=st.sampled_from(cluster.STRATEGIES), ranks=st.sampled_from([2, 4]))
def test_more_bandwidth_is_never_slower(tiny, bw, factor, alpha, strategy, ranks):
    slow = cluster.predict(tiny, interconnect=_link(bw, alpha), ranks=ranks, strategy=strategy)
    fast = cluster.predict(tiny, interconnect=_link(bw * factor, alpha), ranks=ranks, strategy=strategy)
    assert fast.step_s <= slow.step_s * (1 + 1e-12)


def test_fsdp_shards_state_that_ddp_replicates(tiny):
    ddp = cluster.predict(tiny, ranks=4, strategy="ddp")
    fsdp = cluster.predict(tiny, ranks=4, strategy="fsdp")
    state = sum(a.nbytes for a in tiny.arrays if a.category in cluster.STATE)
    assert state > tiny.peak(actual=True)[0] / 2           # the trace is state-heavy
    assert fsdp.per_rank_peak_bytes < ddp.per_rank_peak_bytes
    # FSDP pays for it in traffic: allgathers twice and reduce-scatters once per unit.
    assert fsdp.comm_s > ddp.comm_s


def test_batch_scaling_splits_activations_not_state(tiny):
    half = cluster.scale_trace(tiny, 0.5)
    _, first_opt = cluster._regions(tiny)
    for a, b in zip(tiny.arrays, half.arrays):
        if a.category in cluster.STATE or a.first_use >= first_opt:
            assert b.nbytes == a.nbytes
        else:
            assert b.nbytes == max(1, -(-a.nbytes // 2))
    for f, g in zip(tiny.functions, half.functions):
        assert g.flops == (round(f.flops / 2) if f.index < first_opt else f.flops)
    # The global batch split over 2 ranks: each rank's peak falls; a whole batch per rank
    # (global_batch_scaling=False) keeps the single-device peak and doubles the samples.
    split = cluster.predict(tiny, ranks=2)
    whole = cluster.predict(tiny, ranks=2, global_batch_scaling=False)
    assert split.per_rank_peak_bytes < whole.per_rank_peak_bytes
    assert whole.throughput_relative > split.throughput_relative
    with pytest.raises(outcore.OutcoreError, match="cannot be split over 8 ranks"):
        cluster.predict(tiny, ranks=8, batch=4)


@pytest.mark.parametrize("stages", [1, 2, 3, 5])
def test_pp_stages_cover_every_function(tiny, stages):
    split = cluster.pipeline_stages(tiny, stages)
    of = split["stage_of_function"]
    assert len(of) == len(tiny.functions) and set(of) == set(range(stages))
    first_bwd, _ = cluster._regions(tiny)
    assert of[:first_bwd] == sorted(of[:first_bwd])          # contiguous forward stages
    assert split["cuts"][0] == 0 and split["cuts"] == sorted(set(split["cuts"]))
    total = sum(PRESETS["a100-40gb"].compute_time(f) for f in tiny.functions)
    assert sum(split["forward_s"]) + sum(split["backward_s"]) + sum(split["optimizer_s"]) == \
        pytest.approx(total)
    assert len(split["send_bytes"]) == stages and split["send_bytes"][-1] == 0
    # Each stage's own sub-trace is a valid trace the planner accepts.
    for k in range(stages):
        sub = cluster._stage_trace(tiny, of, k)
        outcore.check(sub, outcore.plan(sub, max(sub.live_bytes(actual=True))), max(sub.live_bytes(actual=True)))
    with pytest.raises(outcore.OutcoreError, match="stages"):
        cluster.pipeline_stages(tiny, 10**6)


def test_pp_pipeline_formula(tiny):
    p = cluster.predict(tiny, ranks=2, strategy="pp", microbatches=6, interconnect=_link(1e30, 0.0))
    split = cluster.pipeline_stages(tiny, 2)
    slowest = max(f + b for f, b in zip(split["forward_s"], split["backward_s"])) / 6
    # (m + s - 1) slots of the slowest stage, then the slowest optimizer; free links.
    assert p.step_s == pytest.approx((6 + 1) * slowest + max(split["optimizer_s"]))
    assert p.microbatches == 6 and p.pp == 2 and p.dp == 1
    with pytest.raises(outcore.OutcoreError, match="microbatches"):
        cluster.predict(tiny, ranks=2, strategy="pp", microbatches=0)


def test_ranking_is_sorted_and_complete(tiny):
    rows = cluster.rank_configurations(tiny, device="a100-40gb", interconnect="pcie4", max_devices=4)
    keys = [(not r.fits, -r.throughput_relative) for r in rows]
    assert keys == sorted(keys)
    configs = {(r.ranks, r.strategy) for r in rows}
    assert configs == {(1, "single")} | {(n, s) for n in (2, 4) for s in cluster.STRATEGIES}
    assert all(r.fits and r.budget is None for r in rows)          # a tiny model fits
    text = cluster.format_table(rows)
    assert "single" in text and "fsdp" in text
    assert cluster.format_table(rows, markdown=True).startswith("| devices |")


def test_a_configuration_that_does_not_fit_in_core_is_marked(tiny):
    peak = tiny.peak(actual=True)[0]
    small = _machine(name="small", fast_bytes=int(peak * 0.8))
    rows = cluster.rank_configurations(tiny, device=small, interconnect="nvlink-a100", max_devices=2)
    single = [r for r in rows if r.strategy == "single"]
    in_core = next(r for r in single if r.budget is None)
    assert not in_core.fits and in_core.per_rank_peak_bytes > small.fast_bytes
    out = next(r for r in single if r.budget is not None)
    assert out.fits and out.budget == small.fast_bytes
    assert out.per_rank_peak_bytes <= small.fast_bytes and out.step_s >= in_core.step_s
    assert rows.index(out) < rows.index(in_core)                   # fitting rows first
    # A budget nothing can meet is a row that does not fit, with the reason.
    tiny_dev = _machine(name="tiny", fast_bytes=64)
    rows = cluster.rank_configurations(tiny, device=tiny_dev, interconnect="nvlink-a100", max_devices=1)
    assert [r.fits for r in rows] == [False, False]
    assert any("infeasible" in n or "leaves nothing" in n for r in rows for n in r.notes)
    with pytest.raises(outcore.OutcoreError, match="exceeds the device"):
        cluster.rank_configurations(tiny, device=small, max_devices=2, budgets=[10**12])


def test_a_ddp_budget_too_small_names_the_ranks_budget_and_minimum(tiny):
    """The planner gets the rank's budget less DDP's bucket buffers; when that cannot run
    the step, the error names the budget the user gave and the smallest per-rank budget
    that works (the planner's minimum plus the buckets), not the planner's figures."""
    in_core = cluster.predict(tiny, ranks=2, strategy="ddp")
    overhead = in_core.per_rank_peak_bytes - max(cluster._occupancy(
        cluster.scale_trace(tiny, 0.5)), default=0)
    budget = overhead + 1024
    with pytest.raises(outcore.InfeasibleBudget, match="per-rank budget of .* beside DDP's "
                       "bucket buffers") as err:
        cluster.predict(tiny, ranks=2, strategy="ddp", budget=budget)
    assert err.value.budget_bytes == budget and err.value.min_feasible_bytes > overhead
    # The minimum it names is feasible.
    cluster.predict(tiny, ranks=2, strategy="ddp", budget=err.value.min_feasible_bytes)


def test_budget_path_uses_the_planner(tiny, monkeypatch):
    calls = []
    plan_module = sys.modules["outcore.plan"]        # `outcore.plan` is also the function
    real = plan_module.plan

    def spy(trace, budget, *args, **kwargs):
        calls.append(budget)
        return real(trace, budget, *args, **kwargs)

    monkeypatch.setattr(plan_module, "plan", spy)
    in_core = cluster.predict(tiny, ranks=2, strategy="ddp")
    assert calls == []                                            # no budget: no planning
    roomy = cluster.predict(tiny, ranks=2, strategy="ddp", budget=10 * in_core.per_rank_peak_bytes)
    assert calls == [] and roomy.budget is None and roomy.step_s == in_core.step_s
    budget = int(in_core.per_rank_peak_bytes * 0.7)
    p = cluster.predict(tiny, ranks=2, strategy="ddp", budget=budget)
    assert len(calls) == 1 and calls[0] < budget                  # less DDP's bucket buffers
    assert p.budget == budget and p.per_rank_peak_bytes <= budget
    assert p.step_s >= in_core.step_s
    assert any("out-of-core" in n for n in p.notes)


def test_bad_inputs_name_the_choices(tiny):
    with pytest.raises(outcore.OutcoreError, match="ranks must be an integer >= 1"):
        cluster.predict(tiny, ranks=0)
    with pytest.raises(outcore.OutcoreError, match="choose from ddp, fsdp, pp"):
        cluster.predict(tiny, ranks=2, strategy="zero-7")
    with pytest.raises(outcore.OutcoreError, match="presets: loopback-gloo"):
        cluster.predict(tiny, ranks=2, interconnect="smoke-signals")
    with pytest.raises(outcore.OutcoreError, match="unknown machine"):
        cluster.predict(tiny, ranks=2, machine="abacus")
    with pytest.raises(outcore.OutcoreError, match="max_devices"):
        cluster.rank_configurations(tiny, max_devices=0)


def test_fsdp_with_one_unit_gathers_it_once_and_a_bad_batch_is_refused(tiny):
    """helper-73: with a single FSDP unit the estimate added the unit three times (running,
    prefetched, gradients), though there is no other unit to prefetch; and a batch of 0
    reached the pipeline's microbatch check, whose error named an argument never passed
    (`outcore plan --cluster --batch 0` ended "no configuration fits", rc 0)."""
    huge = 2**40                        # one unit: every parameter
    one = cluster.predict(tiny, ranks=2, strategy="fsdp", buckets=huge)
    units = cluster.fsdp_units(tiny, huge)
    assert len(units) == 1
    biggest = sum(tiny.arrays[a].nbytes for a in units[0])
    assert any(f"+{format_bytes(2 * biggest)} for gathered parameters (1 unit)" in n
               for n in one.notes), one.notes
    for bad in (0, -3):
        with pytest.raises(OutcoreError, match="batch must be an integer >= 1"):
            cluster.predict(tiny, ranks=2, strategy="pp", batch=bad)
        with pytest.raises(OutcoreError, match="batch must be an integer >= 1"):
            cluster.rank_configurations(tiny, batch=bad)


def test_a_sweeps_top_budget_is_the_step_in_core(tiny):
    """helper-73: `outcore simulate --sweep N` ended at trace.peak()[0], which leaves out
    arrays PyTorch holds past their last use, so its "in-core" row moved bytes."""
    from types import SimpleNamespace

    from outcore.cli.simulate_cmd import _budgets
    budgets = _budgets(SimpleNamespace(sweep=2, budget=None), tiny, "cpu-disk")
    top = max(budgets)
    assert top == tiny.peak(actual=True)[0]
    assert outcore.plan(tiny, top).bytes_moved == 0
    # helper-162: the first row was the plan's own least budget, which OutOfCore refuses
    # (it keeps small arrays beside the plan); it is OutOfCore's least now.
    assert min(budgets) == outcore.smallest_budget(tiny) > min_feasible_budget(tiny)
