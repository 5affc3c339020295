"""Stage 3: predict the time of a planned step on a machine model (discrete events)."""
from .engine import Simulation, Transfer, simulate, simulate_ranks
from .machines import PRESETS, Machine, machine

__all__ = ["Machine", "PRESETS", "Simulation", "Transfer", "machine", "simulate",
           "simulate_ranks"]
