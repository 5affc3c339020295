"""outcore: train PyTorch networks larger than the memory they run in.

Record one iteration (`record`), plan when every tensor moves between a fast and a
slow tier (`plan`), check and simulate the plan, and replay it (`OutOfCore`).
"""
from .memory.pages import ask_torch_for_huge_pages

ask_torch_for_huge_pages()      # before torch is imported (NOTE [Huge pages by default])

from .errors import (HostBudgetTooSmall, InfeasibleBudget, OutcoreError, ScheduleError,
                     SwapSpaceExhausted, TraceError)
from .plan import Schedule, check, lower_bound, plan
from .run import OutOfCore, Report
from .run.ooc import open_outofcore, smallest_budget
from .simulate import simulate
from .trace import Trace, record
from .units import format_bytes, parse_bytes

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
