"""The window engine's own contracts: its tally equals check.replay's accounting, every
start it is given is servable, one policy registry, and planning leaves the collector
as it found it."""
import dataclasses
import gc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import outcore
from outcore.errors import OutcoreError
from outcore.plan import POLICIES, min_feasible_budget
from outcore.plan.check import replay
from outcore.plan.policies import REGISTRY, register
from outcore.plan.policies.belady import keep_gaps
from outcore.plan.policies.window import plan_window

from .helpers import build, traces

OPTIONS = [{}, {"window_bytes": 0.5}, {"window_bytes": 2.0}, {"window_functions": 1, "eager_wait": True},
           {"window_functions": 3}, {"keep_state": False}, {"end_within_start": True},
           {"belady": True}, {"start_state": True}, {"start_state": True, "end_within_start": True},
           {"wait_order": "completion"}, {"wait_order": "completion", "window_bytes": 0.5},
           {"wait_order": "completion", "start_state": True},
           {"outputs": "late"}, {"outputs": "late", "wait_order": "completion"},
           {"outputs": "late", "belady": True}, {"outputs": "late", "start_state": True},
           {"outputs": "late", "window_bytes": 0.5}, {"outputs": "late", "window_functions": 3},
           {"outputs": "late", "keep_state": False, "end_within_start": True}]


def _options(trace, budget, spec, pick):
    opts = dict(spec)
    if "window_bytes" in opts:
        opts["window_bytes"] = max(1, int(budget * opts["window_bytes"]))
    if opts.pop("belady", False):
        kept = keep_gaps(trace, int(budget * 0.75))
        opts["keep"] = lambda a, f: (a, f) in kept
    if opts.get("start_state"):
        state = [a.id for a in trace.arrays if a.kind == "persistent" and a.existed_before]
        opts["start_state"] = [a for i, a in enumerate(state) if pick >> (i % 8) & 1]
    return opts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(max_functions=30), st.floats(0.0, 1.0), st.integers(0, 255))
def test_the_tally_is_replays_accounting_and_every_start_is_served(trace, fraction, pick):
    # api._cycle ranks candidates by the tally without replaying them, so it must be
    # exact; and a start_state (the state another plan ended with) must never make the
    # engine evict before function 0, where there is no function to evict after.
    low = min_feasible_budget(trace)
    budget = low + int((trace.peak(actual=True)[0] - low) * fraction)
    for spec in OPTIONS:
        wp = plan_window(trace, budget, **_options(trace, budget, spec, pick))
        acc = replay(trace, wp.begin, wp.end, wp.start, budget)
        assert (wp.bytes_in, wp.bytes_out) == (acc.bytes_in, acc.bytes_out), spec
        assert sorted(wp.resident_at_end) == sorted(acc.resident_at_end), spec


def test_state_that_does_not_fit_beside_the_first_function_starts_on_the_slow_tier():
    # w1 fits beside what function 0 holds (x, h: 6 B) but not beside w0 as well, which
    # function 0 must read in: 4 (x) + 4 (w1) + 4 (w0) + 2 (h) = 14 > 10. Starting with
    # w1 resident would need an eviction before function 0.
    t = build({"x": (4, "input"), "w0": (4, "param"), "w1": (4, "param"), "h": 2, "y": 2},
              ["f0 r:x r:w0 c:h", "f1 r:h r:w1 c:y", "upd @optimizer w:w0 w:w1 r:y"])
    w1 = 2
    wp = plan_window(t, 10, start_state=[w1])
    assert w1 not in wp.start
    replay(t, wp.begin, wp.end, wp.start, 10)            # raises on any violation
    for policy in POLICIES:
        outcore.check(t, outcore.plan(t, 10, policy), 10)


