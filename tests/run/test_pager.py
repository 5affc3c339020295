"""The Pager between iterations (NOTE [Mapped state], rule 2): when it pages out pages
read from mapped state, against its allowance and the process's ceiling."""
import threading

import pytest

from outcore.run import mapped

MiB = 2**20


class FakeMapping:
    def __init__(self, stop):
        self.page_outs, self.stop = 0, stop

    def page_out(self):
        self.page_outs += 1
        self.stop.set()                    # one page-out is what the test waits for


def run_pager(monkeypatch, *, read, rss, allowance, ceiling, checks=50):
    """Run the pager's loop synchronously with the resident set fixed: `read` bytes of
    mapped pages above its start, `rss` in all; returns how many page-outs it made
    within `checks` checks."""
    stop = threading.Event()
    reads = iter([0] + [read] * checks)

    def file_resident():
        try:
            return next(reads)
        except StopIteration:
            stop.set()
            return read
    monkeypatch.setattr(mapped, "file_resident_bytes", file_resident)
    monkeypatch.setattr(mapped, "resident_bytes", lambda: rss)
    mapping = FakeMapping(stop)
    pager = mapped.Pager(period=0)
    pager._run([mapping], allowance, ceiling, None, stop)
    return mapping.page_outs


@pytest.mark.parametrize("read, rss, allowance, ceiling, pages_out", [
    (65 * MiB, 100 * MiB, 64 * MiB, None, True),          # past the allowance
    (64 * MiB, 100 * MiB, 64 * MiB, None, False),         # at it
    (17 * MiB, 201 * MiB, 64 * MiB, 200 * MiB, True),     # within it, but the process is over
    (17 * MiB, 200 * MiB, 64 * MiB, 200 * MiB, False),    # at its ceiling
    (16 * MiB, 900 * MiB, 64 * MiB, 200 * MiB, False),    # over, but only the floor was read:
])                                                        # paging out would not help
def test_pages_out_past_the_allowance_or_past_the_ceiling_beyond_the_floor(
        monkeypatch, read, rss, allowance, ceiling, pages_out):
    assert mapped.Pager.FLOOR == 16 * MiB
    assert bool(run_pager(monkeypatch, read=read, rss=rss, allowance=allowance,
                          ceiling=ceiling)) == pages_out


def test_the_first_time_over_the_ceiling_it_relieves_first_and_pages_out_only_if_still_over(
        monkeypatch):
    """Over the ceiling with more than the floor read: `relieve` (the heap handed back)
    is called once, and the pager looks again before paging out."""
    rss = [300 * MiB]
    monkeypatch.setattr(mapped, "resident_bytes", lambda: rss[0])

    def run(relieve):
        stop = threading.Event()
        reads = iter([0] + [20 * MiB] * 30)          # 20 MiB read: past the floor

        def file_resident():
            value = next(reads, None)
            if value is None:
                stop.set()
                return 20 * MiB
            return value
        monkeypatch.setattr(mapped, "file_resident_bytes", file_resident)
        mapping = FakeMapping(stop)
        mapped.Pager(period=0)._run([mapping], 64 * MiB, 200 * MiB, relieve, stop)
        return mapping.page_outs

    calls = []

    def relieve_under():                   # the trim takes the process under the ceiling
        calls.append(rss[0])
        rss[0] = 150 * MiB
    assert run(relieve_under) == 0 and calls == [300 * MiB]

    rss[0], calls[:] = 300 * MiB, []       # still over after relieving: pages out, once relieved
    assert run(lambda: calls.append(rss[0])) == 1 and calls == [300 * MiB]


def test_it_does_not_relieve_for_the_few_mib_of_file_pages_that_come_and_go(monkeypatch):
    """A loop that reads no state between iterations gets no trim (the next step would
    fault that memory in again): 4 MiB of file pages over the ceiling is not reading."""
    calls = []
    assert run_pager(monkeypatch, read=mapped.Pager.RELIEVE_AT, rss=900 * MiB,
                     allowance=64 * MiB, ceiling=200 * MiB) == 0
    stop = threading.Event()
    reads = iter([0] + [mapped.Pager.RELIEVE_AT] * 20)

    def file_resident():
        value = next(reads, None)
        if value is None:
            stop.set()
            return mapped.Pager.RELIEVE_AT
        return value
    monkeypatch.setattr(mapped, "file_resident_bytes", file_resident)
    mapped.Pager(period=0)._run([FakeMapping(stop)], 64 * MiB, 200 * MiB,
                                lambda: calls.append(1), stop)
    assert calls == []
