"""The trim governor: glibc's heap is reused, and trimmed only past a limit."""
import pytest

import outcore
from outcore.memory import malloc


class FakeLibc:
    def __init__(self, rss):
        self.rss, self.trims, self.options = rss, 0, {}

    def mallopt(self, option, value):
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
    assert libc.options[malloc._M_MMAP_THRESHOLD] == 32 * 2**20      # large tensors on the heap
    assert gov.slack == (64 + 36) * 2**20 and gov.limit == 900 + gov.slack  # 64 MiB + budget/5; trimmed once
    libc.rss = gov.limit
    tick(gov)
    gov.check()
    assert libc.trims == 1                                            # at the limit: nothing
    libc.rss, libc.rss_after_trim = gov.limit + 1, gov.limit + 50     # live bytes above it
    tick(gov)
    gov.check()
    assert libc.trims == 2 and gov.trims == 1
    libc.rss = gov.limit + 50 + gov.slack                             # not another slack yet
    tick(gov)
    gov.check()
    assert libc.trims == 2
    libc.rss += 1
    tick(gov)
    gov.check()
    assert libc.trims == 3


def test_checks_are_throttled(governed):
    gov, libc = governed
    gov.start(0)
    libc.rss = 10 * gov.limit
    gov.check()
    gov.check()                   # within a millisecond of the first: not even read
    assert gov.trims == 1


def test_nothing_happens_before_the_first_eviction(governed):
    gov, libc = governed
    gov.check()
    assert libc.trims == 0 and not gov.active


def test_unknown_memory_mode_is_refused():
    with pytest.raises(outcore.OutcoreError, match="return_freed_memory must be"):
        outcore.OutOfCore("1GiB", return_freed_memory="sometimes")