def test_one_registry_names_every_policy_and_its_options():
    assert POLICIES == tuple(REGISTRY) == ("auto", "adaptive", "fixed", "on-demand",
                                           "adaptive-belady")
    t = build({"x": (8, "input"), "w": (4, "param"), "h": 8, "y": 8},
              ["fwd r:x r:w c:h", "act r:h c:y", "upd @optimizer w:w r:y"])
    values = {"window": 64, "k": 2, "reserve": 0.5, "keep_state": False, "machine": "cpu-disk",
              "wait_order": "completion", "outputs": "late", "screen": [0, 5],
              "end_keep_share": 1.0}
    for name, policy in REGISTRY.items():
        assert policy.summary and {"keep_state", "end_keep_share"} <= policy.options
        assert (policy.plan is None) != (policy.choose is None)
        s = outcore.plan(t, 20, name, **{o: values[o] for o in policy.options})
        outcore.check(t, s, 20)
        with pytest.raises(OutcoreError, match=f"policy '{name}' takes no option"):
            outcore.plan(t, 20, name, bogus=1)
    with pytest.raises(ValueError, match="registered twice"):
        register("adaptive")(lambda *a, **k: None)


@pytest.mark.parametrize("enabled", [True, False])
def test_planning_puts_the_collector_back_as_it_was(enabled):
    t = build({"x": (8, "input"), "w": (4, "param"), "h": 8, "y": 8, "z": 8},
              ["fwd r:x r:w c:h", "act r:h c:y", "act r:y c:z", "upd @optimizer r:h r:z w:w"])
    assert min_feasible_budget(t) == 20 and t.peak(actual=True)[0] == 28
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        assert outcore.plan(t, 22, "adaptive").bytes_moved > 0      # planned, not in-core
        assert gc.isenabled() is enabled
        with pytest.raises(OutcoreError, match="k must be a positive"):
            outcore.plan(t, 22, "fixed", k=0)             # raised inside the paused part
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(max_functions=30), st.floats(0.0, 1.0))
def test_auto_is_the_fastest_screened_schedule_and_the_same_as_asking_for_it(trace, fraction):
    from outcore.simulate import simulate
    low = min_feasible_budget(trace)
    budget = low + int((trace.peak(actual=True)[0] - low) * fraction)
    s = outcore.plan(trace, budget)
    assert s.policy == "auto"
    if s.options.get("in_core"):
        return
    from outcore.plan.policies import auto
    from outcore.plan.policies.edges import end_keep_set
    screened = s.options["screened"]
    assert [n for n, _, _ in screened[:7]] == ["adaptive", "adaptive-belady", "fixed", "adaptive",
                                               "adaptive", "adaptive", "adaptive"]
    first = min(t for _, _, t in screened[:7])
    for name, extra, seconds in screened[7:]:    # NOTE [Shares at the end]: near ties again
        share = extra.pop("end_keep_share")
        assert share == 1.0 and [name, extra] in [[n, e] for n, e, t in screened[:7]
                                                  if t <= first * (1 + auto.NEAR)]
        assert end_keep_set(trace, budget, share) != end_keep_set(trace, budget)
        extra["end_keep_share"] = share
    fastest = min(range(len(screened)), key=lambda i: (screened[i][2], i))
    name, extra, seconds = screened[fastest]
    assert s.options["chosen"] == name and s.options["machine"] == "cpu-disk"
    by_name = outcore.plan(trace, budget, name, **extra)
    assert (s.begin, s.end, s.resident_at_start) == (by_name.begin, by_name.end,
                                                     by_name.resident_at_start)
    assert simulate(trace, by_name, "cpu-disk").iteration_time_s == seconds
    for n, e, t in screened:                 # each figure is that policy's own schedule
        assert simulate(trace, outcore.plan(trace, budget, n, **e)).iteration_time_s == t


