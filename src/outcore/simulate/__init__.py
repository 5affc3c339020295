"""Stage 3: predict the time of a planned step on a machine model (discrete events)."""
from .engine import Simulation, Transfer, simulate, simulate_ranks
from .limit import Limit, physical_limit
from .machines import PRESETS, Machine, machine

__all__ = ["Limit", "Machine", "PRESETS", "Simulation", "Transfer", "machine",
           "physical_limit", "simulate", "simulate_ranks"]
