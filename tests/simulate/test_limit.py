"""The physical limit (simulate/limit.py): hand-checked on a forward/backward step (the cut
bound), on an optimizer's state on a disk (the cut bound, both directions), on a
function that needs nearly the whole budget (the pressure bound) and on one crowded by
arrays that each fit beside it (the crowd bound), and never beaten by any simulated
schedule: on random traces, and on random optimizer steps over state."""
import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import outcore
from outcore.plan import POLICIES, min_feasible_budget
from outcore.simulate import Machine, physical_limit

from ..plan.helpers import build, traces

TOY = Machine("toy", peak_flops=1.0, memory_bandwidth=1.0, fast_bytes=100, link_in=1.0,
              link_out=2.0, link_latency_s=0.0, use_trace_durations=True)


def test_what_backward_reads_forward_had_to_write_first():
    # Forward creates a, b, c (4 B each) and keeps them for backward; under 6 B at most
    # one fits beside the next: before backward (the cut before function 3) 12 + 1 (w)
    # bytes are alive, 7 over budget; w existed before the step, so at least 6 B were
    # written (at 2 B/s: 3 s) and 7 B must be read back (7 s), against 1 s of compute on
    # either side: 3 + 7 = 10 s, where max(compute, reads) would say 7.
    t = build({"w": (1, "param"), "a": 4, "b": 4, "c": 4, "g": 1},
              ["f0 r:w c:a", "f1 r:a c:b", "f2 r:b c:c",
               "b0 @backward r:c c:g", "b1 @backward r:g r:b", "b2 @backward r:g r:a w:w"],
              durations=[1 / 3] * 6)
    limit = physical_limit(t, 6, TOY)
    assert (limit.cut, limit.written, limit.read) == (3, 6, 7)
    assert abs(limit.seconds - 10.0) < 1e-9 and abs(limit.compute_s - 2.0) < 1e-9
    assert "before function 3 at least" in str(limit)
    roomy = physical_limit(t, 100, TOY)
    assert roomy.cut is None and abs(roomy.seconds - 2.0) < 1e-9


def test_state_read_before_a_cut_and_written_after_it_shares_a_disk_with_the_cut():
    # NOTE [Both directions]: four states of 2 B, each read by a forward function (2 s)
    # and changed by an optimizer function (0.25 s), under 5 B on a disk of 1 B/s either
    # way. Before the optimizer (the cut before function 4), 8 B of state is alive and
    # used again, 3 B over the budget: read back after the cut (3 s). The optimizer also
    # changes all 8 B, of which at most 5 stay resident at the end: 3 B are written after
    # the cut, on the same disk (3 s more), against 1 s of compute: 8 + 6 = 14 s. The
    # forward's reads (3 B at least: 8 B used, 5 resident at the start) hide under its
    # 8 s. Counting one direction a side, as on two links, gives 8 + 3 = 11 s.
    arrays = {f"s{i}": (2, "param") for i in range(4)}
    t = build({**arrays, "x": 1},
              ["f0 r:s0 c:x", "f1 r:s1 r:x", "f2 r:s2 r:x", "f3 r:s3 r:x",
               *(f"o{i} @optimizer w:s{i}" for i in range(4))],
              durations=[2.0] * 4 + [0.25] * 4)
    disk = dataclasses.replace(TOY, link_out=1.0, shared_link=True)
    limit = physical_limit(t, 5, disk)
    assert limit.binding == "cut" and limit.cut == 4 and abs(limit.seconds - 14.0) < 1e-9
    assert (limit.read_before, limit.written, limit.read, limit.written_after) == (3, 0, 3, 3)
    assert str(limit).endswith("before function 4 at least 0 B must be written out and 3 B of "
                               "what existed before the step read back, after it 3 B read "
                               "back and 3 B of state written out")
    for policy in POLICIES:
        options = {"machine": disk} if policy == "auto" else {}
        assert outcore.simulate(t, outcore.plan(t, 5, policy, **options), disk).step_time_s >= 14.0
    # On two links of 1 B/s the optimizer's reads and writes overlap: 8 + 3 = 11 s is the
    # cut bound, below the pressure bound here.
    apart = physical_limit(t, 5, dataclasses.replace(disk, shared_link=False))
    assert apart.seconds < 14.0 and apart.binding == "pressure"


def test_an_array_that_does_not_fit_beside_a_function_leaves_and_comes_back():
    # NOTE [Pressure bound]: f1 creates 8 B under a budget of 10, so a (4 B, made by f0
    # and read by f2) cannot stay: it is written out between f0 and f1 and read back
    # between f1 and f2, 4 s each at 1 B/s, where no compute hides them. No cut has more
    # than the budget alive across it, so the cut bound is the compute alone (3 s).
    t = build({"a": 4, "b": 8}, ["f0 c:a", "f1 c:b", "f2 r:a"], durations=[1.0] * 3)
    m = dataclasses.replace(TOY, link_out=1.0)
    limit = physical_limit(t, 10, m)
    assert limit.binding == "pressure" and limit.cut is None
    assert abs(limit.seconds - 11.0) < 1e-9 and abs(limit.compute_s - 3.0) < 1e-9
    assert (limit.pressure.read, limit.pressure.written) == (4, 4)
    assert limit.pressure.intervals == ((1, 1), (2, 2))
    assert "force 4 B of read-backs and 4 B of writes into 2 stretches" in str(limit)
    sim = outcore.simulate(t, outcore.plan(t, 10, "adaptive"), m)
    assert abs(sim.step_time_s - 11.0) < 1e-9               # the plan meets it
    assert physical_limit(t, 12, m).binding == "compute"     # a fits beside b


