"""Small traces with the exact schedule each policy must produce, checkable by eye.

Most tests plan with keep_state=False: persistent state then starts and ends the step on
the slow tier, as in the paper, which keeps each mechanism visible on its own. The tests
at the end cover keep_state (the default), where state that fits stays resident."""
import dataclasses

import pytest

import outcore
from outcore.plan import POLICIES
from outcore.plan.schedule import SWAP_IN, Action

from .helpers import build


def acts(text: str) -> tuple:
    """'in w, drop a' -> (Action(SWAP_IN, w-id), ...) with ids looked up in IDS."""
    kinds = {"in": "SWAP_IN", "out": "SWAP_OUT", "wait": "WAIT", "drop": "DROP", "free": "FREE"}
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, name = part.split()
        out.append(Action(kinds[kind], IDS[name]))
    return tuple(out)


IDS = {}


def plan_paper(trace, budget, policy="adaptive", **options):
    return outcore.plan(trace, budget, policy, keep_state=False, **options)


def names(trace_arrays):
    IDS.clear()
    IDS.update({name: i for i, name in enumerate(trace_arrays)})


# A chain whose activation `a` is needed again in the "backward" function f3.
#   live in-core: f0 x+a=8, f1 a+b=8, f2 a+b+c=12, f3 a+c=8  -> peak 12
CHAIN = {"x": (4, "input"), "a": 4, "b": 4, "c": 4}
CHAIN_FNS = ["f0 r:x c:a", "f1 r:a c:b", "f2 r:b c:c", "f3 @backward r:a r:c"]


@pytest.mark.parametrize("policy", ["on-demand", "adaptive", "fixed", "adaptive-belady"])
def test_chain_under_8_bytes_swaps_a_out_and_back(policy):
    names(CHAIN)
    t = build(CHAIN, CHAIN_FNS)
    s = plan_paper(t, 8, policy)
    # After f1, `a` is not needed until f3: out it goes. f2 must create c while the copy
    # of a is in flight, so it waits for it first; f3 brings a back.
    assert s.begin == ((), (), acts("wait a"), acts("in a"))
    assert s.end == (acts("free x"), acts("out a"), acts("free b"), acts("free a, free c"))
    assert (s.bytes_in, s.bytes_out, s.peak_bytes) == (4, 4, 8)
    assert s.resident_curve == (8, 8, 8, 8)
    assert s.resident_at_start == (IDS["x"],) and s.resident_at_end == ()


def test_chain_that_fits_moves_nothing():
    names(CHAIN)
    t = build(CHAIN, CHAIN_FNS)
    for policy in POLICIES:
        s = plan_paper(t, 12, policy)
        assert s.begin == ((), (), (), ())
        assert s.end == (acts("free x"), (), acts("free b"), acts("free a, free c"))
        assert s.bytes_moved == 0 and s.peak_bytes == 12


# A parameter w used in forward (f0) and backward (f4); after f2 frees b there is room
# to bring w back early.  live in-core: 6, 10, 10, 8, 4 -> peak 10; budget 8.
PREFETCH = {"w": (2, "param"), "a": 4, "b": 4, "c": 4, "d": 2}
PREFETCH_FNS = ["f0 r:w c:a", "f1 r:a c:b", "f2 r:b c:c", "f3 r:c c:d", "f4 @backward r:d r:w"]


def test_adaptive_prefetches_a_function_ahead_and_on_demand_does_not():
    names(PREFETCH)
    t = build(PREFETCH, PREFETCH_FNS)
    ends = (acts("drop w"), acts("free a"), acts("free b"), acts("free c"), acts("free d, drop w"))
    adaptive = plan_paper(t, 8, "adaptive")
    # w starts on the slow tier (it does not fit for the whole step), is read by f0 and
    # dropped (its slow copy is current: no copy back). At f3 the window reaches f4 and
    # has 2 bytes free: w is swapped in one function ahead, hiding the transfer behind f3.
    assert adaptive.begin == (acts("in w"), (), (), acts("in w"), ())
    assert adaptive.end == ends
    on_demand = plan_paper(t, 8, "on-demand")
    assert on_demand.begin == (acts("in w"), (), (), (), acts("in w"))
    assert on_demand.end == ends
    assert adaptive.bytes_in == on_demand.bytes_in == 4 and adaptive.bytes_out == 0
    assert outcore.lower_bound(t, 8).bytes_moved == 2   # w could have stayed resident


