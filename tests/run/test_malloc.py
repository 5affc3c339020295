"""The governors of glibc's allocator: the trim limits, what stop() puts back, one
governor per process, and interrupts at any bytecode."""
import sys

import pytest

import outcore
from outcore.memory import malloc
from outcore.memory.malloc import WITHIN_OP

MiB = 2**20


class FakeLibc:
    def __init__(self, rss):
        self.rss, self.trims, self.options, self.calls = rss, 0, {}, []
        self.interrupt_at = None        # raise KeyboardInterrupt at this mallopt call (1-based)

    def mallopt(self, option, value):
        # mallopt(int, int): ctypes truncates a larger Python int silently (2**62 -> 0,
        # which would mean "trim on every free")
        assert -2**31 <= value < 2**31, value
        if self.interrupt_at == len(self.calls) + 1:
            self.interrupt_at = None
            raise KeyboardInterrupt     # as if it landed just before the call
        self.calls.append((option, value))
        self.options[option] = value
        return 1

    def malloc_trim(self, pad):
        self.trims += 1
        self.rss = self.rss_after_trim
        return 1


@pytest.fixture
def libc(monkeypatch):
    libc = FakeLibc(rss=1000)
    libc.rss_after_trim = 900
    monkeypatch.setattr(malloc, "_libc", lambda: libc)
    monkeypatch.setattr(malloc, "resident_bytes", lambda: libc.rss)
    monkeypatch.setattr(malloc, "file_resident_bytes", lambda: 0)
    monkeypatch.setattr(malloc, "resident_and_file_bytes",        # the two above, as patched
                        lambda: (malloc.resident_bytes(), malloc.file_resident_bytes()))
    monkeypatch.setattr(malloc, "_steering", {})            # no governor from another test
    monkeypatch.setattr(malloc, "_start_environment", lambda: [])   # glibc's defaults at start
    return libc


@pytest.fixture
def governed(libc):
    gov = malloc.TrimGovernor()
    gov._checked = -1.0
    yield gov, libc
    gov.stop()


def tick(gov):
    gov._checked = -1.0          # no throttling between the test's checks


CONVERGED = {malloc._M_MMAP_THRESHOLD: 32 * MiB, malloc._M_TRIM_THRESHOLD: 64 * MiB,
             malloc._M_MMAP_MAX: 65536}


# -- the trim limits ---------------------------------------------------------------------
def test_before_the_first_eviction_trims_only_past_the_generous_limit(governed):
    gov, libc = governed
    budget = 180 * MiB
    assert gov.start(budget, rss_start=0)
    assert libc.options[malloc._M_MMAP_MAX] == 0                      # every tensor on the heap
    assert gov.slack == (64 + 36) * MiB                               # 64 MiB + budget/5
    assert gov.limit == 900 + budget + gov.slack                      # trimmed once; nothing moved yet
    libc.rss = gov.limit
    tick(gov)
    gov.check()
    assert libc.trims == 1                                            # at the limit: nothing
    libc.rss, libc.rss_after_trim = gov.limit + 1, gov.limit + 50     # live bytes above it
    tick(gov)
    gov.check()
    assert libc.trims == 2 and gov.trims == 1
    assert gov.given_back == 0              # the resident set grew past the trim: nothing taken off
    libc.rss = gov.limit + 50 + gov.slack                             # not another slack yet
    tick(gov)
    gov.check()
    assert libc.trims == 2
    libc.rss += 1
    tick(gov)
    gov.check()
    assert libc.trims == 3
    assert gov.given_back == gov.slack + 1                            # what this trim took off


def test_a_step_that_fits_is_never_trimmed(governed):
    gov, libc = governed
    budget = 500
    gov.start(budget, rss_start=0)
    libc.rss = 900 + budget + gov.slack          # the whole budget in use, and the slack
    tick(gov)
    gov.check()
    assert gov.trims == 0


def test_once_tight_trims_come_only_at_the_bound(governed):
    """NOTE [Trim at the bound]: from the first eviction on, the trim point is the process
    bound (base + budget + process_slack) less 32 MiB and the largest storage the step
    has made, wherever the last trim left the resident set below it; where the live
    bytes alone are above it, the next trim waits for _MIN_TRIM_STEP of growth."""
    gov, libc = governed
    budget, start = 180 * MiB, 200 * MiB
    bound = start + budget + (128 + 36) * MiB
    assert malloc.process_bound(start, budget) == bound
    assert malloc.trim_ceiling(bound) == bound - 32 * MiB
    libc.rss, libc.rss_after_trim = 300 * MiB, 350 * MiB
    gov.start(budget, rss_start=start)
    assert gov.next_trim == 350 * MiB + budget + gov.slack > bound   # the step fits: no bound
    libc.rss_after_trim = 300 * MiB
    gov.tighten()                                                    # the first eviction
    ceiling = bound - 32 * MiB
    assert gov.tight and libc.trims == 2 and gov.next_trim == ceiling
    libc.rss = ceiling                                  # far above what the trim left: no trim
    tick(gov)
    gov.check()
    assert gov.trims == 0
    libc.rss, libc.rss_after_trim = ceiling + 1, ceiling - 200 * MiB
    tick(gov)
    gov.check()
    assert gov.trims == 1 and gov.next_trim == ceiling     # not 200 MiB + a slack above it
    largest = [100 * MiB]                               # the step made a 100 MiB storage
    gov.largest_allocation = lambda: largest[0]
    assert gov.next_trim == ceiling - 100 * MiB
    libc.rss, libc.rss_after_trim = ceiling - 99 * MiB, ceiling - 90 * MiB    # live above it
    tick(gov)
    gov.check()
    assert gov.trims == 2 and gov.next_trim == ceiling - 90 * MiB + malloc._MIN_TRIM_STEP
    libc.rss = gov.next_trim
    tick(gov)
    gov.check()
    assert gov.trims == 2
    libc.rss, libc.rss_after_trim = gov.next_trim + 1, ceiling - 200 * MiB   # live below again
    tick(gov)
    gov.check()
    assert gov.trims == 3 and gov.next_trim == ceiling - 100 * MiB   # the bound holds again