def test_completion_order_waits_for_the_swap_out_the_link_finishes_first():
    # a (f0) and b (f1) are read back after forward: a at f5, b at f6. At budget 12 one
    # of them must be out before f3 creates d. Belady's order keeps a, needed sooner,
    # in flight and writes b after f2; completion order writes a as soon as it leaves
    # after f1, and its copy is done sooner: the same bytes, and f3 waits 3 s instead of
    # 4 at 1 B/s out (reading back is fast here: only the wait before f3 differs).
    from outcore.plan.schedule import SWAP_OUT, WAIT, Action
    from outcore.simulate import Machine, simulate
    t = build({"a": 4, "b": 4, "c": 4, "d": 4, "e": 4},
              ["f0 c:a", "f1 r:a c:b", "f2 r:b c:c", "f3 r:c c:d", "f4 r:d c:e", "f5 r:e r:a",
               "f6 r:e r:b"], durations=[1.0] * 7)
    a, b = 0, 1
    belady = outcore.plan(t, 12, "adaptive")
    first = outcore.plan(t, 12, "adaptive", wait_order="completion")
    assert Action(SWAP_OUT, b) in belady.end[2] and Action(WAIT, b) in belady.begin[3]
    assert Action(SWAP_OUT, a) in first.end[1] and Action(WAIT, a) in first.begin[3]
    assert first.bytes_moved == belady.bytes_moved
    toy = Machine("toy", peak_flops=1.0, memory_bandwidth=1.0, fast_bytes=100, link_in=1e9,
                  link_out=1.0, link_latency_s=0.0, use_trace_durations=True)
    slow, fast = simulate(t, belady, toy), simulate(t, first, toy)
    assert (slow.stall_s[3], fast.stall_s[3]) == (4.0, 3.0)
    assert slow.step_time_s == pytest.approx(fast.step_time_s + 1.0)
    assert first.options["wait_order"] == "completion"
    with pytest.raises(OutcoreError, match="wait_order must be one of farthest, completion"):
        outcore.plan(t, 12, "adaptive", wait_order="newest")


@pytest.mark.parametrize("options", [{}, {"wait_order": "completion"}, {"outputs": "late"}])
def test_a_prefetch_does_not_wait_behind_a_swap_out_it_cannot_use(options):
    # NOTE [A prefetch waits at the head]: a (8 B) leaves after f0 and is read back in
    # backward; the parameter s is written out after its last use, f1, queued behind a.
    # The window at f2 reaches f3's output b: room for it would come from s, never used
    # again, but waiting for s waits for a's copy too (9 s at 1 B/s) before f2's 10 s of
    # compute. So the prefetch stops and f3 waits for s, written by then.
    from outcore.plan.schedule import WAIT, Action
    from outcore.simulate import Machine, simulate
    t = build({"a": 8, "s": (1, "param"), "x": (1, "input"), "b": 2, "c": 8},
              ["f0 c:a", "f1 w:s", "f2 r:x", "f3 c:b", "f4 r:b c:c", "f5 r:c",
               "b0 @backward r:a"], durations=[1.0, 1e-3, 10.0, 1e-3, 1e-3, 1e-3, 1e-3])
    schedule = outcore.plan(t, 10, "adaptive", keep_state=False, **options)
    assert schedule.begin[2] == () and Action(WAIT, 1) in schedule.begin[3]
    toy = Machine("toy", peak_flops=1.0, memory_bandwidth=1.0, fast_bytes=100, link_in=1.0,
                  link_out=1.0, link_latency_s=0.0, use_trace_durations=True)
    sim = simulate(t, schedule, toy)
    assert sim.stall_s[:6] == (0.0,) * 6 and sim.step_time_s == pytest.approx(19.005)


def test_completion_order_passes_over_arrays_within_the_windows_last_reach():
    # Two swap-outs in flight: b (issued first, read again at f4) and a (read at f9).
    # Making room before f2, completion order waits for the oldest, b, unless f4 lies
    # within the window's last reach from f2 (the head stood `reach` functions past the
    # previous function): then the window will likely read b again and cancel its
    # swap-out, so b is passed over and Belady's choice, a, is waited for instead.
    from outcore.plan.policies.window import _WindowPlanner
    from outcore.plan.schedule import WAIT, Action
    from outcore.states import OUT
    t = build({"b": 4, "a": 4}, ["f0 c:b", "f1 c:a"] + [f"g{i}" for i in range(2, 10)],
              durations=[1.0] * 10)
    for reach, waited in ((3, "a"), (1, "b")):
        p = _WindowPlanner(t, 100, window_bytes=None, window_functions=None, keep=None,
                           eager_wait=False, keep_state=True, start_state=None,
                           end_within_start=False, wait_order="completion")
        b, a = 0, 1
        for array, issued, next_use in ((b, 0, 4), (a, 1, 9)):
            p.swap_outs.push(array, issued, next_use)
            p.state[array] = OUT
            p.reserved.soft += 4
        p.reach = reach
        if waited == "a":
            assert not p.wait_oldest_outside_reach(2)
            assert p.wait_farthest(2, dead_only=False)
        else:
            assert p.wait_oldest_outside_reach(2)
        assert p.begin[2] == [Action(WAIT, {"a": a, "b": b}[waited])]


