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
    pager._run([mapping], allowance, ceiling, stop)
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