def _tight(gov, libc, budget=180 * MiB, start=200 * MiB) -> int:
    """Start `gov` at `start` with `budget`, past its first eviction; its trim ceiling."""
    libc.rss = libc.rss_after_trim = 300 * MiB
    gov.start(budget, rss_start=start)
    gov.tighten()
    return malloc.trim_ceiling(malloc.process_bound(start, budget))


def _begun(gov, libc, budget=180 * MiB, start=200 * MiB) -> int:
    """Start `gov` at `start` with `budget`, past its first eviction, an iteration begun;
    its process bound."""
    libc.rss = libc.rss_after_trim = 300 * MiB
    gov.start(budget, rss_start=start)
    gov.begin()
    gov.tighten()
    return malloc.process_bound(start, budget)


def test_storages_about_to_be_read_back_are_checked_before_they_land(governed):
    """`check(coming)`: the bytes about to be allocated count with the resident set, and
    8 MiB of them announced since the last reading read /proc again within the 2 ms
    throttle (a foreach op's inputs read back in a burst)."""
    gov, libc = governed
    ceiling = _tight(gov, libc)
    libc.rss, libc.rss_after_trim = ceiling - 10 * MiB, 300 * MiB
    tick(gov)
    gov.check()
    assert gov.trims == 0
    gov.check(coming=4 * MiB)                 # throttled: 4 MiB announced, not read
    assert gov.trims == 0 and gov._announced == 4 * MiB
    libc.rss = ceiling + 50 * MiB             # (as if it had grown: unread)
    gov.check()
    assert gov.trims == 0
    libc.rss = ceiling - 10 * MiB
    gov.check(coming=12 * MiB)                # 16 MiB announced: read, and 12 more would pass
    assert gov.trims == 1 and gov._announced == 0


def test_the_margin_grows_to_the_most_the_step_grew_between_two_readings(governed):
    """NOTE [Trim at the bound]: a function can take more than its largest output
    between two readings (a convolution's backward: workspace and reorders), so the
    margin is also the most the resident set grew between two readings of one
    iteration, plus _MIN_TRIM_STEP; what it did between iterations is not counted
    (`begin`); and never more than process_slack (the ceiling stays at base + budget or
    above)."""
    gov, libc = governed
    budget, bound = 180 * MiB, _begun(gov, libc)
    assert gov.next_trim == bound - 32 * MiB
    tick(gov)
    gov.check()                                   # the first reading: no growth yet
    libc.rss += 50 * MiB
    tick(gov)
    gov.check()
    assert gov.trims == 0 and gov.next_trim == bound - (50 + 16) * MiB
    gov.begin()                                   # between iterations: 100 MiB more
    libc.rss += 100 * MiB
    tick(gov)
    gov.check()
    assert gov.next_trim == bound - (50 + 16) * MiB
    libc.rss, libc.rss_after_trim = 300 * MiB, 300 * MiB
    gov.begin()
    tick(gov)
    gov.check()
    libc.rss += 500 * MiB                         # a stray jump: capped
    tick(gov)
    gov.check()
    assert gov.next_trim == max(bound - malloc.process_slack(budget),
                                300 * MiB + malloc._MIN_TRIM_STEP)


def test_announced_bytes_are_no_burst(governed):
    """Rule 3 of NOTE [Announced outputs]: what the resident set grew between two readings
    by bytes announced before they landed (a read-back, an op's outputs) widens no
    margin; what landed unannounced does. Without it, read-backs counted as growth
    widened every margin (GPT-2 at its floor: a burst of 294 MiB, 38-43 trims a step)."""
    gov, libc = governed
    bound = _begun(gov, libc)
    tick(gov)
    gov.check()                                   # the first reading
    tick(gov)
    gov.check(coming=40 * MiB)                    # a read-back announced: read now...
    libc.rss += 40 * MiB                          # ...and landed after
    tick(gov)
    gov.check(outputs=30 * MiB)                   # outputs told: read, they land after
    libc.rss += 30 * MiB
    tick(gov)
    gov.check(outputs=0)
    assert gov.trims == 0 and gov.next_trim == bound - 32 * MiB
    libc.rss += 50 * MiB                          # 50 MiB nobody announced
    tick(gov)
    gov.check(outputs=0)
    assert gov._op_burst == 50 * MiB and gov._burst == 0
    assert gov.next_trim == bound - (50 + 16) * MiB     # a check told nothing: both bursts


