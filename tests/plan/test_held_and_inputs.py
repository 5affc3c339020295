"""Two rules of the planner on random traces (hypothesis): arrays held in place by the
executor are planned as 0 bytes and never moved (run/compose.py), and inputs stay
resident until their first use (the executor binds a storage only when an op touches
it)."""
import dataclasses

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import outcore
from outcore.plan import POLICIES, min_feasible_budget
from outcore.plan.schedule import DROP, SWAP_IN, SWAP_OUT
from outcore.run.compose import owned_occupancy, without_held
from outcore.run.ooc import pinned_peak

from .helpers import traces

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _plans(trace, fraction):
    budget = max(1, int(trace.peak(actual=True)[0] * fraction), min_feasible_budget(trace))
    for policy in POLICIES:
        schedule = outcore.plan(trace, budget, policy)
        outcore.check(trace, schedule, budget)
        yield schedule


@SETTINGS
@given(traces(), st.floats(0.3, 1.0), st.data())
def test_held_arrays_are_planned_free_and_never_moved(trace, fraction, data):
    held = frozenset(data.draw(st.sets(st.sampled_from([a.id for a in trace.arrays]))))
    plannable = without_held(trace, held)
    assert [a.id for a in plannable.arrays] == [a.id for a in trace.arrays]
    for schedule in _plans(plannable, fraction):
        moved = {act.array for step in schedule.begin + schedule.end for act in step
                 if act.kind in (SWAP_IN, SWAP_OUT, DROP)}
        # A held array that existed before may be read in once at the start of a plan that
        # starts without it, never moved out.
        outs = {act.array for step in schedule.end for act in step if act.kind in (SWAP_OUT, DROP)}
        assert not outs & held, (outs & held)
        assert moved & held <= {a.id for a in trace.arrays if a.existed_before}


@SETTINGS
@given(traces(), st.floats(0.3, 1.0))
def test_inputs_stay_resident_until_their_first_use(trace, fraction):
    inputs = {a.id: a.first_use for a in trace.arrays if a.kind == "input" and a.existed_before}
    for schedule in _plans(trace, fraction):
        assert set(inputs) <= set(schedule.resident_at_start)
        for i, step in enumerate(schedule.end):
            for act in step:
                if act.array in inputs and act.kind in (SWAP_OUT, DROP):
                    assert i >= inputs[act.array], (act, i, inputs[act.array])


@SETTINGS
@given(traces(), st.data())
def test_owned_arrays_count_only_between_a_write_and_its_last_use(trace, data):
    owned = frozenset(data.draw(st.sets(st.sampled_from([a.id for a in trace.arrays]))))
    curve = owned_occupancy(trace, owned)
    assert len(curve) == len(trace.functions)
    for fn in trace.functions:
        using = sum(trace.arrays[a].nbytes for a in set(fn.arrays()) & owned)
        assert curve[fn.index] >= using            # an owned array is counted while used
    assert max(curve, default=0) <= sum(trace.arrays[a].nbytes for a in owned)
    # Owned arrays count no more in the pinned peak than if they were held all along.
    assert pinned_peak(trace, 0, held=owned, owned=owned) <= pinned_peak(trace, 0, held=owned,
                                                                         owned=frozenset())


def test_a_zero_byte_parameter_plans_at_every_budget():
    """A 0-byte array (a held one, planned as free) once made every policy fail `check`:
    it was left out of the state kept at the start, then never read in (no cost, so no
    load). Now such arrays start resident and never move."""
    from .helpers import build
    trace = build({"w": (4, "param"), "x": (100, "input"), "h": 100, "g": 100},
                  ["mm r:x r:w c:h", "relu r:h c:g", "mm r:g r:w w:w"])
    zero = dataclasses.replace(trace, arrays=tuple(
        dataclasses.replace(a, nbytes=0) if a.nbytes == 4 else a for a in trace.arrays))
    for fraction in (0.5, 0.7, 1.0):
        for schedule in _plans(zero, fraction):     # check() inside _plans is the assertion
            assert schedule.peak_bytes <= max(int(zero.peak(actual=True)[0] * fraction),
                                              min_feasible_budget(zero))


def test_an_infeasible_budget_names_the_inputs_waiting_for_their_first_use():
    """An input first read late (an optimizer's history, as LBFGS keeps it) counts from
    the start of the step (`feasibility.needs`): the error says how much of the figure
    that is, since the function named does not itself need it."""
    from .helpers import build
    trace = build({"h": (6, "input"), "w": (2, "param"), "a": 2, "b": 2},
                  ["f0 r:w c:a", "f1 r:a c:b", "f2 @optimizer r:b r:h"])
    with pytest.raises(outcore.InfeasibleBudget,
                       match=r"function 0 .*needs 10 B .*, 6 B of it tensors that existed "
                             r"before the step and that it only reads"):
        outcore.plan(trace, 9)


def test_check_refuses_an_input_moved_before_its_first_use():
    # R8: the executor learns an input's storage at its first use, and the physical
    # limit's pressure bound counts on it staying there; a hand-made schedule that swaps
    # x out after f0 and reads it back for f3 simulated below that bound (helper-194).
    from outcore.errors import ScheduleError
    from outcore.plan.check import replay
    from outcore.plan.schedule import FREE, WAIT, Action

    from .helpers import build
    t = build({"x": (4, "input"), "a": 4, "b": 8}, ["f0 c:a", "f1 c:b", "f2 r:a", "f3 r:x"])
    x, a, b = 0, 1, 2
    end = [[Action(SWAP_OUT, x), Action(WAIT, x)], [Action(FREE, b)], [Action(FREE, a)],
           [Action(FREE, x)]]
    begin = [[], [], [Action(SWAP_IN, x)], []]
    with pytest.raises(ScheduleError, match=r"R8: function 0 \(f0, forward\) end: SWAP_OUT of "
                                            r"input array 0 before its first use \(function 3\)"):
        replay(t, begin, end, [x], 13)
    # After its first use it may leave like any other array.
    t = build({"x": (4, "input"), "a": 4}, ["f0 r:x c:a", "f1 r:a", "f2 r:x"])
    end = [[Action(SWAP_OUT, 0), Action(WAIT, 0)], [Action(FREE, 1)], [Action(FREE, 0)]]
    replay(t, [[], [], [Action(SWAP_IN, 0)]], end, [0], 8)
