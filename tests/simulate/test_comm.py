"""The α-β collective costs, and the simulator's comm lane, on numbers checkable by hand."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import outcore
from outcore.simulate import Machine
from outcore.simulate.comm import (INTERCONNECTS, Interconnect, allgather_time, allreduce_time,
                                   broadcast_time, collective_bytes, collective_kind,
                                   collective_time, interconnect, p2p_time, reduce_scatter_time)

from ..plan.helpers import build

# 1 µs per message, 1 GB/s: times in µs are easy to read off.
LINK = Interconnect("test", alpha_s=1e-6, bandwidth_Bps=1e9, source="made up for tests")
COLLECTIVES = [lambda n, p: allreduce_time(n, p, LINK), lambda n, p: allreduce_time(n, p, LINK, "tree"),
               lambda n, p: allgather_time(n, p, LINK), lambda n, p: reduce_scatter_time(n, p, LINK),
               lambda n, p: broadcast_time(n, p, LINK)]


def test_formulas_against_hand_computed_values():
    # ring allreduce, p=4, 1 MB: 2*3 steps of 1 µs + 2*3/4 * 1 ms.
    assert allreduce_time(1e6, 4, LINK) == pytest.approx(6e-6 + 1.5e-3)
    # tree allreduce, p=8: 2*log2(8) steps + 2 * n * β.
    assert allreduce_time(1e6, 8, LINK, "tree") == pytest.approx(6e-6 + 2e-3)
    # ring allgather of a 4 MB output over 4 ranks: 3 steps + 3/4 * 4 ms.
    assert allgather_time(4e6, 4, LINK) == pytest.approx(3e-6 + 3e-3)
    assert reduce_scatter_time(4e6, 4, LINK) == pytest.approx(3e-6 + 3e-3)
    assert broadcast_time(1e6, 4, LINK) == pytest.approx(3e-6 + 1e-3)
    assert p2p_time(1e6, LINK) == pytest.approx(1e-6 + 1e-3)
    assert p2p_time(0, LINK) == 0.0
    # The ring beats the tree on bandwidth, the tree wins on latency at many ranks.
    assert allreduce_time(1e9, 64, LINK) < allreduce_time(1e9, 64, LINK, "tree")
    assert allreduce_time(8, 64, LINK, "tree") < allreduce_time(8, 64, LINK)


@pytest.mark.parametrize("cost", COLLECTIVES)
def test_one_rank_costs_nothing(cost):
    assert cost(10**9, 1) == 0.0


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 2**34), extra=st.integers(0, 2**30), p=st.integers(1, 512),
       more=st.integers(0, 512), which=st.integers(0, len(COLLECTIVES) - 1))
def test_monotonic_in_bytes_and_ranks(n, extra, p, more, which):
    cost = COLLECTIVES[which]
    assert cost(n, p) <= cost(n + extra, p)
    assert cost(n, p) <= cost(n, p + more)
    assert cost(n, p) >= 0 and math.isfinite(cost(n, p))


def test_bad_inputs_are_clear_errors():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(outcore.OutcoreError, match="ranks must be an integer >= 1"):
            allreduce_time(8, bad, LINK)
    with pytest.raises(outcore.OutcoreError, match="message size"):
        allgather_time(-1, 2, LINK)
    with pytest.raises(outcore.OutcoreError, match="ring, tree"):
        allreduce_time(8, 2, LINK, "butterfly")
    with pytest.raises(outcore.OutcoreError, match="presets: loopback-gloo, loopback-gloo-busy, nvlink-a100"):
        interconnect("token-ring")
    with pytest.raises(outcore.OutcoreError, match="bandwidth_Bps"):
        Interconnect("x", alpha_s=0.0, bandwidth_Bps=0.0, source="")
    with pytest.raises(outcore.OutcoreError, match="not a collective"):
        collective_time("aten.mm.default", 8, 2, LINK)


def test_presets_say_where_their_figures_come_from():
    assert set(INTERCONNECTS) >= {"loopback-gloo", "nvlink-a100", "pcie4", "infiniband-hdr",
                                  "ethernet-100g", "ethernet-25g"}
    for name, link in INTERCONNECTS.items():
        assert link.name == name and link.source and link.alpha_s > 0 and link.bandwidth_Bps > 0
    assert "measured here" in INTERCONNECTS["loopback-gloo"].source
    # Faster hardware is faster in the model too.
    order = ["ethernet-25g", "ethernet-100g", "infiniband-hdr", "nvlink-a100"]
    times = [allreduce_time(10**8, 8, name) for name in order]
    assert times == sorted(times, reverse=True)


def test_recorded_op_names_map_to_models():
    assert collective_kind("c10d.allreduce_.default") == "allreduce"
    assert collective_kind("c10d._allgather_base_.default") == "allgather"
    assert collective_kind("c10d.allgather_.default") == "allgather"
    assert collective_kind("c10d._reduce_scatter_base_.default") == "reduce_scatter"
    assert collective_kind("c10d.reduce_scatter_.default") == "reduce_scatter"
    assert collective_kind("c10d.broadcast_.default") == "broadcast"
    assert collective_kind("c10d.send.default") == collective_kind("c10d.recv_.default") == "p2p"
    assert collective_kind("_c10d_functional.all_reduce.default") == "allreduce"
    assert collective_kind("_c10d_functional.all_gather_into_tensor.default") == "allgather"
    assert collective_kind("_c10d_functional.reduce_scatter_tensor.default") == "reduce_scatter"
    assert collective_kind("_c10d_functional.wait_tensor.default") is None
    assert collective_kind("aten.mm.default") is None
    # _allgather_base_: output 800 B, input (one rank's share) 400 B -> 800.
    assert collective_bytes("allgather", [800, 400]) == 800
    # the list form: 4 outputs of 100 B and the 100 B input -> 400.
    assert collective_bytes("allgather", [100] * 5) == 400
    assert collective_bytes("reduce_scatter", [200, 400]) == 400
    assert collective_bytes("allreduce", [100, 28]) == 128
    assert collective_time("c10d.allreduce_.default", 1e6, 4, LINK) == allreduce_time(1e6, 4, LINK)
    assert collective_time("c10d.send.default", 1e6, 2, LINK) == p2p_time(1e6, LINK)


# -- the simulator's comm lane ------------------------------------------------------------
TOY = Machine("toy", peak_flops=1.0, memory_bandwidth=1.0, fast_bytes=100, link_in=1.0,
              link_out=1.0, link_latency_s=0.0, use_trace_durations=True)
SLOW = Interconnect("slow", alpha_s=0.0, bandwidth_Bps=1.0, source="tests")   # 1 B/s


def _ddp_like():
    # f0 makes a gradient g; f1 allreduces it; f2 does unrelated work; f3 (the optimizer)
    # reads g. Every function takes 1 s as recorded (the allreduce too, on this machine).
    return build({"x": (4, "input"), "w": (4, "param"), "g": 8, "h": 4},
                 ["aten.mm.default r:x c:g", "c10d.allreduce_.default @backward r:g",
                  "aten.mul.default @backward r:x c:h", "aten.add_.Tensor @optimizer w:w r:g r:h"],
                 durations=[1.0] * 4)


def test_a_collective_runs_on_the_comm_lane_and_its_reader_waits():
    t = _ddp_like()
    s = outcore.plan(t, 100)
    plain = outcore.simulate(t, s, TOY)
    assert plain.step_time_s == 4.0 and plain.comm_s == 0.0 and plain.collectives == ()
    # 2 ranks, 8 bytes at 1 B/s: 2*(1/2)*8 = 8 s on the comm lane from t=1 (after f0).
    # f1 costs no compute; f2 runs [1, 2]; f3 waits for the allreduce until 9, runs [9, 10].
    sim = outcore.simulate(t, s, TOY, comm=(SLOW, 2))
    assert sim.step_time_s == 10.0 and sim.comm_s == 8.0
    assert [(c.direction, c.nbytes, c.start_s, c.end_s) for c in sim.collectives] == [("comm", 8, 1.0, 9.0)]
    assert sim.stall_s == (0.0, 0.0, 0.0, 7.0)
    assert sim.compute_s == (1.0, 0.0, 1.0, 1.0)
    # One rank: the collective is free, the step is the compute alone.
    assert outcore.simulate(t, s, TOY, comm=(SLOW, 1)).step_time_s == 3.0


def test_the_step_ends_when_its_last_collective_does():
    t = build({"x": (4, "input"), "g": 8},
              ["aten.mm.default r:x c:g", "c10d.allreduce_.default @backward r:g"], durations=[1.0, 1.0])
    sim = outcore.simulate(t, outcore.plan(t, 100), TOY, comm=(SLOW, 2))
    assert sim.step_time_s == 9.0 and sim.stall_s[-1] == 8.0
    with pytest.raises(outcore.OutcoreError, match="comm must be"):
        outcore.simulate(t, outcore.plan(t, 100), TOY, comm="nvlink-a100")
    with pytest.raises(outcore.OutcoreError, match="unknown interconnect"):
        outcore.simulate(t, outcore.plan(t, 100), TOY, comm=("carrier-pigeon", 2))


def test_kinds_measured_apart_use_their_own_figures():
    link = Interconnect("split", alpha_s=1e-6, bandwidth_Bps=1e9, source="tests",
                        per_kind=(("reduce_scatter", 2e-6, 0.5e9), ("p2p", 0.0, 2e9)))
    # reduce-scatter: 3 steps of 2 µs + 3/4 of 4 MB at 0.5 GB/s; allgather keeps the base.
    assert reduce_scatter_time(4e6, 4, link) == pytest.approx(6e-6 + 6e-3)
    assert allgather_time(4e6, 4, link) == pytest.approx(3e-6 + 3e-3)
    assert collective_time("c10d._reduce_scatter_base_.default", 4e6, 4, link) == \
        pytest.approx(6e-6 + 6e-3)
    assert p2p_time(1e6, link) == pytest.approx(0.5e-3)
    assert allreduce_time(1e6, 4, link) == allreduce_time(1e6, 4, LINK)
    for bad in (("gossip", 1e-6, 1e9), ("p2p", -1.0, 1e9), ("p2p", 1e-6, 0.0), ("p2p", 1e-6)):
        with pytest.raises(outcore.OutcoreError, match="per_kind entries"):
            Interconnect("bad", alpha_s=1e-6, bandwidth_Bps=1e9, source="tests", per_kind=(bad,))