def test_an_ops_growth_counts_up_to_the_next_reading_told_or_not(governed):
    """Rule 2 of NOTE [Announced outputs], helper-145: after an op the next reading is
    often one told nothing (a WAIT's `finish`, the next op's read-back); what the op
    took beyond its outputs must still widen the margin of the checks told them. And
    until one whole iteration of them has measured that, the recording's burst counts:
    the first replay would otherwise have only 32 MiB of room."""
    gov, libc = governed
    _begun(gov, libc)
    tick(gov)
    gov.check()                                   # the recording: told nothing
    libc.rss += 120 * MiB                         # an op's outputs and workspace
    tick(gov)
    gov.check()
    assert gov._burst == 120 * MiB and gov._margin(True) == (120 + 16) * MiB
    gov.begin()                                   # the first replay
    tick(gov)
    gov.check(outputs=16 * MiB)
    libc.rss += 16 * MiB + 100 * MiB              # its outputs, and 100 MiB unannounced
    tick(gov)
    gov.check()                                   # a WAIT's check after it
    assert gov._op_burst == 100 * MiB
    assert gov._margin(True) == (120 + 16) * MiB  # the recording's still counts
    gov.begin()                                   # the second replay: measured once
    assert gov._margin(True) == (100 + 16) * MiB


def test_a_check_told_the_outputs_counts_them_and_leaves_no_room_for_the_largest(governed):
    """Rules 1-2 of NOTE [Announced outputs]: a replay's check is told what the next op
    creates; they count toward the ceiling, and the margin no longer holds room for the
    largest storage the step made (it is counted where it comes). Checks told nothing
    keep that room."""
    gov, libc = governed
    gov.largest_allocation = lambda: 100 * MiB
    budget, start = 180 * MiB, 200 * MiB
    bound = malloc.process_bound(start, budget)
    _tight(gov, libc, budget, start)
    libc.rss, libc.rss_after_trim = bound - 80 * MiB, bound - 200 * MiB
    gov.begin()
    tick(gov)
    gov.check()                               # told nothing: room for 100 + 32 MiB
    assert gov.trims == 1
    libc.rss = bound - 80 * MiB
    gov.begin()
    tick(gov)
    gov.check(outputs=8 * MiB)                # 88 MiB below the bound: room enough
    assert gov.trims == 1
    tick(gov)
    gov.check(outputs=60 * MiB)               # its outputs would pass the ceiling
    assert gov.trims == 2


def test_read_backs_above_the_ceiling_wait_for_growth(governed):
    """helper-143: with the live bytes alone above the ceiling, the next trim waits for
    _MIN_TRIM_STEP of growth; the bytes a read-back announces counted toward that
    growth, so every read-back of 16 MiB or more trimmed again, giving back nothing."""
    gov, libc = governed
    ceiling = _tight(gov, libc)
    libc.rss = libc.rss_after_trim = ceiling + 40 * MiB     # a trim frees nothing
    tick(gov)
    gov.check()
    assert gov.trims == 1
    for _ in range(10):                       # read-backs with no growth
        tick(gov)
        gov.check(coming=20 * MiB)
    assert gov.trims == 1
    libc.rss = ceiling + 40 * MiB + malloc._MIN_TRIM_STEP + 1      # grown: the next one
    tick(gov)
    gov.check(coming=20 * MiB)
    assert gov.trims == 2


def test_rebase_below_the_resident_set_trims_at_once(governed):
    """The heap kept what the old bound allowed: once the bound comes down (state taken
    over, rule 5 of NOTE [The process's base]), the next iteration's first reading
    counts from the new base, so the trim comes now, not at the next check."""
    gov, libc = governed
    budget = 180 * MiB
    libc.rss = libc.rss_after_trim = 300 * MiB
    gov.start(budget, rss_start=200 * MiB)
    gov.tighten()
    gov.rebase(150 * MiB)                     # still below the point: nothing
    assert gov.trims == 0
    libc.rss = malloc.trim_ceiling(malloc.process_bound(100 * MiB, budget)) + MiB
    gov.rebase(100 * MiB, taken_off=50 * MiB)
    assert gov.trims == 1 and gov.next_trim == malloc.trim_ceiling(
        malloc.process_bound(100 * MiB, budget))


def test_rebase_moves_the_bound_and_hand_back_trims_uncounted(governed):
    """The first iteration's base (NOTE [The process's base]): `hand_back` trims without
    counting a trim (only while steering glibc), and `rebase` moves the bound the trim
    point counts from."""
    gov, libc = governed
    budget = 180 * MiB
    gov.hand_back()
    assert libc.trims == 0                                # not started: glibc is not ours
    libc.rss, libc.rss_after_trim = 300 * MiB, 250 * MiB
    gov.start(budget, rss_start=200 * MiB)
    libc.rss_after_trim = 300 * MiB
    gov.tighten()
    assert gov.next_trim == malloc.trim_ceiling(malloc.process_bound(200 * MiB, budget))
    trims = libc.trims
    gov.hand_back()
    assert libc.trims == trims + 1 and gov.trims == 0 and gov.given_back == 0
    gov.rebase(230 * MiB)
    assert gov.next_trim == malloc.trim_ceiling(malloc.process_bound(230 * MiB, budget))
    gov.rebase(0)                       # a ceiling below the live bytes: the floor holds
    assert gov.next_trim == 300 * MiB + malloc._MIN_TRIM_STEP


