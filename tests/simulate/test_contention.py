"""NOTE [No core to spare] (simulate/engine.py): with no core free for helper threads,
their CPU costs a rank nothing while it waits and slows what it computes meanwhile."""
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import outcore
from outcore.plan.feasibility import min_feasible_budget
from outcore.simulate import simulate_ranks

from ..plan.helpers import build, traces
from .test_comm import SLOW, TOY

GLOO_LIKE = dataclasses.replace(SLOW, cpu_share=0.5)
TWO_CORES = dataclasses.replace(TOY, cores=2)


def _ddp_like(rest_s):
    # f0 makes a gradient g; f1 allreduces it (8 B at 1 B/s: 8 s); f2 is unrelated work
    # of rest_s; f3 reads g.
    return build({"x": (4, "input"), "w": (4, "param"), "g": 8, "h": 4},
                 ["aten.mm.default r:x c:g", "c10d.allreduce_.default @backward r:g",
                  "aten.mul.default @backward r:x c:h", "aten.add_.Tensor @optimizer w:w r:g r:h"],
                 durations=[1.0, 1.0, rest_s, 1.0])


def _steps(t, machine, link, **kw):
    return [sim.step_time_s for sim in simulate_ranks([t, t], [outcore.plan(t, 100)] * 2,
                                                      machine, link=link, **kw)]


def test_a_collectives_cpu_hides_in_the_wait_for_it():
    # The allreduce runs [1, 9] and needs 0.5 s of CPU per second. f2 computes in [1, 2]
    # beside it: 0.5 s more, it ends at 2.5; f3 waits for g until 9 anyway, and the
    # core is the helpers' while it does.
    t = _ddp_like(rest_s=1.0)
    assert _steps(t, TWO_CORES, SLOW) == [10.0, 10.0]
    assert _steps(t, TWO_CORES, GLOO_LIKE) == [10.0, 10.0]


def test_a_collectives_cpu_slows_the_compute_beside_it():
    # f2 (8 s) overlaps the whole allreduce, which needs 0.5 x 8 = 4 s of CPU meanwhile:
    # without a spare core f2 ends at 1 + 8 + 4 = 13 instead of 9, and f3 at 14, not 10.
    t = _ddp_like(rest_s=8.0)
    assert _steps(t, TWO_CORES, SLOW) == [10.0, 10.0]
    assert _steps(t, TWO_CORES, GLOO_LIKE) == [14.0, 14.0]
    # A core per rank to spare (more cores, one rank per node, or a GPU's compute that
    # is not the host's): the helpers cost nothing.
    assert _steps(t, dataclasses.replace(TOY, cores=3), GLOO_LIKE) == [10.0, 10.0]
    assert _steps(t, TWO_CORES, GLOO_LIKE, ranks_per_node=1) == [10.0, 10.0]
    assert _steps(t, TOY, GLOO_LIKE) == [10.0, 10.0]


def test_the_movers_cpu_slows_the_compute_beside_it():
    # A chain whose activations (4 B each, 4 s at 1 B/s) are swapped behind compute of
    # 10 s per function: every transfer needs transfer_cpu_share of its time in CPU
    # while a function computes, which that function gives up.
    t = build({"a": 4, "b": 4, "c": 4, "d": 4},
              ["f0 c:a", "f1 r:a c:b", "f2 r:b c:c", "f3 r:c c:d", "f4 r:d r:c",
               "f5 r:b r:a"], durations=[10.0] * 6)
    s = outcore.plan(t, 12, "adaptive")
    assert s.bytes_moved > 0
    free = simulate_ranks([t, t], [s, s], TWO_CORES, link=SLOW)[0]
    busy = dataclasses.replace(TWO_CORES, transfer_cpu_share=0.25)
    paid = simulate_ranks([t, t], [s, s], busy, link=SLOW)[0]
    owed = 0.25 * sum(x.end_s - x.start_s for x in free.transfers)
    assert free.step_time_s < paid.step_time_s <= free.step_time_s + owed + 1e-12
    assert paid.step_time_s == pytest.approx(sum(paid.compute_s) + paid.total_stall_s)
    # One rank on two cores has one to spare: simulate is unchanged. On one core the
    # mover shares it with the only rank.
    assert outcore.simulate(t, s, busy) == outcore.simulate(t, s, TWO_CORES)
    one_core = dataclasses.replace(busy, cores=1)
    assert outcore.simulate(t, s, one_core).step_time_s == paid.step_time_s


