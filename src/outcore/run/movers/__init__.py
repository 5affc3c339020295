"""Movers copy bytes between the fast and the slow tier, asynchronously."""
from .disk import DiskMover

__all__ = ["DiskMover"]