def test_swap_out_still_in_flight_is_cancelled_when_the_window_needs_it_again():
    # f0 is heavy (it also creates a workspace t), so the window stops before f1's
    # output and `a` (written by f0, next read by f2) is swapped out after f0. Freeing t
    # makes room; at f1 the window reaches f2's use of `a` while its copy is still in
    # flight: the swap-out is cancelled and `a` simply stays. p (read at f3 only) keeps
    # the in-core peak at 16 > 12.
    arrays = {"a": (4, "param"), "b": 4, "t": 4, "c": 4, "p": (4, "param")}
    names(arrays)
    t = build(arrays, ["f0 w:a c:b c:t", "f1 r:b c:c", "f2 r:a r:c", "f3 r:p"])
    s = plan_paper(t, 12, "adaptive")
    assert s.begin == (acts("in a"), (), acts("in p"), ())
    assert s.end == (acts("free t"), acts("free b"), acts("out a, free c"), acts("drop p, wait a"))
    assert (s.bytes_in, s.bytes_out) == (8, 4)      # a in once, p in once; a out once at the end


def test_window_limit_counts_bytes():
    # Same trace as PREFETCH with a window too small to reach f4 from f3: no early swap-in.
    names(PREFETCH)
    t = build(PREFETCH, PREFETCH_FNS)
    s = plan_paper(t, 8, "adaptive", window=6)
    assert s.begin[3] == () and s.begin[4] == acts("in w")
    assert s.options["window"] == 6


def test_infeasible_budget_names_the_function():
    names(CHAIN)
    t = build(CHAIN, CHAIN_FNS)
    with pytest.raises(outcore.InfeasibleBudget) as info:
        plan_paper(t, 7, "adaptive")
    e = info.value
    assert (e.function_index, e.op, e.phase) == (0, "f0", "forward")
    assert (e.needed_bytes, e.budget_bytes, e.min_feasible_bytes) == (8, 7, 8)
    assert "function 0 (f0, forward)" in str(e) and "smallest feasible budget" in str(e)
    with pytest.raises(outcore.InfeasibleBudget):
        outcore.lower_bound(t, 7)


def test_budget_strings_and_unknown_policy_or_option():
    t = build(CHAIN, CHAIN_FNS)
    assert plan_paper(t, "1KiB").budget == 1024
    with pytest.raises(outcore.OutcoreError, match="unknown policy"):
        plan_paper(t, 8, "lru")
    with pytest.raises(outcore.OutcoreError, match="takes no option"):
        plan_paper(t, 8, "adaptive", k=3)
    with pytest.raises(outcore.OutcoreError, match="lower_bound"):
        plan_paper(t, 8, "lower-bound")


def test_summary_and_json_round_trip(tmp_path):
    names(PREFETCH)
    t = build(PREFETCH, PREFETCH_FNS)
    s = plan_paper(t, 8, "adaptive")
    text = s.summary(trace=t)
    assert "moved in" in text and "f3 f3 (forward): before [in a1]" not in text
    assert "f3 f3 (forward): before [in a0] after [free a3]" in text
    assert str(s).startswith("Schedule (adaptive")
    # A function with many actions (a step that starts on the slow tier reads hundreds
    # before its first function) lists the first twelve and how many more.
    many = dataclasses.replace(s, begin=(tuple(Action(SWAP_IN, a) for a in range(30)),
                                         *s.begin[1:]))
    first = next(line for line in many.summary(trace=t).splitlines() if line.startswith("  f0 "))
    assert "in a11 ... and 18 more] after" in first
    assert "in a12" not in first
    path = tmp_path / "s.json"
    s.save(path)
    again = outcore.Schedule.load(path)
    assert again == s and again.options == s.options
    outcore.check(t, again)


# Held arrays (docs/planning.md#held-arrays). A gradient g is created by the backward
# function f1, read for the last time by the optimizer f2, but held by `param.grad` until
# zero_grad (f4): freed_after 4. b is a big array f3 creates.
#   occupancy (held g included): f0 x+w+a=8, f1 w+a+g=8, f2 w+g=4, f3 w+g+b=12, f4 12
#   without g after f2 (what the planner used to assume): peak 10.
GRAD = {"x": (2, "input"), "w": (2, "param"), "a": 4, "g": 2, "b": 8}
GRAD_FNS = ["fwd r:x r:w c:a", "bwd @backward r:a r:w c:g", "sgd @optimizer r:g w:w",
            "next @other c:b", "zero_grad @other r:b"]


def grad_trace():
    names(GRAD)
    return build(GRAD, GRAD_FNS, held={"g": 4})