def test_arrays_that_each_fit_beside_a_function_but_not_together_leave_whole():
    # NOTE [Crowd bound]: f2 creates 6 B under 10, with a and b (4 B each, made by f0
    # and f1, read by f3 and f4) alive across it: each fits beside it, not both. One of
    # them, 4 B whole, is out while f2 runs: written after f0 and before f2, with f1's
    # 1 s to hide it at 2 B/s (1 s beyond), and read back by the start of f4, with f3's
    # 1 s to hide it at 1 B/s (3 s beyond): 9 s against 5 s of compute. The per-array
    # pressure bound and the cuts see nothing (no array alone crowds f2; at most 8 B
    # alive across any cut).
    t = build({"a": 4, "b": 4, "c": 6}, ["f0 c:a", "f1 c:b", "f2 c:c", "f3 r:a", "f4 r:b"],
              durations=[1.0] * 5)
    limit = physical_limit(t, 10, TOY)
    assert limit.binding == "pressure" and limit.cut is None
    assert abs(limit.seconds - 9.0) < 1e-9 and limit.pressure.intervals == ((1, 2), (3, 4))
    assert (limit.pressure.read, limit.pressure.written) == (4, 4)
    for policy in POLICIES:
        options = {"machine": TOY} if policy == "auto" else {}
        assert outcore.simulate(t, outcore.plan(t, 10, policy, **options), TOY).step_time_s >= 9.0
    assert physical_limit(t, 14, TOY).binding == "compute"    # both fit beside c


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(max_functions=24), st.floats(0.0, 1.0), st.sampled_from(["apart", "shared", "duplex"]),
       st.sampled_from([1e-3, 1.0, 10.0]), st.randoms(use_true_random=False))
def test_no_schedule_beats_the_physical_limit(trace, fraction, link, duration_scale, rng):
    # Links of 1 and 2 B/s against functions of 1 ms to 10 s each, each its own duration
    # (so that compute hides some copies and not others: the windows of the pressure
    # and crowd bounds): the cut binds in some examples and compute in others, on
    # independent links, one shared link, and a duplex one (2.5 B/s in total while both
    # directions run: NOTE [Duplex link]).
    trace = dataclasses.replace(trace, functions=tuple(
        dataclasses.replace(fn, duration_s=fn.duration_s * rng.choice([0.1, 1.0, 3.0, 10.0]))
        for fn in trace.functions))
    _no_policy_beats_the_limit(trace, fraction, dataclasses.replace(
        TOY, shared_link=link == "shared", duration_scale=duration_scale,
        link_both=2.5 if link == "duplex" else 0.0))


def _no_policy_beats_the_limit(trace, fraction, m):
    """At a budget `fraction` of the way from the smallest feasible to the peak, no
    policy's simulated step is faster than the physical limit on machine `m`."""
    low = min_feasible_budget(trace)
    budget = low + int((trace.peak(actual=True)[0] - low) * fraction)
    limit = physical_limit(trace, budget, m)
    for policy in POLICIES:
        options = {"machine": m} if policy == "auto" else {}
        sim = outcore.simulate(trace, outcore.plan(trace, budget, policy, **options), m)
        assert sim.step_time_s >= limit.seconds * (1 - 1e-9), (policy, limit)


@st.composite
def optimizer_steps(draw):
    """A forward that reads states one at a time beside a transient, and an optimizer
    that changes some of them: where NOTE [Both directions] binds."""
    n = draw(st.integers(1, 10))
    arrays = {f"s{i}": (draw(st.integers(1, 3)), "param") for i in range(n)}
    arrays["x"] = draw(st.integers(1, 2))
    forward = [f"f{i} r:s{i}" + (" c:x" if i == 0 else " r:x") for i in range(n)]
    changed = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    optimizer = [f"o{i} @optimizer r:s{i} w:s{i}" for i in changed]
    # Forward functions long enough to hide their reads, optimizer functions short.
    durations = ([draw(st.sampled_from([2.0, 4.0, 8.0])) for _ in forward]
                 + [draw(st.sampled_from([0.05, 0.1, 0.5])) for _ in optimizer])
    return build(arrays, forward + optimizer, durations=durations)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(optimizer_steps(), st.floats(0.3, 0.8), st.sampled_from(["apart", "shared", "duplex"]))
def test_no_schedule_of_an_optimizer_step_beats_the_physical_limit(trace, fraction, link):
    # Budgets in the middle: near the smallest, the pressure bound binds nearly always;
    # here the cut with both directions does on a disk (about one example in seven).
    _no_policy_beats_the_limit(trace, fraction, dataclasses.replace(
        TOY, shared_link=link == "shared", link_both=2.5 if link == "duplex" else 0.0))