def test_the_report_names_completion_order_when_auto_chooses_it():
    from outcore.run.ooc import _policy_label
    t = build({"a": 4, "b": 4, "c": 4, "d": 4, "e": 4},
              ["f0 c:a", "f1 r:a c:b", "f2 r:b c:c", "f3 r:c c:d", "f4 r:d c:e", "f5 r:e r:a",
               "f6 r:e r:b"], durations=[1.0] * 7)
    s = outcore.plan(t, 12)
    first = outcore.plan(t, 12, "adaptive", wait_order="completion")
    chosen = dataclasses.replace(s, options={**s.options, **first.options,
                                             "chosen": "adaptive"})
    assert _policy_label(chosen) == "auto (adaptive, completion order)"
    assert _policy_label(first) == "adaptive"
    plain = {k: v for k, v in s.options.items() if k != "wait_order"}
    assert _policy_label(dataclasses.replace(s, options={**plain, "chosen": "fixed"})) \
        == "auto (fixed)"
    late = outcore.plan(t, 12, "adaptive", wait_order="completion", outputs="late")
    assert _policy_label(dataclasses.replace(s, options={**s.options, **late.options,
                                                         "chosen": "adaptive"})) \
        == "auto (adaptive, completion order, outputs late)"
    assert _policy_label(dataclasses.replace(s, options={**plain, "chosen": "fixed",
                                                         "end_keep_share": 1.0})) \
        == "auto (fixed, end_keep_share=1.0)"
    with pytest.raises(OutcoreError, match="outputs must be one of early, late"):
        outcore.plan(t, 12, "adaptive", outputs="lazy")


def test_auto_screens_fewer_configurations_on_long_traces():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    try:
        from plan_speed import synthetic
    finally:
        sys.path.pop(0)
    from outcore.plan.policies import auto
    for trace, tried in ((synthetic(400), 7), (synthetic(7000), 4)):
        accesses = sum(len({a.array for a in fn.accesses}) for fn in trace.functions)
        work = auto.PLANS_PER_CONFIGURATION * accesses
        assert tried == min(len(auto.SCREEN), max(1, auto.SCREEN_ACCESSES // work))
        s = outcore.plan(trace, trace.peak(actual=True)[0] // 3)
        screened = s.options["screened"]
        assert ["end_keep_share" in extra for _, extra, _ in screened[:tried]] == [False] * tried
        assert len(screened) <= max(tried, auto.SCREEN_ACCESSES // work)  # shares within it
        assert "auto tried (simulated iteration on cpu-disk): adaptive" in s.summary()


def test_auto_refuses_an_unknown_machine_and_options_of_other_policies():
    t = build({"x": (8, "input"), "w": (4, "param"), "h": 8, "y": 8, "z": 8},
              ["fwd r:x r:w c:h", "act r:h c:y", "act r:y c:z", "upd @optimizer r:h r:z w:w"])
    with pytest.raises(OutcoreError, match="unknown machine 'tpu'"):
        outcore.plan(t, 22, machine="tpu")
    with pytest.raises(OutcoreError, match="policy 'auto' takes no option"):
        outcore.plan(t, 22, window=64)
    assert outcore.plan(t, 22, machine="v100-16gb").options["machine"] == "v100-16gb"


def test_a_functions_workspace_is_room_the_plan_leaves_free_while_it_runs():
    # f2 takes 6 B of workspace beside a (4) and b (4): it needs 14 B. Under 14 B the
    # plan must have w (2, read again by f3) out during f2, and check refuses a schedule
    # that forgets the workspace.
    t = build({"w": (2, "param"), "a": 4, "b": 4, "c": 2},
              ["f0 r:w c:a", "f1 r:a c:b", "f2 r:a r:b c:c", "f3 @backward r:c r:w"],
              workspace={2: 6})
    assert min_feasible_budget(t) == 4 + 4 + 2 + 6          # a, b, c and the workspace
    assert t.peak(actual=True) == (2 + 4 + 4 + 2 + 6, 2)      # in-core: w stays too
    for policy in POLICIES:
        s = outcore.plan(t, 16, policy)
        outcore.check(t, s, 16)
        assert s.resident_curve[2] == 16 and s.peak_bytes == 16, policy      # w is out
    no_room = outcore.plan(build({"w": (2, "param"), "a": 4, "b": 4, "c": 2},
                                 ["f0 r:w c:a", "f1 r:a c:b", "f2 r:a r:b c:c",
                                  "f3 @backward r:c r:w"]), 16, "adaptive")
    with pytest.raises(outcore.ScheduleError, match="R2: function 2 .* 18 B on the fast tier "
                                                    r"\(6 B of it its workspace\)"):
        outcore.check(t, no_room, 16)
    with pytest.raises(outcore.InfeasibleBudget,
                       match=r"needs 16 B on the fast tier at once, 6 B of it the op's "
                             "own workspace"):
        outcore.plan(t, 15)


def test_outputs_reserved_late_let_a_prefetch_pass_an_output_whose_room_frees_first():
    # p (5 B) dies after f1; f2 creates X (5 B); f3 reads X and w (4 B, on the slow tier
    # at the start). Reserving X from when the window reaches it (early) counts p and X
    # together, 10 B of a 10 B budget, so w's swap-in waits behind X until p is gone
    # (issued at f2); reserving X from f2 on (late), w fits beside p at f0-f1 and beside
    # X at f2-f3, so it is issued at f0, two functions sooner.
    from outcore.plan.schedule import SWAP_IN, Action
    t = build({"w": (4, "param"), "p": 5, "X": 5},
              ["f0 c:p", "f1 r:p", "f2 c:X", "f3 r:X r:w"], durations=[1.0] * 4)
    w = 0
    issued = {}
    for outputs in ("early", "late"):
        wp = plan_window(t, 10, keep_state=False, outputs=outputs)
        assert w not in wp.start
        replay(t, wp.begin, wp.end, wp.start, 10)             # raises on any violation
        issued[outputs] = next(i for i, acts in enumerate(wp.begin) if Action(SWAP_IN, w) in acts)
    assert issued == {"early": 2, "late": 0}


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 200),
       st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.integers(-50, 100),
                          st.booleans(), st.floats(0, 1), st.floats(0, 1)), max_size=60))