def test_rebase_by_state_taken_over_lowers_the_generous_limit_too(governed):
    """NOTE [The process's base] rule 5: state that was in the resident set, unmanaged,
    when the generous limit was set (a model built before the OutOfCore) and that outcore
    manages now lowers that limit with the bound; it kept counting it before: a process
    whose 768 MiB of parameters had moved out trimmed once per replayed step where the
    other order trimmed 4-7 times (rss+ 690-750 MiB against 560-615 at a 512 MiB
    budget)."""
    gov, libc = governed
    budget = 64 * MiB
    libc.rss = libc.rss_after_trim = 900 * MiB        # the model, unmanaged, in RAM
    gov.start(budget, rss_start=1000 * MiB)
    assert gov.limit == 900 * MiB + budget + gov.slack
    gov.rebase(300 * MiB, taken_off=700 * MiB)
    assert gov.limit == gov.next_trim == 200 * MiB + budget + gov.slack
    libc.rss, libc.rss_after_trim = gov.limit + MiB, 210 * MiB
    tick(gov)
    gov.check()
    assert gov.trims == 1


def test_trim_above_trims_only_above_its_ceiling_and_only_while_steering(governed):
    gov, libc = governed
    libc.rss, libc.rss_after_trim = 500 * MiB, 300 * MiB
    assert not gov.trim_above(0)                          # not started: glibc is not ours
    gov.start(100 * MiB, rss_start=0)
    trims = libc.trims
    libc.rss = 500 * MiB
    assert not gov.trim_above(500 * MiB) and libc.trims == trims
    assert gov.trim_above(499 * MiB) and libc.trims == trims + 1
    assert gov.trims == 1 and gov.given_back == 200 * MiB


def test_checks_are_throttled(governed):
    gov, libc = governed
    gov.start(0, rss_start=0)
    libc.rss = 10 * gov.limit
    gov.check()
    gov.check()                   # within a millisecond of the first: not even read
    assert gov.trims == 1


def test_nothing_happens_before_the_first_iteration(governed):
    gov, libc = governed
    gov.check()
    gov.tighten()
    assert libc.trims == 0 and not gov.active and libc.calls == []


def test_unknown_memory_mode_is_refused():
    with pytest.raises(outcore.OutcoreError, match="return_freed_memory must be"):
        outcore.OutOfCore("1GiB", return_freed_memory="sometimes")
    # The bench's word for False is refused with the API's named (helper-204).
    with pytest.raises(outcore.OutcoreError,
                       match=r"False \(keep it: `outcore bench --memory keep`"):
        outcore.OutOfCore("1GiB", return_freed_memory="keep")
    with pytest.raises(outcore.OutcoreError, match="return_freed_memory must be"):
        malloc.make_governor("sometimes")


def test_make_governor():
    assert type(malloc.make_governor(True)) is malloc.TrimGovernor
    assert type(malloc.make_governor("trim")) is malloc.TrimGovernor
    assert type(malloc.make_governor("eager")) is malloc.EagerGovernor
    assert malloc.make_governor(False) is None


# -- what stop() puts back ---------------------------------------------------------------
def test_stop_sets_what_the_dynamic_threshold_converges_to(governed):
    gov, libc = governed
    gov.start(500, rss_start=0)
    gov.tighten()
    gov.stop()
    assert not gov.active and gov.limit is None
    assert libc.options == CONVERGED
    assert malloc.steering_governor() is None


def test_stop_puts_back_exactly_what_the_environment_fixed(libc, monkeypatch):
    # MALLOC_MMAP_THRESHOLD_ made glibc's thresholds static from the start: mmap_max and
    # trim_threshold had glibc's defaults, and mmap_threshold is left as it is
    monkeypatch.setattr(malloc, "_start_environment", lambda: [("MALLOC_MMAP_THRESHOLD_", "1048576")])
    gov = malloc.TrimGovernor()
    gov.start(500, rss_start=0)
    del libc.calls[:]
    gov.stop()
    assert libc.calls == [(malloc._M_MMAP_MAX, 65536), (malloc._M_TRIM_THRESHOLD, 128 * 1024)]
    eager = malloc.EagerGovernor()
    eager.start(500)
    eager.tighten()
    del libc.calls[:]
    eager.stop()
    assert libc.calls == [(malloc._M_MMAP_THRESHOLD, 1048576), (malloc._M_TRIM_THRESHOLD, 128 * 1024)]


