"""Stage 3: predict the time of a planned step on a machine model (discrete events)."""
from .engine import Simulation, Transfer, simulate
from .machines import PRESETS, Machine, machine

__all__ = ["Machine", "PRESETS", "Simulation", "Transfer", "machine", "simulate"]