def test_the_reservations_equal_a_plain_list(n, ops):
    # _Reserved keeps its per-function bytes in one numpy array, added and searched a
    # span at a time; every span added, every open span closed, every peak and every
    # value read must be what a plain list of n + 1 Python counters gives, as Python ints.
    from outcore.plan.policies.window import _Reserved

    r, plain = _Reserved(n, 1), [0] * (n + 1)
    for x, y, nbytes, is_close, u, v in ops:
        s, e = sorted((int(x * n), int(y * n)))
        if is_close:
            r.end[0] = n
            r.close(0, s, nbytes)
            for h in range(s + 1, n + 1):
                plain[h] -= nbytes
        else:
            r.add(-1, s, e, nbytes)
            for h in range(s, e + 1):
                plain[h] += nbytes
        assert r.peak(s, e) == max(plain[s:e + 1])
        lo, hi = sorted((int(u * n), int(v * n)))         # and anywhere else
        assert r.peak(lo, hi) == max(plain[lo:hi + 1])
        assert r.peak(hi, lo) == (0 if lo < hi else plain[lo])   # over none: nothing
        values = [r.now(h) for h in range(n + 1)]
        assert values == plain and all(type(x) is int for x in values)
        assert type(r.peak(lo, hi)) is int


def test_auto_screens_only_the_configurations_it_is_given():
    from outcore.plan.policies import auto
    t = build({"a": 4, "b": 4, "c": 4, "d": 4, "e": 4},
              ["f0 c:a", "f1 r:a c:b", "f2 r:b c:c", "f3 r:c c:d", "f4 r:d c:e", "f5 r:e r:a",
               "f6 r:e r:b"], durations=[1.0] * 7)
    everything = outcore.plan(t, 12)
    assert len(everything.options["screened"]) == len(auto.SCREEN)
    i = everything.options["configuration"]
    name, extra, seconds = everything.options["screened"][i]
    assert everything.options["chosen"] == name
    alone = outcore.plan(t, 12, screen=[i])
    assert alone.options["screened"] == [[name, extra, None]]      # nothing to compare: not simulated
    assert f"  auto planned one configuration alone, {name}" in alone.summary()
    assert (alone.begin, alone.end) == (everything.begin, everything.end)
    for bad in ([], [len(auto.SCREEN)], "0", [-1]):
        with pytest.raises(OutcoreError, match="screen must be a non-empty list of indices"):
            outcore.plan(t, 12, screen=bad)