def test_the_environment_is_read_as_glibc_reads_it():
    fixed = malloc.fixed_at_start
    assert fixed([("PATH", "/bin"), ("MALLOC_ARENA_MAX", "2")]) == {}     # no threshold: dynamic
    assert fixed([("MALLOC_TOP_PAD_", "")]) == {malloc._M_TOP_PAD: 0}       # empty reads as 0
    assert fixed([("MALLOC_TRIM_THRESHOLD_", "0x10000")]) == {malloc._M_TRIM_THRESHOLD: 65536}
    assert fixed([("MALLOC_TRIM_THRESHOLD_", "010k")]) == {malloc._M_TRIM_THRESHOLD: 8}  # octal, to 'k'
    assert fixed([("MALLOC_TRIM_THRESHOLD_", "-1")]) == {malloc._M_TRIM_THRESHOLD: 2**64 - 1}
    assert fixed([("MALLOC_MMAP_MAX_", "-1")]) == {}                       # mmap_max: minval 0
    assert fixed([("MALLOC_MMAP_MAX_", "2147483648")]) == {}               # INT_32
    # GLIBC_TUNABLES wins over the alias, before or after it
    for env in ([("MALLOC_MMAP_THRESHOLD_", "1"), ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=2")],
                [("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=2"), ("MALLOC_MMAP_THRESHOLD_", "1")]):
        assert fixed(env) == {malloc._M_MMAP_THRESHOLD: 2}
    # ...unless glibc refuses its value
    assert fixed([("GLIBC_TUNABLES", "glibc.malloc.mmap_max=-5:glibc.malloc.check=3"),
                  ("MALLOC_MMAP_MAX_", "7")]) == {malloc._M_MMAP_MAX: 7}


def test_sizes_travel_through_mallopts_int():
    assert malloc._c_int(65536) == 65536
    assert malloc._c_int(2**64 - 1) == -1           # glibc widens -1 back to SIZE_MAX
    assert malloc._c_int(2**40) == 2**31 - 1        # cannot travel: the closest


def test_stop_is_idempotent_and_safe_anywhere(governed):
    gov, libc = governed
    gov.stop()                                   # never started: glibc untouched
    assert libc.calls == [] and libc.trims == 0
    gov.start(500, rss_start=0)
    gov.stop()
    calls = list(libc.calls)
    gov.stop()
    assert libc.calls == calls
    nolibc = malloc.TrimGovernor()
    nolibc.libc = None
    assert not nolibc.start(500, rss_start=0)
    nolibc.stop()                                 # no C library: nothing, no error
    assert malloc.steering_governor() is None


def test_stop_keeps_its_exceptions(governed):
    gov, libc = governed
    gov.start(500, rss_start=0)

    def broken(option, value):
        raise OSError("gone")
    libc.mallopt = broken
    gov.stop()                                    # a finalizer must not raise
    assert not gov.active
    assert malloc.steering_governor() is gov      # glibc may still be steered: still held
    del libc.mallopt
    gov.stop()
    assert malloc.steering_governor() is None and libc.options == CONVERGED


def test_the_governor_does_not_keep_the_out_of_core_alive(libc):
    import gc
    import weakref

    class Owner:
        pass
    owner = Owner()
    gov = malloc.TrimGovernor()
    weakref.finalize(owner, gov.stop)
    gov.start(500, rss_start=0)
    del owner
    gc.collect()
    assert not gov.active and malloc.steering_governor() is None and libc.options == CONVERGED


# -- eager -------------------------------------------------------------------------------
def test_eager_maps_from_the_first_eviction_and_stop_puts_glibc_back(libc):
    gov = malloc.EagerGovernor()
    assert gov.start(500, rss_start=0)
    assert gov.active and libc.calls == [] and malloc.steering_governor() is gov
    gov.check()
    gov.tighten()
    assert libc.options == {malloc._M_MMAP_THRESHOLD: 64 * 1024, malloc._M_TRIM_THRESHOLD: 64 * 1024}
    assert libc.trims == 1 and gov.tight
    gov.tighten()                                 # once
    assert len(libc.calls) == 2
    gov.stop()
    assert libc.options == CONVERGED and not gov.active and malloc.steering_governor() is None


def test_eager_without_an_eviction_leaves_glibc_alone(libc):
    gov = malloc.EagerGovernor()
    gov.start(500, rss_start=0)
    gov.stop()
    assert libc.calls == [] and malloc.steering_governor() is None
    gov.tighten()                                 # after stop: nothing
    assert libc.calls == []


# -- one governor per process ------------------------------------------------------------
@pytest.mark.parametrize("first,second", [("trim", "trim"), ("trim", "eager"), ("eager", "trim")])
def test_one_governor_per_process(libc, first, second):
    a, b = malloc.make_governor(first), malloc.make_governor(second)
    a.start(2 * 2**30, rss_start=0)
    with pytest.raises(outcore.OutcoreError,
                       match=r"another OutOfCore \(return_freed_memory='%s', budget 2\.00 GiB\) is "
                             r"steering glibc's allocator.*close\(\) it first" % first):
        b.start(500, rss_start=0)
    assert not b.active and malloc.steering_governor() is a
    a.start(500, rss_start=0)                      # the holder itself: a no-op, no error
    b.stop()                                      # a refused governor's stop leaves a alone
    assert malloc.steering_governor() is a and a.active
    a.stop()
    assert b.start(500, rss_start=0) and malloc.steering_governor() is b
    b.stop()


# -- interrupts --------------------------------------------------------------------------
def test_stop_after_a_partial_start(libc):
    libc.interrupt_at = 2                          # the second mallopt of start()
    gov = malloc.TrimGovernor()
    with pytest.raises(KeyboardInterrupt):
        gov.start(500, rss_start=0)
    assert not gov.active and gov.limit is None
    assert libc.options == {malloc._M_MMAP_MAX: 0}
    assert malloc.steering_governor() is gov       # glibc is steered: the record says so
    with pytest.raises(outcore.OutcoreError, match="another OutOfCore"):
        malloc.TrimGovernor().start(500, rss_start=0)
    gov.stop()
    assert libc.options == CONVERGED and malloc.steering_governor() is None
    other = malloc.TrimGovernor()
    assert other.start(500, rss_start=0)
    other.stop()


def test_a_partial_start_can_be_started_again(libc):
    libc.interrupt_at = 1
    gov = malloc.TrimGovernor()
    with pytest.raises(KeyboardInterrupt):
        gov.start(500, rss_start=0)
    assert gov.start(500, rss_start=0) and gov.active
    gov.stop()
    assert libc.options == CONVERGED


def test_stop_after_a_partial_stop(libc):
    gov = malloc.TrimGovernor()
    gov.start(500, rss_start=0)
    libc.interrupt_at = len(libc.calls) + 2       # the second mallopt of stop()
    with pytest.raises(KeyboardInterrupt):        # the user's Ctrl-C is not swallowed
        gov.stop()
    assert not gov.active and malloc.steering_governor() is gov
    gov.stop()
    assert libc.options == CONVERGED and malloc.steering_governor() is None


def _interrupt_at_opcode(n):
    """A tracer that raises KeyboardInterrupt before the n-th bytecode run in malloc.py
    (the fakes in this file do not count: an interrupt lands around their calls)."""
    seen = [0]

    def local(frame, event, arg):
        if event == "opcode":
            seen[0] += 1
            if seen[0] == n:
                raise KeyboardInterrupt        # CPython then drops the tracer
        return local

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != malloc.__file__:
            return None
        frame.f_trace_lines = False
        frame.f_trace_opcodes = True
        return local(frame, event, arg) if event == "opcode" else local
    return tracer, seen


def _assert_consistent(gov, libc, restore):
    """Whatever glibc was told is known to the record; an active governor has told it."""
    steered = bool(libc.calls) and libc.options != restore
    if steered:
        assert malloc.steering_governor() is gov and gov._told
    if gov.active:
        assert malloc.steering_governor() is gov
    if gov.limit is not None:
        assert libc.options[malloc._M_MMAP_MAX] == 0
        assert libc.options[malloc._M_TRIM_THRESHOLD] == malloc._C_INT_MAX
    if gov.active and gov.tight and isinstance(gov, malloc.EagerGovernor):
        assert libc.options[malloc._M_MMAP_THRESHOLD] == gov.threshold
    if isinstance(gov, malloc.TrimGovernor) and gov.active:
        state = gov._limits
        assert state.slack == malloc._slack(gov.budget)


def _prepare(kind, libc, step):
    gov = malloc.make_governor(kind)
    gov._checked = -1.0
    budget = 100 * MiB
    gov.largest_allocation = lambda: 10 * MiB     # the check reads it
    if step in ("tighten", "check", "stop"):
        gov.start(budget, rss_start=0)
    if step in ("check", "stop"):
        gov.tighten()
        libc.rss = 10 * 2**30                     # the check trims
    return gov, budget


@pytest.mark.parametrize("kind,step", [(k, s) for k in ("trim", "eager")
                                       for s in ("start", "tighten", "check", "stop")])
def test_an_interrupt_at_any_bytecode_leaves_the_module_consistent(libc, kind, step):
    n, landed = 0, True
    while landed:
        n += 1
        libc.__init__(rss=1000)
        libc.rss_after_trim = 900
        malloc._steering.clear()
        gov, budget = _prepare(kind, libc, step)
        restore = dict(malloc._restore_plan(gov._CHANGES))
        call = {"start": lambda: gov.start(budget, rss_start=0), "tighten": gov.tighten,
                "check": gov.check, "stop": gov.stop}[step]
        tracer, seen = _interrupt_at_opcode(n)
        sys.settrace(tracer)
        try:
            call()
            landed = False                        # ran to the end before the n-th bytecode
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        _assert_consistent(gov, libc, restore)
        if step != "stop":                        # the step can be run again after the interrupt
            call()
            _assert_consistent(gov, libc, restore)
        gov.stop()
        assert not gov.active and malloc.steering_governor() is None
        assert libc.calls == [] or libc.options == restore
        other = malloc.make_governor(kind)        # the process is free for another
        assert other.start(budget, rss_start=0)
        other.stop()
    assert n > (2 if (kind, step) == ("eager", "check") else 20)   # the tracer saw the bytecodes


# -- real glibc --------------------------------------------------------------------------
GLIBC_CHILD = """
import ctypes, sys
from outcore.memory import malloc
libc = malloc._libc()
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.malloc_usable_size.restype = ctypes.c_size_t
libc.malloc_usable_size.argtypes = [ctypes.c_void_p]

def mapped(n):   # an mmapped chunk is rounded up to a page; a heap chunk by <= 24 bytes
    p = libc.malloc(n)
    extra = libc.malloc_usable_size(p) - n
    libc.free(p)
    return int(extra > 64)

gov = malloc.make_governor(sys.argv[1])
gov.start(2**30, rss_start=0)
gov.tighten()
gov.stop()
sizes = [1 << 20, 8 << 20, 31 << 20, 33 << 20]
print([[mapped(n) for n in sizes] for _ in range(2)])
"""


@pytest.mark.skipif(malloc._libc() is None or not sys.platform.startswith("linux"), reason="needs glibc")
@pytest.mark.parametrize("mode", ["trim", "eager"])
def test_after_stop_glibc_keeps_tensors_on_the_heap_as_a_process_that_never_used_outcore(mode):
    # glibc's dynamic threshold puts the second 1-31 MiB allocation on the heap (the
    # first mmapped one, freed, raises it); over 32 MiB stays mmapped. Before stop() set
    # the converged thresholds, the threshold stayed at its value at start (about 128
    # KiB-1 MiB here) and every such allocation was mmapped and faulted in afresh.
    import subprocess
    out = subprocess.run([sys.executable, "-c", GLIBC_CHILD, mode], capture_output=True, text=True,
                         timeout=300, env={k: v for k, v in __import__("os").environ.items()
                                           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "[[0, 0, 0, 1], [0, 0, 0, 1]]"


class _Plan:
    """A plan as the governor sees it: one weakly referable object per plan."""


def _learning(gov, libc):
    """`gov` begun and tight (its last trim left 300 MiB resident, its base 600 MiB: the
    bound far above), managed bytes counted from 100 MiB, following a plan; the managed
    bytes' list and the plan."""
    managed = [100 * MiB]
    gov.managed = lambda: managed[0]
    _begun(gov, libc, start=600 * MiB)
    plan = _Plan()
    gov.follow(plan)
    return managed, plan


def test_an_ops_growth_is_learned_from_clean_readings_only(governed):
    """Rules 1-2 of NOTE [Each op's growth]: a check naming an op reads /proc whatever the
    throttle; the growth from it to the next reading, beyond what was announced, is that
    op's, learned where the heap held few free pages at the first reading (the resident
    set above the last trim's by no more than the managed bytes above theirs, and 16 MiB)
    or right after a trim; from a reading with more free pages, a workspace may have
    reused them: nothing learned. Checks within the op keep its name."""
    gov, libc = governed
    managed, _ = _learning(gov, libc)
    gov.check(outputs=50 * MiB, key=0)            # not ticked: read all the same
    assert gov._read == 300 * MiB
    libc.rss += 50 * MiB + 10 * MiB               # its outputs (managed) and 10 MiB more
    managed[0] += 50 * MiB
    gov.check(outputs=0, key=1)
    assert gov._grown == {0: 10 * MiB}
    gov.check(coming=8 * MiB)                     # op 1 reads back an input: op 1 still
    libc.rss += 8 * MiB + 100 * MiB               # its input, then 100 MiB of workspace
    managed[0] += 8 * MiB
    gov.check(outputs=0, key=2)
    assert gov._grown == {0: 10 * MiB, 1: 100 * MiB}
    libc.rss += 30 * MiB                          # op 2, from a reading 110 MiB past the
    gov.check(outputs=0, key=3)                   # managed bytes' growth: not clean
    assert 2 not in gov._grown
    bound = malloc.process_bound(600 * MiB, 180 * MiB)
    libc.rss, libc.rss_after_trim = bound, 400 * MiB      # op 3's check trims...
    tick(gov)
    gov.check(outputs=0, key=4)
    assert gov.trims == 1 and 3 not in gov._grown
    libc.rss += 20 * MiB                          # ... and op 4's growth after it is clean
    gov.check(outputs=0, key=5)
    assert gov._grown[4] == 20 * MiB


def test_nothing_is_learned_up_to_an_op_no_plan_knows_nor_from_mapped_pages(governed,
                                                                           monkeypatch):
    """Rules 1-2 of NOTE [Each op's growth], helper-146: growth up to a reading of an op
    told unknown (a replay on arrays smaller than its plan's, whose outputs fall short
    of what was announced; an op off the record) is not learned; pages of mapped state
    copied in (file-backed pages become anonymous ones) are no free heap; a replay's end
    leaves no op known."""
    gov, libc = governed
    managed, _ = _learning(gov, libc)
    gov.check(outputs=50 * MiB, key=0)
    libc.rss += 10 * MiB                          # op 0 made 10 of its 50 MiB ...
    gov.check(outputs=None, key=None)             # ... and the replay is on smaller arrays
    assert gov._grown == {}
    gov.check(outputs=0, key=2)                   # (no clean reading after an unknown op)
    assert gov._grown == {}
    files = [40 * MiB]                            # 40 MiB of state mapped, resident
    monkeypatch.setattr(malloc, "file_resident_bytes", lambda: files[0])
    libc.rss, libc.rss_after_trim = 2000 * MiB, 300 * MiB
    gov.check(outputs=0, key=3)                   # a trim: 300 MiB left, 40 of them mapped
    assert gov.trims == 1
    files[0] = 0                                  # the state copied to the heap (managed)
    managed[0] += 40 * MiB                        # and unmapped: the same resident set
    gov.check(outputs=0, key=4)
    assert gov._read_key == 4                     # clean: the heap grew by the managed bytes
    libc.rss += 30 * MiB                          # 30 MiB of free pages kept by the heap
    gov.check(outputs=0, key=5)
    assert gov._read_key is None                  # (the whole resident set: 30 - 40 < 16)
    gov.follow(None)
    assert gov._key is None and gov._read_key is None


def test_a_learned_op_keeps_room_for_twice_its_growth_and_never_more_than_before(governed):
    """Rule 3 of NOTE [Each op's growth]: after a whole told iteration, an op whose growth
    was learned trims at the bound less twice that growth and 16 MiB (32 MiB at least),
    checks within it adding its outputs, never above what the margins of NOTE [Announced
    outputs] give; ops not learned, and another plan's, keep those."""
    gov, libc = governed
    managed, plan = _learning(gov, libc)
    gov.check(outputs=50 * MiB, key=0)
    libc.rss += 50 * MiB + 10 * MiB
    managed[0] += 50 * MiB
    gov.check(outputs=0, key=1)
    libc.rss += 100 * MiB
    gov.check(outputs=0, key=2)
    assert gov._grown == {0: 10 * MiB, 1: 100 * MiB} and gov._op_burst == 100 * MiB
    assert gov._margin(True) == 116 * MiB         # key 2: not learned
    gov.begin()
    gov.check(outputs=50 * MiB, key=0)            # the next iteration
    assert gov._margin(True) == 36 * MiB          # 2 x 10 + 16
    assert gov._margin() == 86 * MiB              # within op 0: its 50 MiB of outputs too
    gov.check(outputs=0, key=1)
    assert gov._margin(True) == 116 * MiB         # 2 x 100 + 16 is more: as before
    gov.check(outputs=0, key=7)
    assert gov._margin(True) == 116 * MiB
    bound = malloc.process_bound(600 * MiB, 180 * MiB)
    gov.begin()                                   # (no growth: a new iteration)
    libc.rss, libc.rss_after_trim = bound - 100 * MiB, 300 * MiB
    gov.check(outputs=10 * MiB, key=0)            # 90 MiB below the bound: room enough
    assert gov.trims == 0
    gov.check(outputs=10 * MiB, key=1)            # not for op 1
    assert gov.trims == 1
    gov.follow(_Plan())                           # another plan: nothing learned for it
    gov.check(outputs=0, key=0)
    assert gov._margin(True) == 116 * MiB
    gov.follow(plan)                              # back: what was learned for it
    gov.check(outputs=0, key=0)
    assert gov._margin(True) == 36 * MiB


def test_a_replay_learns_each_ops_growth_for_its_plan(monkeypatch):
    """NOTE [Each op's growth], wired: replays name their ops to the governor and it
    learns their growth, in a table of the plan replayed (`_Tables`), keyed by the
    trace's function indexes; once the replay ends no op is known. This small step
    never trims, so no reading would be clean: every one is taken as clean here (rule 2
    has its own test above)."""
    from outcore.run.replay import _tables
    from .twins import build, steady_trace
    monkeypatch.setattr(malloc.TrimGovernor, "_clean", lambda self, rss, file: True)
    trace = steady_trace("resnet18-tiny", "sgd")
    w = build("resnet18-tiny", "sgd")
    with outcore.OutOfCore(budget=trace.peak(actual=True)[0] // 2, min_move_bytes=0) as ooc:
        gov = ooc._governor
        if gov is None or gov.mode != "trim":
            pytest.skip("no trim governor on this platform (glibc only)")
        for _ in range(4):
            with ooc.iteration():
                w.step()
        report = ooc.report()
        assert report.iterations[-1].mode == "replay"
        tables = list(gov._plans.keys())
        assert len(tables) == 1 and gov._grown is gov._plans[tables[0]]
        assert tables[0] is _tables(ooc.trace, ooc.schedule, ooc._plan.keys)
        assert gov._grown and set(gov._grown) <= set(range(len(ooc.trace.functions)))
        assert gov._key is None             # the replay ended: no op known


def test_a_replay_tells_the_governor_what_each_op_creates():
    """NOTE [Announced outputs] rule 1, wired: in a replay every op's check is told the
    bytes its plan has it create (and its workspace), and they are the trace's; a
    recording's checks are told nothing."""
    from outcore.run.replay import _Tables
    from .twins import build, steady_trace
    trace = steady_trace("resnet18-tiny", "sgd")
    w = build("resnet18-tiny", "sgd")
    told = []
    with outcore.OutOfCore(budget=trace.peak(actual=True)[0] // 2, min_move_bytes=0) as ooc:
        if ooc._governor is None or ooc._governor.mode != "trim":
            pytest.skip("no trim governor on this platform (glibc only)")
        check = ooc._res.memory_check

        def spy(coming=0, outputs=None, key=WITHIN_OP):
            told.append((outputs, key))
            check(coming, outputs, key)
        ooc._res.memory_check = spy
        modes = []
        for _ in range(3):
            told.clear()
            with ooc.iteration():
                w.step()
            modes.append(ooc.report().iterations[-1].mode)
            if modes[-1] == "record":
                assert all(t is None and k in (None, WITHIN_OP) for t, k in told)
        assert modes[-1] == "replay"
        planned = _Tables(ooc.trace, [None] * len(ooc.trace.functions)).outputs
        ops = [t for t, _ in told if t is not None]
        assert len(ops) == len(ooc.trace.functions) and ops == planned
        assert sum(planned) > 0
        # NOTE [Each op's growth] rule 1: each told check names its op, in order.
        assert [k for t, k in told if t is not None] == list(range(len(ops)))


def test_what_lift_fresh_and_set_are_recorded_to_create_is_not_told_again():
    """NOTE [Announced outputs] rule 1, helper-145: `lift_fresh` and `set_` are recorded
    as creating a storage made before them outside the dispatcher; it is resident when
    their check runs, so it is no output to announce. Other ops' created bytes and
    workspace are."""
    from outcore.run.replay import _Tables
    from ..plan.helpers import build
    trace = build({"x": (4, "input"), "t": 64, "y": 32, "s": 16},
                  ["aten.lift_fresh.default c:t", "aten.mm.default r:x r:t c:y",
                   "aten.set_.source_Storage c:s"], workspace={1: 8})
    assert _Tables(trace, [None] * 3).outputs == [0, 32 + 8, 0]
