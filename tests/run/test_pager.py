"""The Pager between iterations (NOTE [Mapped state], rule 2): when it pages out pages
read from mapped state, against its allowance and the process's ceiling, and when it
has the heap handed back first."""
import threading

import pytest

from outcore.run import mapped

MiB = 2**20


class FakeMapping:
    def __init__(self):
        self.page_outs = 0

    def page_out(self):
        self.page_outs += 1


def run_pager(monkeypatch, *, read, rss, allowance=64 * MiB, ceiling=None, relieve=None,
              checks=40):
    """Run the pager's loop synchronously for `checks` checks with `read` bytes of file
    pages above its start at every check and a resident set of `rss()` (a callable) or
    `rss`; returns how many times it paged out."""
    stop = threading.Event()
    reads = iter([0] + [read] * checks)

    def file_resident():
        value = next(reads, None)
        if value is None:
            stop.set()
            return read
        return value
    monkeypatch.setattr(mapped, "file_resident_bytes", file_resident)
    monkeypatch.setattr(mapped, "resident_bytes", rss if callable(rss) else lambda: rss)
    pager = mapped.Pager(period=0)
    mapping = FakeMapping()
    pager._run([mapping], allowance, ceiling, relieve, stop)
    assert pager.page_outs == mapping.page_outs
    return mapping.page_outs


@pytest.mark.parametrize("read, rss, ceiling, pages_out", [
    (65 * MiB, 100 * MiB, None, True),          # past the allowance (64 MiB)
    (64 * MiB, 100 * MiB, None, False),         # at it
    (17 * MiB, 201 * MiB, 200 * MiB, True),     # within it, but the process is over
    (17 * MiB, 200 * MiB, 200 * MiB, False),    # at its ceiling
    (16 * MiB, 900 * MiB, 200 * MiB, False),    # over, but only the floor was read:
])                                              # paging out would not help
def test_pages_out_past_the_allowance_or_past_the_ceiling_beyond_the_floor(
        monkeypatch, read, rss, ceiling, pages_out):
    assert mapped.Pager.FLOOR == 16 * MiB
    assert bool(run_pager(monkeypatch, read=read, rss=rss, ceiling=ceiling)) == pages_out


def test_pages_out_once_for_pages_that_stay(monkeypatch):
    """Pages a page-out leaves (a user's own file mapping) are not paged out at every
    check: the next page-out waits for new growth."""
    assert run_pager(monkeypatch, read=65 * MiB, rss=100 * MiB) == 1


def test_relieves_once_first_and_pages_out_only_if_still_over(monkeypatch):
    """Over the ceiling with more than RELIEVE_AT read: `relieve` (the heap handed back)
    is called once per stretch between iterations, before the pager decides."""
    rss, calls = [300 * MiB], []

    def relieve_under():                   # the trim takes the process under the ceiling
        calls.append(rss[0])
        rss[0] = 150 * MiB
    assert run_pager(monkeypatch, read=20 * MiB, rss=lambda: rss[0], ceiling=200 * MiB,
                     relieve=relieve_under) == 0
    assert calls == [300 * MiB]

    calls.clear()                          # still over after it: pages out; relieved once
    assert run_pager(monkeypatch, read=20 * MiB, rss=300 * MiB, ceiling=200 * MiB,
                     relieve=lambda: calls.append(1)) == 1
    assert calls == [1]


@pytest.mark.parametrize("read, ceiling, relieved", [
    (mapped.Pager.RELIEVE_AT, 200 * MiB, False),       # the few MiB that come and go anyway
    (mapped.Pager.RELIEVE_AT + 1, 200 * MiB, True),
    (mapped.Pager.RELIEVE_AT + 1, None, False),        # no ceiling: nothing to relieve
])
def test_relieves_only_when_state_is_read_while_over(monkeypatch, read, ceiling, relieved):
    """A loop that reads no state between iterations gets no trim (its next step would
    fault that memory in again)."""
    calls = []
    run_pager(monkeypatch, read=read, rss=900 * MiB, ceiling=ceiling,
              relieve=lambda: calls.append(1))
    assert calls == ([1] if relieved else [])
