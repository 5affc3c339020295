"""First-fit allocator of aligned extents in a swap file. Freed extents coalesce with
their neighbours, so a steady training loop reuses the same space every iteration."""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from .aligned import ALIGNMENT, round_up


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int          # bytes reserved (aligned); the array may use fewer


class ExtentAllocator:
    """Hands out extents of a file that grows on demand (`capacity` is its current size)."""

    def __init__(self, capacity: int = 0):
        self.capacity = round_up(capacity)
        self._free_offsets: list[int] = [0] if self.capacity else []
        self._free_length: dict[int, int] = {0: self.capacity} if self.capacity else {}
        self.in_use = 0

    def allocate(self, nbytes: int) -> tuple[Extent, int]:
        """An extent for `nbytes`, and the file size needed to hold it (>= capacity)."""
        length = round_up(max(nbytes, 1), ALIGNMENT)
        for off in self._free_offsets:
            if self._free_length[off] >= length:
                self._take(off, length)
                self.in_use += length
                return Extent(off, length), self.capacity
        # Grow the file: extend the last free run if it touches the end.
        start = self.capacity
        if self._free_offsets:
            last = self._free_offsets[-1]
            if last + self._free_length[last] == self.capacity:
                start = last
                self._remove(last)
        self.capacity = start + length
        self.in_use += length
        return Extent(start, length), self.capacity

    def free(self, extent: Extent) -> None:
        self.in_use -= extent.length
        off, length = extent.offset, extent.length
        right = off + length
        if right in self._free_length:                      # merge with the run after it
            length += self._free_length[right]
            self._remove(right)
        i = bisect.bisect_left(self._free_offsets, off)
        if i > 0:
            prev = self._free_offsets[i - 1]
            if prev + self._free_length[prev] == off:        # merge with the run before it
                self._free_length[prev] += length
                return
        self._insert(off, length)

    def truncate(self, capacity: int) -> None:
        """Forget free space at or beyond `capacity` (the file could not grow that far)."""
        while self._free_offsets:
            last = self._free_offsets[-1]
            if last >= capacity:
                self._remove(last)
            else:
                self._free_length[last] = min(self._free_length[last], capacity - last)
                break
        self.capacity = capacity

    def _take(self, off: int, length: int) -> None:
        free = self._free_length[off]
        self._remove(off)
        if free > length:
            self._insert(off + length, free - length)

    def _insert(self, off: int, length: int) -> None:
        bisect.insort(self._free_offsets, off)
        self._free_length[off] = length

    def _remove(self, off: int) -> None:
        self._free_offsets.pop(bisect.bisect_left(self._free_offsets, off))
        del self._free_length[off]

    def free_runs(self) -> list[tuple[int, int]]:
        return [(o, self._free_length[o]) for o in self._free_offsets]