def test_held_gradient_fits_only_in_core_when_its_occupancy_does():
    t = grad_trace()
    assert t.peak()[0] == 10 and t.peak(actual=True)[0] == 12
    for policy in POLICIES:
        s = plan_paper(t, 12, policy)
        assert s.options.get("in_core") is True
        assert s.begin == ((),) * 5
        assert s.end == (acts("free x"), acts("free a"), (), (), acts("free g, free b"))
        assert s.bytes_moved == 0 and s.resident_curve == (8, 8, 4, 12, 12)


@pytest.mark.parametrize("policy", POLICIES)
def test_held_gradient_stays_resident_when_the_budget_has_room(policy):
    # Budget 10 < 12: w (persistent, starts on the slow tier) is swapped in for f0 and out
    # after its last use. Waiting for that copy leaves g's 2 bytes of room at f3: g is
    # never touched after f2 and is FREEd where PyTorch releases it, after f4.
    t = grad_trace()
    s = plan_paper(t, 10, policy)
    assert "in_core" not in s.options
    assert s.begin == (acts("in w"), (), (), acts("wait w"), ())
    assert s.end == (acts("free x"), acts("free a"), acts("out w"), (), acts("free b, free g"))
    assert (s.bytes_in, s.bytes_out) == (2, 2)          # w only; nothing moves for g
    assert s.resident_curve == (8, 8, 4, 10, 10)
    assert outcore.lower_bound(t, 10).bytes_moved == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_held_gradient_is_swapped_out_when_the_budget_has_no_room(policy):
    # Budget 8: f3 needs all of it. After waiting for w's copy, g (dead since f2, but held)
    # must leave: swapped out right after its last use, waited for before f3, never
    # swapped back in, and still FREEd after f4 (dropping its slow copy).
    t = grad_trace()
    s = plan_paper(t, 8, policy)
    assert s.begin == (acts("in w"), (), (), acts("wait w, wait g"), ())
    assert s.end == (acts("free x"), acts("free a"), acts("out w, out g"), (), acts("free b, free g"))
    assert (s.bytes_in, s.bytes_out) == (2, 4)
    assert s.resident_curve == (8, 8, 4, 8, 8)
    assert outcore.lower_bound(t, 8).bytes_moved == 2    # g's 2 bytes must be written


def test_clean_held_array_is_dropped_and_a_held_input_swapped_out():
    # a is swapped out after f0 and back in for its last read at f3, then held until f5:
    # its slow copy is current, so it is DROPped right after f3 (no transfer) and FREEd
    # after f5. The input x is held by the caller to the end of the step (freed_after
    # None); at budget 10 f3 needs all the room, so x is swapped out after f2. The
    # windowed policies wait for a's swap-out only when f2 itself needs the room (a
    # prefetch for f2 at f1 may not evict a, which is used again); on-demand waits eagerly.
    arrays = {"x": (2, "input"), "a": 4, "b": 4, "c": 4, "d": 2}
    names(arrays)
    t = build(arrays, ["f0 r:x c:a", "f1 c:b", "f2 r:b c:c", "f3 r:a r:c c:d", "f4 r:d", "f5 r:d"],
              held={"a": 5, "x": None})
    for policy in POLICIES:
        s = plan_paper(t, 10, policy)
        wait_a = 1 if policy == "on-demand" else 2
        begin = [(), (), (), acts("in a, wait x"), (), ()]
        begin[wait_a] = acts("wait a")
        assert s.begin == tuple(begin)
        assert s.end == (acts("out a"), (), acts("free b, out x"), acts("drop a, free c"), (),
                         acts("free d, free x, free a"))
        assert (s.bytes_in, s.bytes_out) == (4, 6)
    assert outcore.lower_bound(t, 10).bytes_moved == 4    # a read back once, x written


def _with(s, *, begin=None, end=None):
    return outcore.Schedule(policy=s.policy, budget=s.budget, begin=begin or s.begin,
                            end=end or s.end, resident_at_start=s.resident_at_start,
                            resident_at_end=s.resident_at_end, bytes_in=s.bytes_in,
                            bytes_out=s.bytes_out, peak_bytes=s.peak_bytes,
                            resident_curve=s.resident_curve)


def test_check_enforces_release_points():
    t = grad_trace()
    s = plan_paper(t, 12, "adaptive")
    outcore.check(t, s)
    # FREE at the last use (the old planner's assumption): the storage is still held.
    early = list(s.end)
    early[2], early[4] = acts("free g"), acts("free b")
    with pytest.raises(outcore.ScheduleError, match="still held by PyTorch until function 4"):
        outcore.check(t, _with(s, end=tuple(early)))
    # No FREE at all.
    missing = list(s.end)
    missing[4] = acts("free b")
    with pytest.raises(outcore.ScheduleError, match="array 3 is never freed"):
        outcore.check(t, _with(s, end=tuple(missing)))
    # FREE after the release point.
    names(GRAD)
    longer = build(GRAD, GRAD_FNS + ["tail @other r:w"], held={"g": 4})
    s6 = plan_paper(longer, 12, "adaptive")
    late = list(s6.end)
    late[4], late[5] = acts("free b"), acts("free g")
    with pytest.raises(outcore.ScheduleError, match="already released after function 4"):
        outcore.check(longer, _with(s6, end=tuple(late)))


