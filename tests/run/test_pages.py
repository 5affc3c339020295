"""Huge pages for swap-in reads and for PyTorch's tensors (memory/pages.py, NOTE [Huge
pages for reads], NOTE [Huge pages by default])."""
import os
import subprocess
import sys

import torch

from outcore.memory import pages

from ..text import flat


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


# -- NOTE [Huge pages by default] -------------------------------------------------------
def _fresh(code: str, **env) -> list[str]:
    """Run `code` in a fresh interpreter (PyTorch reads THP_MEM_ALLOC_ENABLE once per
    process) with THP_MEM_ALLOC_ENABLE taken from `env` only; its printed lines."""
    environment = {k: v for k, v in os.environ.items() if k != pages.TORCH_ENV}
    environment.update(env)
    out = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()

_PROBE = """
import os, torch
from outcore.memory.pages import torch_huge_pages
big = [torch.empty(4 << 20, dtype=torch.uint8) for _ in range(3)]
print(os.environ.get("THP_MEM_ALLOC_ENABLE"))
print(all(t.data_ptr() % 4096 == 0 for t in big))
print(torch_huge_pages())
"""


def test_importing_outcore_before_the_first_tensor_gives_pytorchs_tensors_huge_pages():
    # Also after `import torch`: importing it makes no tensor (rule 1).
    env, aligned, status = _fresh("import torch; import outcore" + _PROBE)
    assert env == "1" and aligned == "True"        # PyTorch page-aligns what it advises
    assert status in ("on (THP_MEM_ALLOC_ENABLE=1, set by outcore at import)",
                      "off: PyTorch asks (THP_MEM_ALLOC_ENABLE=1), but the kernel gives none "
                      f"(/sys/kernel/mm/transparent_hugepage/enabled: {pages._kernel_mode() or 'absent'})")


def test_a_tensor_made_before_import_keeps_pytorchs_default_and_the_report_says_how_to_fix_it():
    env, aligned, status = _fresh("import torch; torch.ones(1); import outcore" + _PROBE)
    assert env == "1" and aligned == "False"
    assert status.startswith("off: PyTorch read THP_MEM_ALLOC_ENABLE at its first tensor, before "
                             "outcore was imported; import outcore first, before any tensor "
                             "is made")


def test_the_users_setting_wins():
    env, aligned, status = _fresh("import outcore" + _PROBE, THP_MEM_ALLOC_ENABLE="0")
    assert (env, aligned, status) == ("0", "False", "off (THP_MEM_ALLOC_ENABLE=0 in the environment)")
    env, aligned, status = _fresh("import outcore" + _PROBE, THP_MEM_ALLOC_ENABLE="1")
    assert env == "1" and aligned == "True" and "set by outcore" not in status


def test_plain_pytorch_baselines_run_with_the_users_setting(monkeypatch):
    from outcore.bench.runner import child_environment
    monkeypatch.setattr(pages, "_asked", [True])        # outcore set it in this process
    monkeypatch.setenv(pages.TORCH_ENV, "1")
    assert child_environment({"variant": "in-core"})[pages.TORCH_ENV] == "0"
    assert child_environment({"variant": "outcore"})[pages.TORCH_ENV] == "1"
    assert child_environment({"variant": "outcore", "env": {pages.TORCH_ENV: "0"}})[pages.TORCH_ENV] == "0"
    assert pages.plain_environment({"X": "y"}) == {"X": "y", pages.TORCH_ENV: "0"}
    monkeypatch.setattr(pages, "_asked", [])            # the user set it
    assert child_environment({"variant": "checkpoint"})[pages.TORCH_ENV] == "1"
    assert pages.plain_environment()[pages.TORCH_ENV] == "1"


def test_the_report_says_whether_tensors_get_huge_pages(tmp_path):
    import outcore
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    with outcore.OutOfCore(budget="1MiB", swap_dir=tmp_path) as ooc:
        with ooc.iteration():
            model(torch.randn(8, 64)).sum().backward()
        report = ooc.report()
    assert report.huge_pages                                  # a RAM budget: always said
    assert flat(f"huge pages for tensors: {report.huge_pages}") in flat(report)


def test_a_plan_that_moves_warns_when_the_import_order_cost_the_huge_pages():
    code = """
import logging, torch
torch.ones(1)                                   # a tensor before outcore: PyTorch decides now
import outcore
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
with outcore.OutOfCore(budget="1MiB") as ooc:
    for _ in range(3):
        with ooc.iteration():
            model(torch.randn(64, 256)).sum().backward()
    print(ooc.report().huge_pages.split(":")[0], ooc.report().iterations[-1].bytes_read > 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != pages.TORCH_ENV})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["off", "True"]
    warned = [line for line in out.stderr.splitlines() if line.startswith("WARNING this plan moves")]
    assert len(warned) == 1 and "import outcore first, before any tensor is made" in warned[0]
