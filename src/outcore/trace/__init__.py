"""Stage 1: record one training iteration as a Trace."""
from .model import Access, Array, Function, Trace
from .recorder import Recording, record

__all__ = ["Access", "Array", "Function", "Trace", "Recording", "record"]
