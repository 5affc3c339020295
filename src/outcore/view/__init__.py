"""Seeing a step: timelines for Perfetto / chrome://tracing (`timeline`), the memory
picture (`plot`), and per-function occupancy by category (`occupancy`)."""
from .occupancy import Occupancy, by_category
from .timeline import chrome_trace, measured_events, simulated_events, simulated_timeline, write

__all__ = ["Occupancy", "by_category", "chrome_trace", "measured_events", "simulated_events",
           "simulated_timeline", "write"]
