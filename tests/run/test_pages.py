"""Huge pages for swap-in reads (memory/pages.py, NOTE [Huge pages for reads])."""
import torch

from outcore.memory import pages


def test_only_the_whole_huge_pages_of_a_large_storage_are_advised(monkeypatch):
    calls = []
    monkeypatch.setattr(pages, "_madvise", lambda lo, length, advice: calls.append(
        (lo, length, advice)) or 0)
    base = 10 * pages.HUGE
    assert not pages.advise_huge(base + 1, pages.MIN_BYTES - 1)          # too small
    assert pages.advise_huge(base + 4096, 3 * pages.HUGE)                # pages 11 and 12
    assert calls == [(base + pages.HUGE, 2 * pages.HUGE, pages.MADV_HUGEPAGE)]
    monkeypatch.setattr(pages, "_madvise", None)                         # no THP here
    assert not pages.advise_huge(base, 8 * pages.HUGE)


def test_advising_a_real_storage_keeps_what_is_written_into_it():
    s = torch.UntypedStorage(16 << 20)
    pages.advise_huge(s.data_ptr(), s.nbytes())          # True where the kernel has THP
    t = torch.empty(0, dtype=torch.uint8).set_(s)
    t.copy_(torch.arange(16 << 20, dtype=torch.int64).remainder(251).to(torch.uint8))
    assert torch.equal(t[:1000], torch.arange(1000).remainder(251).to(torch.uint8))


def test_the_environment_turns_it_off(monkeypatch):
    monkeypatch.setenv("OUTCORE_HUGE_READS", "0")
    assert not pages._available()