def test_check_allows_swap_out_of_held_but_not_swap_in_after_last_use():
    t = grad_trace()
    s = plan_paper(t, 8, "adaptive")
    outcore.check(t, s)                                   # out g after its last use: fine
    # Bringing g back after its last use is an error, even with room for it.
    begin = list(s.begin)
    begin[4] = acts("in g")
    end = list(s.end)
    end[4] = acts("free b, free g")
    with pytest.raises(outcore.ScheduleError, match="SWAP_IN of array 3, whose last use was function 2"):
        outcore.check(t, _with(s, begin=tuple(begin), end=tuple(end)), 12)
    # A SWAP_OUT at (or after) the release point is an error: the storage is gone.
    s12 = plan_paper(t, 12, "adaptive")
    end = list(s12.end)
    end[4] = acts("free b, out g, wait g")
    with pytest.raises(outcore.ScheduleError, match="released by PyTorch after function 4"):
        outcore.check(t, _with(s12, end=tuple(end)))
    # Dropping the held bytes from the budget accounting is caught too: without the WAIT,
    # f3 runs with g's copy still in flight.
    begin = list(s.begin)
    begin[3] = acts("wait w")
    end = list(s.end)
    end[4] = acts("free b, wait g, free g")
    with pytest.raises(outcore.ScheduleError, match="R2: function 3"):
        outcore.check(t, _with(s, begin=tuple(begin), end=tuple(end)))


def test_room_comes_from_the_swap_out_needed_farthest_ahead():
    # u and v are written at f0 and swapped out after it (next read at f3 and f4). f2
    # needs room for k: Belady's order waits for v (needed last), so u's swap-out is
    # still in flight when f3 needs it and is cancelled. Waiting oldest first (u) would
    # have read u back in. Adaptive's prefetch of f3's u at f2 does not evict it either.
    arrays = {"u": (4, "param"), "v": (4, "param"), "h": 4, "k": 4}
    names(arrays)
    t = build(arrays, ["f0 w:u w:v", "f1 c:h", "f2 r:h c:k", "f3 r:u r:k", "f4 r:v"])
    for policy, options in (("fixed", {"k": 1}), ("adaptive", {})):
        s = plan_paper(t, 12, policy, **options)
        assert s.begin[2] == acts("wait v")
        assert s.end[0] == acts("out v") and s.end[3] == acts("out u, free k")
        assert (s.bytes_in, s.bytes_out) == (12, 8)
    assert plan_paper(t, 12, "on-demand").bytes_in == 16


def test_state_the_next_step_uses_first_stays_resident_at_the_end_within_three_quarters():
    # Forward reads p1, p2, p3 in turn; the optimizer updates them in the same order
    # once the activations are gone. Each would be swapped out after its update and read
    # back for the next step; the ones the next step uses first stay instead, as long as
    # they fit in 3/4 of the budget (9) beside what each later function needs: p1 (first
    # read next step) brings f4 to 4 + 4; p2 would bring f5 to 4 + 4 + 4 > 9; p3 fits.
    # Kept by latest last use (p3, p2), the next step would start by reading p1 in.
    # Without an optimizer phase the rule is that one (next test).
    arrays = {"p1": (4, "param"), "p2": (4, "param"), "p3": (4, "param"), "x": 4, "y": 4}
    names(arrays)
    t = build(arrays, ["f0 r:p1 c:x", "f1 r:p2 r:x c:y", "f2 r:p3 r:y", "f3 @optimizer w:p1",
                       "f4 @optimizer w:p2", "f5 @optimizer w:p3"])
    from outcore.plan.policies.edges import end_keep_set
    assert end_keep_set(t, 12) == {IDS["p1"], IDS["p3"]}
    for policy in POLICIES:
        s = outcore.plan(t, 12, policy)
        assert {IDS["p1"], IDS["p3"]} <= set(s.resident_at_end)
        assert IDS["p1"] in s.resident_at_start
        assert Action("SWAP_OUT", IDS["p1"]) not in s.end[3]
        assert Action("SWAP_OUT", IDS["p3"]) not in s.end[5]
        outcore.check(t, s, 12)
        paper = plan_paper(t, 12, policy)
        assert s.bytes_in + s.bytes_out < paper.bytes_in + paper.bytes_out