def test_one_process_whose_threads_fill_the_cores_pays_the_movers_cpu():
    # The same chain recorded by a step that computed on two threads: on two cores the
    # mover has none of its own, so simulate charges it as on one core with one thread.
    t = build({"a": 4, "b": 4, "c": 4, "d": 4},
              ["f0 c:a", "f1 r:a c:b", "f2 r:b c:c", "f3 r:c c:d", "f4 r:d r:c",
               "f5 r:b r:a"], durations=[10.0] * 6)
    s = outcore.plan(t, 12, "adaptive")
    busy = dataclasses.replace(TWO_CORES, transfer_cpu_share=0.25)
    one_thread = outcore.simulate(t, s, busy)
    assert one_thread.contention_s == 0
    two = dataclasses.replace(t, info={**t.info, "threads": 2})
    paid = outcore.simulate(two, s, busy)
    assert paid == outcore.simulate(t, s, dataclasses.replace(busy, cores=1))
    assert paid.contention_s > 0
    assert paid.step_time_s == pytest.approx(paid.in_core_time_s + paid.total_stall_s
                                             + paid.contention_s)
    assert "contention" in str(paid) and "contention" not in str(one_thread)
    # Four cores leave two to spare; a GPU's compute (cores=0) is never the host's.
    assert outcore.simulate(two, s, dataclasses.replace(busy, cores=4)).contention_s == 0
    assert outcore.simulate(two, s, dataclasses.replace(busy, cores=0)).contention_s == 0
    # A count that is not a positive integer (a hand-written trace) counts as one thread.
    for bad in (0, -2, 1.5, True, "2"):
        odd = dataclasses.replace(t, info={"threads": bad})
        assert outcore.simulate(odd, s, busy) == one_thread


def test_a_recorded_trace_keeps_the_threads_it_computed_on(tmp_path):
    import torch
    from outcore.trace.recorder import record
    x = torch.randn(8, 8, requires_grad=True)
    with record() as rec:
        (x @ x).sum().backward()
    assert rec.trace.info["threads"] == torch.get_num_threads()
    rec.trace.save(tmp_path / "t.json")
    assert outcore.Trace.load(tmp_path / "t.json").info["threads"] == torch.get_num_threads()


def test_a_wait_absorbs_only_the_helper_work_that_runs_during_it():
    # f1 waits until 4 for a's swap-out (a: 4 B at 1 B/s, after f0); b, which f2 needs,
    # is read in after that wait, during f1's 10 s of compute: that read's CPU (0.5 x
    # 4 s) slows f1 by 2 s; a's write ran while f1 waited and costs nothing.
    from outcore.plan.schedule import SWAP_IN, SWAP_OUT, WAIT, Action
    t = build({"a": (4, "param"), "b": (4, "param"), "c": 4},
              ["f0 w:a", "f1 c:c", "f2 r:a r:b r:c"], durations=[0.0, 10.0, 1.0])
    s = outcore.plan(t, 100)
    s = dataclasses.replace(s, begin=[[], [Action(WAIT, 0), Action(SWAP_IN, 1)], [Action(SWAP_IN, 0)]],
                            end=[[Action(SWAP_OUT, 0)], [], []])
    half = dataclasses.replace(TWO_CORES, transfer_cpu_share=0.5)
    free = outcore.simulate(t, s, dataclasses.replace(TOY, cores=1))
    paid = outcore.simulate(t, s, dataclasses.replace(half, cores=1))
    assert free.compute_s[1] == 10.0 and paid.compute_s[1] == 12.0
    assert paid.stall_s[1] == free.stall_s[1]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(), st.floats(0.3, 1.0), st.floats(0.0, 2.0))
def test_helpers_cost_at_most_their_cpu(trace, fraction, share):
    budget = max(int(trace.peak()[0] * fraction), min_feasible_budget(trace))
    s = outcore.plan(trace, budget)
    free = simulate_ranks([trace, trace], [s, s], TWO_CORES, link=SLOW)
    paid = simulate_ranks([trace, trace], [s, s],
                          dataclasses.replace(TWO_CORES, transfer_cpu_share=share), link=SLOW)
    for a, b in zip(free, paid):
        owed = share * sum(x.end_s - x.start_s for x in a.transfers)
        eps = 1e-9 * max(1.0, b.step_time_s)
        assert a.step_time_s - eps <= b.step_time_s <= a.step_time_s + owed + eps
        assert b.step_time_s == pytest.approx(sum(b.compute_s) + b.total_stall_s)
        assert b.in_core_time_s == a.in_core_time_s


def test_bad_contention_inputs_are_clear_errors():
    t = _ddp_like(rest_s=1.0)
    for bad in (0, 3, 1.5, True):
        with pytest.raises(outcore.OutcoreError, match="ranks_per_node must be an integer"):
            _steps(t, TWO_CORES, SLOW, ranks_per_node=bad)
    with pytest.raises(outcore.OutcoreError, match="cpu_share must be"):
        dataclasses.replace(SLOW, cpu_share=-0.1)
    for bad in ({"cores": -1}, {"cores": 1.5}, {"transfer_cpu_share": float("nan")},
                {"transfer_cpu_share": -5.0}):
        with pytest.raises(outcore.OutcoreError, match="cores must be|transfer_cpu_share must"):
            dataclasses.replace(TWO_CORES, **bad)
