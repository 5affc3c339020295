"""Pools that keep transfers from fragmenting or exhausting memory: swap-space extents
and aligned staging buffers."""
from .aligned import ALIGNMENT, AlignedBuffer, round_up
from .extents import Extent, ExtentAllocator

__all__ = ["ALIGNMENT", "AlignedBuffer", "Extent", "ExtentAllocator", "round_up"]
