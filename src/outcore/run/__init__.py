"""Stage 4: run a training step under a budget, following the plan."""
from .ooc import OutOfCore
from .report import IterationStats, Report

__all__ = ["IterationStats", "OutOfCore", "Report"]
