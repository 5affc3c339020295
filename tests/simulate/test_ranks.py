"""simulate_ranks: every rank's trace simulated together, on numbers checkable by hand."""
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import outcore
from outcore.simulate import simulate_ranks

from ..plan.helpers import build
from .test_comm import SLOW, TOY


def _ddp_like(first_s=1.0, rest_s=1.0):
    # f0 makes a gradient g; f1 allreduces it; f2 does unrelated work; f3 reads g.
    return build({"x": (4, "input"), "w": (4, "param"), "g": 8, "h": 4},
                 ["aten.mm.default r:x c:g", "c10d.allreduce_.default @backward r:g",
                  "aten.mul.default @backward r:x c:h", "aten.add_.Tensor @optimizer w:w r:g r:h"],
                 durations=[first_s, 1.0, rest_s, rest_s])


def _sims(traces):
    return simulate_ranks(traces, [outcore.plan(t, 100) for t in traces], TOY, link=SLOW)


def test_a_collective_starts_when_the_slowest_rank_issues_it():
    fast, slow = _ddp_like(), _ddp_like(first_s=3.0)
    # Alone, each rank starts the allreduce after its own f0 (test_comm: 10 s for fast).
    assert outcore.simulate(fast, outcore.plan(fast, 100), TOY, comm=(SLOW, 2)).step_time_s == 10.0
    # Together it starts at 3, when the slow rank issues it, and ends at 3 + 8 = 11: both
    # ranks' f3 wait for it and end at 12. The fast rank's wait is its stall.
    a, b = _sims([fast, slow])
    assert a.step_time_s == b.step_time_s == 12.0
    assert [(c.start_s, c.end_s) for c in a.collectives] == [(3.0, 11.0)]
    assert [(c.start_s, c.end_s) for c in b.collectives] == [(3.0, 11.0)]
    assert a.stall_s == (0.0, 0.0, 0.0, 9.0) and b.stall_s == (0.0, 0.0, 0.0, 7.0)


@settings(max_examples=30, deadline=None)
@given(first=st.floats(0.0, 10.0), rest=st.floats(0.0, 10.0))
def test_identical_ranks_simulate_as_one_rank_does(first, rest):
    t = _ddp_like(first, rest)
    alone = outcore.simulate(t, outcore.plan(t, 100), TOY, comm=(SLOW, 2))
    for sim in _sims([t, t]):
        assert sim == alone


def _stages():
    # Stage 0 computes a (1 s) and sends it; stage 1 receives it into b and computes c.
    send = build({"x": (4, "input"), "a": 8},
                 ["aten.mm.default r:x c:a", "c10d.send.default r:a"], durations=[1.0, 1.0])
    recv = build({"b": (8, "input"), "c": 4},
                 ["c10d.recv_.default w:b", "aten.mul.default r:b c:c"], durations=[1.0, 1.0])
    return send, recv


def test_a_receive_waits_for_its_send():
    send, recv = _stages()
    # 8 bytes at 1 B/s: the transfer runs [1, 9] on both sides, once the sender has a.
    s0, s1 = _sims([send, recv])
    assert [(c.start_s, c.end_s) for c in s1.collectives] == [(1.0, 9.0)]
    assert s0.step_time_s == 9.0            # the sender's step ends with its send
    assert s1.step_time_s == 10.0 and s1.stall_s == (0.0, 9.0)   # the receive computes nothing
    # Alone, the receiver would not know its sender was late.
    assert outcore.simulate(recv, outcore.plan(recv, 100), TOY, comm=(SLOW, 2)).step_time_s == 9.0


def _with_peer(trace, peer):
    fns = tuple(dataclasses.replace(f, peer=peer) if f.op.startswith("c10d.") else f
                for f in trace.functions)
    return dataclasses.replace(trace, functions=fns)


def test_peers_pair_sends_and_receives_across_more_ranks():
    send, recv = _stages()
    idle = build({"x": (4, "input"), "y": 4}, ["aten.mm.default r:x c:y"], durations=[5.0])
    # Rank 0 sends to rank 2; rank 1 does something else.
    s0, s1, s2 = _sims([_with_peer(send, 2), idle, _with_peer(recv, 0)])
    assert s2.step_time_s == 10.0 and s1.step_time_s == 5.0 and s0.step_time_s == 9.0
    with pytest.raises(outcore.OutcoreError, match="does not say which rank"):
        _sims([send, idle, recv])
    with pytest.raises(outcore.OutcoreError, match="talks to rank 5"):
        _sims([_with_peer(send, 5), idle, _with_peer(recv, 0)])


def test_traces_that_do_not_match_are_a_clear_error():
    lonely = _ddp_like()
    no_comm = build({"x": (4, "input"), "y": 4}, ["aten.mm.default r:x c:y"])
    with pytest.raises(outcore.OutcoreError, match="rank 0 waits in c10d.allreduce_.default"):
        _sims([lonely, no_comm])
    with pytest.raises(outcore.OutcoreError, match="one schedule per trace"):
        simulate_ranks([lonely], [], TOY, link=SLOW)


def test_host_time_counts_its_cpu_share_only():
    t = _ddp_like()
    fns = tuple(dataclasses.replace(f, host_s=0.5, host_cpu_s=0.25) for f in t.functions)
    t = dataclasses.replace(t, functions=fns)
    host = dataclasses.replace(TOY, host_time=True)
    s = outcore.plan(t, 100)
    # simulate counts the wall host time, waits included: 1.5 s per function.
    assert outcore.simulate(t, s, host).step_time_s == 6.0
    # simulate_ranks counts 0.25 s of CPU per function, the allreduce's too: the Python
    # before it runs on the host before it is issued, the op itself on the comm lane.
    # f0 ends at 1.25, the allreduce is issued at 1.5 and runs [1.5, 9.5], f3 ends at 10.75.
    a, b = simulate_ranks([t, t], [s, s], host, link=SLOW)
    assert a.step_time_s == b.step_time_s == 10.75
    assert [(c.start_s, c.end_s) for c in a.collectives] == [(1.5, 9.5)]
    # The executor's cost per op counts before a collective too: 0.5 s of host per
    # function, the allreduce issued at 2.0, f3 ends at 10.0 + 1.5.
    (a, _) = simulate_ranks([t, t], [s, s], dataclasses.replace(host, per_function_s=0.25),
                            link=SLOW)
    assert [(c.start_s, c.end_s) for c in a.collectives] == [(2.0, 10.0)]
    assert a.step_time_s == 11.5