def _kept_at_the_end_step(layers=3):
    """Forward reads each layer's weight w, backward makes its gradient g, and the
    optimizer updates w and its momentum m: 8 B each, every function 1 s."""
    arrays = {"x": (4, "input")}
    for l in range(layers):
        arrays.update({f"w{l}": (8, "param"), f"m{l}": (8, "param"), f"a{l}": 8, f"g{l}": 8})
    fns, h = [], "x"
    for l in range(layers):
        fns.append(f"fwd r:{h} r:w{l} c:a{l}")
        h = f"a{l}"
    fns += [f"bwd @backward r:a{l} r:w{l} c:g{l}" for l in reversed(range(layers))]
    fns += [f"sgd @optimizer r:g{l} w:m{l} w:w{l}" for l in range(layers)]
    return build(arrays, fns, durations=[1.0] * len(fns))


def test_end_keep_share_is_checked_and_is_the_room_state_kept_at_the_end_may_fill():
    from outcore.plan.policies.edges import end_keep_set
    t = _kept_at_the_end_step()
    budget = 50
    assert len(end_keep_set(t, budget, 1.0)) > len(end_keep_set(t, budget))
    for name in ("adaptive", "fixed", "on-demand", "adaptive-belady"):
        default = outcore.plan(t, budget, name)
        more = outcore.plan(t, budget, name, end_keep_share=1.0)
        outcore.check(t, more, budget)
        assert "end_keep_share" not in default.options
        assert more.options["end_keep_share"] == 1.0
        assert set(more.resident_at_end) > set(default.resident_at_end), name
        for bad in (0, -0.5, 1.5, "1", True, None):
            for b in (budget, 2 * t.peak(actual=True)[0]):    # and where the step fits
                with pytest.raises(OutcoreError, match="end_keep_share must be a fraction "
                                                       r"of the budget in \(0, 1\]"):
                    outcore.plan(t, b, name, end_keep_share=bad)


def test_auto_tries_each_near_tie_again_with_the_whole_budget_for_state_kept_at_the_end():
    # NOTE [Shares at the end]. On a slow link, keeping all three momenta and weights
    # at the end (1.0 x 50 B) saves reading them at the next step more than the room
    # it takes from the forward pass costs.
    from outcore.plan.policies import auto
    from outcore.simulate import machine, simulate
    t = _kept_at_the_end_step()
    m = dataclasses.replace(machine("cpu-disk"), name="slow", link_in=1e3, link_out=1e3)
    s = outcore.plan(t, 50, machine=m)
    screened = s.options["screened"]
    first, again = screened[:len(auto.SCREEN)], screened[len(auto.SCREEN):]
    fastest = min(seconds for _, _, seconds in first)
    near = [[n, e] for n, e, seconds in sorted(first, key=lambda r: r[2])   # stable: ties
            if seconds <= fastest * (1 + auto.NEAR)]                       # in SCREEN order
    assert again and [[n, {k: v for k, v in e.items() if k != "end_keep_share"}]
                      for n, e, _ in again] == near
    assert s.options["end_keep_share"] == 1.0
    assert min(seconds for _, _, seconds in again) < fastest
    name, extra, seconds = min(screened, key=lambda r: r[2])
    by_name = outcore.plan(t, 50, name, **extra)
    assert (s.begin, s.end) == (by_name.begin, by_name.end)
    assert simulate(t, by_name, m).iteration_time_s == seconds
    # a share the user names is every configuration's, and none other is tried
    given = outcore.plan(t, 50, machine=m, end_keep_share=0.75)
    assert len(given.options["screened"]) == len(auto.SCREEN)
    assert "end_keep_share" not in given.options
    # nor where state is not kept at all
    assert len(outcore.plan(t, 50, machine=m, keep_state=False).options["screened"]) \
        == len(auto.SCREEN)
