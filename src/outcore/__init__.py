"""outcore: train PyTorch networks larger than the memory they run in.

Record one iteration (`record`), plan when every tensor moves between a fast and a
slow tier (`plan`), check and simulate the plan, and replay it (`OutOfCore`).
"""
import sys as _sys


def _as_the_command() -> bool:
    """Whether this is `python -m outcore`'s import of the package: runpy imports it
    before `__main__` runs the command's entry point (src/outcore_main.py), so a Ctrl-C
    in torch's import, seconds long, came out as its traceback there, where the
    `outcore` script says "outcore: interrupted" (helper-225)."""
    argv = getattr(_sys, "orig_argv", ())
    return "-moutcore" in argv or any(a == "-m" and b == "outcore"
                                      for a, b in zip(argv, argv[1:]))


try:
    from .memory.pages import ask_torch_for_huge_pages

    ask_torch_for_huge_pages()  # before torch is imported (NOTE [Huge pages by default])

    from .errors import (HostBudgetTooSmall, InfeasibleBudget, OutcoreError, ScheduleError,
                         SwapSpaceExhausted, TraceError)
    from .plan import Schedule, check, lower_bound, plan
    from .run import OutOfCore, Report
    from .run.ooc import open_outofcore, smallest_budget
    from .simulate import simulate
    from .trace import Trace, record
    from .units import format_bytes, parse_bytes
except KeyboardInterrupt:
    if not _as_the_command():
        raise
    print("outcore: interrupted", file=_sys.stderr)
    raise SystemExit(130) from None

__version__ = "0.1.0"

# Subpackages reached by attribute after `import outcore` alone, imported on first use
# (`outcore.workloads.build(...)`, as their docstrings show; helper-200 met an
# AttributeError). `simulate` and `trace` are the functions above.
_LAZY = ("bench", "integrations", "view", "workloads")


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["HostBudgetTooSmall", "InfeasibleBudget", "OutOfCore", "OutcoreError", "Report", "Schedule", "ScheduleError",
           "SwapSpaceExhausted", "Trace", "TraceError",
           "check", "format_bytes", "lower_bound", "parse_bytes", "plan", "record", "simulate",
           "open_outofcore", "smallest_budget",
           "__version__"]
