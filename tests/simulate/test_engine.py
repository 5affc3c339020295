"""The simulator on traces small enough to time by hand."""
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import outcore
from outcore.plan import POLICIES, min_feasible_budget
from outcore.simulate import PRESETS, Machine

from ..plan.helpers import build, traces

# 1 byte per second each way, no latency, durations from the trace: easy arithmetic.
TOY = Machine("toy", peak_flops=1.0, memory_bandwidth=1.0, fast_bytes=100, link_in=1.0,
              link_out=1.0, link_latency_s=0.0, use_trace_durations=True)
ONE_SECOND = [1.0] * 5

PREFETCH = {"w": (2, "param"), "a": 4, "b": 4, "c": 4, "d": 2}
PREFETCH_FNS = ["f0 r:w c:a", "f1 r:a c:b", "f2 r:b c:c", "f3 r:c c:d", "f4 @backward r:d r:w"]


def test_prefetch_hides_half_the_transfer():
    t = build(PREFETCH, PREFETCH_FNS, durations=ONE_SECOND)
    # adaptive: w in during [0,2] -> f0 runs [2,3]; f1 [3,4]; f2 [4,5]; w in again from 5
    # (issued before f3) to 7; f3 [5,6]; f4 waits until 7 and runs [7,8].
    sim = outcore.simulate(t, outcore.plan(t, 8, "adaptive", keep_state=False), TOY)
    assert sim.step_time_s == 8.0 and sim.in_core_time_s == 5.0
    assert sim.stall_s == (2.0, 0.0, 0.0, 0.0, 1.0)
    assert sim.start_s == (2.0, 3.0, 4.0, 5.0, 7.0)
    # on-demand issues the second swap-in only before f4: [6,8], f4 runs [8,9].
    sim = outcore.simulate(t, outcore.plan(t, 8, "on-demand", keep_state=False), TOY)
    assert sim.step_time_s == 9.0 and sim.stall_s == (2.0, 0.0, 0.0, 0.0, 2.0)
    assert [(x.direction, x.start_s, x.end_s) for x in sim.transfers] == [("in", 0, 2), ("in", 6, 8)]


def test_wait_blocks_until_the_swap_out_completes():
    t = build({"x": (4, "input"), "a": 4, "b": 4, "c": 4},
              ["f0 r:x c:a", "f1 r:a c:b", "f2 r:b c:c", "f3 @backward r:a r:c"],
              durations=[1.0] * 4)
    # a goes out after f1 during [2,6]; f2 must WAIT for it (stall 4) and runs [6,7];
    # a comes back during [7,11]; f3 runs [11,12].
    sim = outcore.simulate(t, outcore.plan(t, 8, "adaptive", keep_state=False), TOY)
    assert sim.stall_s == (0.0, 0.0, 4.0, 4.0)
    assert sim.step_time_s == 12.0 and sim.speed_vs_in_core == pytest.approx(4 / 12)
    assert "33.3% of in-core speed" in str(sim)


def test_a_shared_link_serves_reads_and_writes_in_turn():
    t = build({"x": (4, "input"), "a": 4, "b": 4, "c": 4},
              ["f0 r:x c:a", "f1 r:a c:b", "f2 r:b c:c", "f3 @backward r:a r:c"],
              durations=[1.0] * 4)
    s = outcore.plan(t, 8, "adaptive", keep_state=False)
    apart = outcore.simulate(t, s, TOY)
    shared = outcore.simulate(t, s, Machine(**{**TOY.__dict__, "name": "toy-shared", "shared_link": True}))
    # Every transfer starts after the previous one, whatever its direction.
    spans = sorted((x.start_s, x.end_s) for x in shared.transfers)
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:]))
    assert shared.step_time_s >= apart.step_time_s
    ins, outs = shared.link_busy_s
    assert shared.physical_limit_s == max(shared.in_core_time_s, ins + outs)
    # State that starts the step on the slow tier is written out before it; state that
    # ends it there is read back after (OutOfCore keeps it in memory between iterations).
    assert shared.boundary_s == 0          # x is an input: nothing persistent here
    # Durations scale for calibration to a measured step.
    scaled = outcore.simulate(t, s, Machine(**{**TOY.__dict__, "duration_scale": 2.0}))
    assert scaled.in_core_time_s == 2 * apart.in_core_time_s


def test_roofline_compute_time_on_gpu_presets():
    t = build({"a": 8}, ["f0 c:a"], flops=[10**12], touched=[10**9])
    v100 = PRESETS["v100-16gb"]
    expected = max(1e12 / (15.7e12 * 0.6), 1e9 / (900e9 * 0.8)) + 5e-6
    assert outcore.simulate(t, outcore.plan(t, 8), "v100-16gb").step_time_s == pytest.approx(expected)
    assert v100.compute_time(t.functions[0]) == pytest.approx(expected)
    # cpu-disk uses the trace's own durations (measured here, or estimated for here).
    assert PRESETS["cpu-disk"].compute_time(t.functions[0]) == t.functions[0].duration_s
    with pytest.raises(outcore.OutcoreError, match="unknown machine"):
        outcore.simulate(t, outcore.plan(t, 8), "tpu")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(), st.floats(0.3, 1.2), st.sampled_from(sorted(PRESETS)))