def test_state_last_used_outside_the_optimizer_is_kept_by_latest_last_use():
    # The same updates in a step without an optimizer phase (or state its forward or
    # backward last uses: batch-norm statistics): kept by latest last use, p3 and p2;
    # kept by first use, p1 would sit in the budget from f2 on and leave no room for
    # state used later (test_outputs_late_can_pick_a_costly_victim: a 1-byte array kept
    # from the step's second function wrote a 54-byte one out).
    arrays = {"p1": (4, "param"), "p2": (4, "param"), "p3": (4, "param"), "x": 4, "y": 4}
    names(arrays)
    t = build(arrays, ["f0 c:x", "f1 r:x c:y", "f2 r:y w:p1", "f3 w:p2", "f4 w:p3"])
    from outcore.plan.policies.edges import end_keep_set
    assert end_keep_set(t, 12) == {IDS["p2"], IDS["p3"]}
    for policy in POLICIES:
        s = outcore.plan(t, 12, policy)
        assert {IDS["p2"], IDS["p3"]} <= set(s.resident_at_end)
        assert Action("SWAP_OUT", IDS["p2"]) not in s.end[3]
        assert Action("SWAP_OUT", IDS["p3"]) not in s.end[4]
        outcore.check(t, s, 12)
        paper = plan_paper(t, 12, policy)
        assert s.bytes_out < paper.bytes_out
    # An optimizer run inside backward (its ops interleaved there) is no optimizer part
    # at the step's end: the same order.
    t = build(arrays, ["f0 c:x", "f1 @optimizer r:x c:y", "f2 r:y w:p1", "f3 w:p2",
                       "f4 w:p3"])
    assert end_keep_set(t, 12) == {IDS["p2"], IDS["p3"]}


def test_state_kept_at_the_end_stays_within_three_quarters_at_the_end_too():
    # Five 4-byte parameters all updated by the last function: each would stay from the
    # step's end on, where the next step starts; 3/4 of 24 holds four of them.
    arrays = {f"p{k}": (4, "param") for k in range(5)}
    names(arrays)
    t = build(arrays, ["f0 " + " ".join(f"r:p{k}" for k in range(5)),
                       "f1 @optimizer " + " ".join(f"w:p{k}" for k in range(5))])
    from outcore.plan.policies.edges import end_keep_set
    assert len(end_keep_set(t, 24)) == 4


def test_state_that_fits_beside_the_activations_is_not_written_out_at_the_start():
    # The step peaks at 10 bytes: 8 of activations (f1, f2) and w's 2. Under a budget of
    # 9, w is not written out before the step: f0 reads it where it is; it then leaves
    # (f1 and f2 need the room) and comes back for f4. Without keep_state it starts on
    # the slow tier and is read in twice.
    names(PREFETCH)
    t = build(PREFETCH, PREFETCH_FNS)
    from outcore.plan.policies.edges import start_keep_set
    assert start_keep_set(t, 9) == {IDS["w"]}
    assert start_keep_set(t, 5) == set()        # a (4, created by f0) + w (2) > 5
    for policy in POLICIES:
        s = outcore.plan(t, 9, policy)
        outcore.check(t, s, 9)
        paper = plan_paper(t, 9, policy)
        assert IDS["w"] in s.resident_at_start and IDS["w"] not in paper.resident_at_start
        assert (s.bytes_in, s.bytes_out) == (2, 2) and (paper.bytes_in, paper.bytes_out) == (4, 0)


def test_state_is_kept_from_the_start_by_earliest_first_use_while_it_fits():
    # b (read at f2) fits beside f1's 12 bytes of activations under 16; a (read at f3)
    # would not fit as well: it starts on the slow tier and is swapped in for f3.
    arrays = {"a": (4, "param"), "b": (4, "param"), "x": 4, "y": 8}
    names(arrays)
    t = build(arrays, ["f0 c:x", "f1 r:x c:y", "f2 r:y r:b", "f3 r:a"])
    s = outcore.plan(t, 16, "on-demand")
    outcore.check(t, s, 16)
    assert s.resident_at_start == (IDS["b"],)
    assert s.begin[3] == acts("in a") and s.bytes_in == 4


def test_keep_state_must_be_a_bool():
    t = build(PREFETCH, PREFETCH_FNS)
    with pytest.raises(outcore.OutcoreError, match="keep_state"):
        outcore.plan(t, 9, "adaptive", keep_state="yes")
