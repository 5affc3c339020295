"""The trim governor: glibc's heap is reused, and trimmed only past a limit."""
import pytest

import outcore
from outcore.memory import malloc


class FakeLibc:
    def __init__(self, rss):
        self.rss, self.trims, self.options = rss, 0, {}

    def mallopt(self, option, value):
        # mallopt(int, int): ctypes truncates a larger Python int silently (2**62 -> 0,
        # which would mean "trim on every free")
        assert -2**31 <= value < 2**31, value
        self.options[option] = value
        return 1

    def malloc_trim(self, pad):
        self.trims += 1
        self.rss = self.rss_after_trim
        return 1


@pytest.fixture
def governed(monkeypatch):
    libc = FakeLibc(rss=1000)
    libc.rss_after_trim = 900
    monkeypatch.setattr(malloc, "_libc", lambda: libc)
    monkeypatch.setattr(malloc, "resident_bytes", lambda: libc.rss)
    gov = malloc.TrimGovernor()
    gov._checked = -1.0
    return gov, libc


def tick(gov):
    gov._checked = -1.0          # no throttling between the test's checks


def test_trims_only_past_the_limit_and_then_waits_for_more_growth(governed):
    gov, libc = governed
    budget = 180 * 2**20
    assert gov.start(budget)
    assert libc.options[malloc._M_MMAP_MAX] == 0                      # every tensor on the heap
    assert gov.slack == (64 + 36) * 2**20                             # 64 MiB + budget/5
    assert gov.limit == 900 + budget + gov.slack                      # trimmed once; nothing moved yet
    libc.rss = 1000
    gov.tighten()                                                     # the first eviction
    assert gov.limit == 900 + gov.slack and libc.trims == 2
    libc.rss = gov.limit
    tick(gov)
    gov.check()
    assert libc.trims == 2                                            # at the limit: nothing
    libc.rss, libc.rss_after_trim = gov.limit + 1, gov.limit + 50     # live bytes above it
    tick(gov)
    gov.check()
    assert libc.trims == 3 and gov.trims == 1
    libc.rss = gov.limit + 50 + gov.slack                             # not another slack yet
    tick(gov)
    gov.check()
    assert libc.trims == 3
    libc.rss += 1
    tick(gov)
    gov.check()
    assert libc.trims == 4


def test_a_step_that_fits_is_never_trimmed_and_stop_restores_glibc(governed):
    gov, libc = governed
    budget = 500
    gov.start(budget)
    libc.rss = 900 + budget + gov.slack          # the whole budget in use, and the slack
    tick(gov)
    gov.check()
    assert gov.trims == 0
    gov.stop()
    assert not gov.active
    assert libc.options[malloc._M_MMAP_MAX] == malloc._GLIBC_MMAP_MAX
    assert libc.options[malloc._M_TRIM_THRESHOLD] == malloc._GLIBC_TRIM_THRESHOLD


def test_the_slack_is_smaller_under_half_the_peak(governed):
    gov, _ = governed
    budget = 400 * 2**20
    gov.start(budget)
    assert gov.slack == (64 + 80) * 2**20
    gov.tighten()
    limit = gov.limit
    gov.know_peak(2 * budget)                 # exactly half the peak: unchanged
    assert gov.slack == (64 + 80) * 2**20 and gov.limit == limit
    gov.know_peak(4 * budget)                 # a quarter: 32 MiB + budget/10
    assert gov.slack == (32 + 40) * 2**20
    assert gov.limit == limit - 72 * 2**20 and gov._next == gov.limit


def test_the_small_slack_comes_once_twice_the_budget_is_alive(governed):
    gov, _ = governed
    budget = 400 * 2**20
    live = [budget]
    gov.live_bytes = lambda: live[0]
    gov.start(budget)
    gov.tighten()
    tick(gov)
    gov.check()
    assert not gov.small_slack
    live[0] = 2 * budget + 1
    tick(gov)
    gov.check()
    assert gov.small_slack and gov.slack == (32 + 40) * 2**20


def test_checks_are_throttled(governed):
    gov, libc = governed
    gov.start(0)
    libc.rss = 10 * gov.limit
    gov.check()
    gov.check()                   # within a millisecond of the first: not even read
    assert gov.trims == 1


def test_nothing_happens_before_the_first_iteration(governed):
    gov, libc = governed
    gov.check()
    assert libc.trims == 0 and not gov.active


def test_unknown_memory_mode_is_refused():
    with pytest.raises(outcore.OutcoreError, match="return_freed_memory must be"):
        outcore.OutOfCore("1GiB", return_freed_memory="sometimes")