def test_step_time_respects_the_physical_limits(trace, fraction, name):
    budget = max(int(trace.peak()[0] * fraction), min_feasible_budget(trace))
    for policy in POLICIES:
        s = outcore.plan(trace, budget, policy)
        sim = outcore.simulate(trace, s, name)
        eps = 1e-12 * max(1.0, sim.step_time_s)
        assert sim.step_time_s + eps >= sim.physical_limit_s >= max(sim.in_core_time_s, *sim.link_busy_s)
        assert sim.step_time_s == pytest.approx(sim.in_core_time_s + sim.total_stall_s
                                                + sim.contention_s)
        assert sim.bytes_in == sum(x.nbytes for x in sim.transfers if x.direction == "in")
        if s.bytes_moved == 0:
            assert sim.total_stall_s == 0


def test_boundary_transfers_of_persistent_state():
    # w (a parameter, 2 bytes), planned the paper's way, starts the step on the slow tier
    # and is swapped out after f4: it ends where it started, and the executor leaves it
    # there between iterations, so nothing moves at the boundary.
    t = build(PREFETCH, PREFETCH_FNS, durations=ONE_SECOND)
    s = outcore.plan(t, 8, "adaptive", keep_state=False)
    w = next(a.id for a in t.arrays if a.kind == "persistent")
    assert w not in s.resident_at_start and w not in s.resident_at_end
    assert outcore.simulate(t, s, TOY).boundary_s == 0.0
    # Ending in fast memory but starting without it: written out before the next step
    # (2 s); the reverse: read in before it (2 s).
    ends_in = dataclasses.replace(s, resident_at_end=tuple(sorted({*s.resident_at_end, w})))
    sim = outcore.simulate(t, ends_in, TOY)
    assert sim.boundary_s == 2.0 and sim.iteration_time_s == sim.step_time_s + 2.0
    assert "between iterations 2000.00 ms" in str(sim)
    starts_in = dataclasses.replace(s, resident_at_start=tuple(sorted({*s.resident_at_start, w})))
    assert outcore.simulate(t, starts_in, TOY).boundary_s == 2.0
    # Kept where it is at both ends (keep_state, the default): nothing crosses over.
    assert outcore.simulate(t, outcore.plan(t, 8, "adaptive"), TOY).boundary_s == 0.0


def test_a_duplex_link_moves_link_both_in_total_while_both_directions_run():
    """NOTE [Duplex link], by hand on 1 B/s each way and 1.5 B/s together."""
    duplex = Machine(**{**TOY.__dict__, "name": "toy-duplex", "link_both": 1.5})
    # Alone: as independent links.
    assert duplex.transfer_end(4, "out", 0.0, 0.0) == 4.0
    # A read of 2 B issued at 1 while a write runs until 4: 0.5 B/s during [1, 4]
    # (1.5 B), then 1 B/s for the last 0.5 B: it ends at 4.5.
    assert duplex.transfer_end(2, "in", 1.0, 4.0) == 4.5
    # One that fits in the overlap: 1 B at 0.5 B/s.
    assert duplex.transfer_end(1, "in", 1.0, 4.0) == 3.0
    # link_both at least the sum of both: independent; at most the other's speed: it waits.
    assert Machine(**{**duplex.__dict__, "link_both": 2.0}).transfer_end(2, "in", 1.0, 4.0) == 3.0
    assert Machine(**{**duplex.__dict__, "link_both": 1.0}).transfer_end(2, "in", 1.0, 4.0) == 6.0
    # In a schedule: never faster than independent links, and within the shared link.
    t = build({"x": (4, "input"), "a": 4, "b": 4, "c": 4},
              ["f0 r:x c:a", "f1 r:a c:b", "f2 r:b c:c", "f3 @backward r:a r:c"],
              durations=[1.0] * 4)
    s = outcore.plan(t, 8, "adaptive", keep_state=False)
    apart, both = outcore.simulate(t, s, TOY), outcore.simulate(t, s, duplex)
    shared = outcore.simulate(t, s, Machine(**{**TOY.__dict__, "shared_link": True}))
    assert apart.step_time_s <= both.step_time_s <= shared.step_time_s


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_link_both_is_validated(bad):
    with pytest.raises(outcore.OutcoreError, match="link_both"):
        Machine(**{**TOY.__dict__, "link_both": bad})
    with pytest.raises(outcore.OutcoreError, match="exclude each other"):
        Machine(**{**TOY.__dict__, "link_both": 1.5, "shared_link": True})
