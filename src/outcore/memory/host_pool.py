"""The host tier's memory: one pool of page-locked segments that outcore sizes itself.

PyTorch's pinned allocator (`pin_memory=True`) rounds every block up to a power of two,
so 1.1 GiB of evicted tensors can hold 2 GiB of page-locked RAM, which the kernel can
never swap or reclaim. The pool instead maps anonymous memory in segments of exactly the
size asked for (a page multiple), page-locks each one whole (`pin`, cudaHostRegister on
a GPU machine), and hands out page-aligned extents of them first-fit, freed extents
coalescing with their neighbours (memory/extents.py). Its size follows what the step
keeps on the host, up to `limit` (`OutOfCore(host_budget=)`); an allocation that does
not fit returns None and the caller spills to the next tier (run/movers/host.py).

NOTE [Host pool accounting]
  1. `capacity` is the sum of the segments' sizes: the page-locked bytes the pool holds.
     It never exceeds `limit`, and grows by at least `segment_bytes` at a time (page
     locking costs a system call and page faults per segment) or by the extent asked
     for when larger, never by more than `limit` allows. A segment that cannot be made
     (no memory to map or lock) lowers `limit` to `capacity`, with a warning: later
     extents spill.
  2. `in_use` is the sum of live extents' lengths; every extent is its request rounded
     up to a page, so the pool's waste is at most a page per tensor plus its free runs.
  3. Segments stay until `close()` (a steady loop reuses them); `peak_in_use` and
     `peak_capacity` are what the report shows. `reserve(n)` adds the segment a plan
     needs at once (run/movers/host.py, `host_bytes_needed`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import OutcoreError, warn
from ..units import format_bytes
from .aligned import ALIGNMENT, AlignedBuffer, round_up
from .extents import Extent, ExtentAllocator

SEGMENT_BYTES = 256 * 2**20


@dataclass(frozen=True)
class PoolExtent:
    """An extent of one segment: `address` is where its bytes start in memory."""
    segment: int
    offset: int
    length: int
    address: int


class _Segment:
    def __init__(self, size: int, pin, unpin):
        self.buffer = AlignedBuffer(size)
        self.size = self.buffer.size
        self.unpin = unpin
        self.allocator = ExtentAllocator(self.size)
        # Storages pointed at this segment's memory between iterations (run/movers/host.py,
        # HostMapping): the segment outlives the pool's close() until they let go.
        self.users = 0
        self.closing = False
        try:
            if pin is not None:
                pin(self.buffer.address, self.size)
        except BaseException:
            self.buffer.close()
            raise
        self.pinned = pin is not None

    def allocate(self, nbytes: int) -> Extent | None:
        extent, needed = self.allocator.allocate(nbytes)
        if needed > self.size:                 # the segment cannot grow: give it back
            self.allocator.free(extent)
            self.allocator.truncate(self.size)
            return None
        return extent

    def close(self) -> None:
        """Unlock and unmap, or, while storages still point here, once the last lets go
        (`release`)."""
        self.closing = True
        if self.users:
            return
        if self.pinned and self.unpin is not None:
            self.unpin(self.buffer.address)
            self.pinned = False
        self.buffer.close()

    def use(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.closing and not self.users:
            self.close()


class HostPool:
    """Page-locked host memory for evicted tensors, grown in segments up to `limit` bytes.

    `pin(address, size)` / `unpin(address)` lock and unlock a segment (None: plain memory,
    as on a machine without CUDA, where the pool only holds the host tier's bytes)."""

    def __init__(self, limit: int, *, pin=None, unpin=None, segment_bytes: int = SEGMENT_BYTES):
        if limit < 0:
            raise ValueError(f"host pool limit must be >= 0, got {limit}")
        self.limit = limit // ALIGNMENT * ALIGNMENT
        self.segment_bytes = round_up(max(segment_bytes, ALIGNMENT))
        self._pin, self._unpin = pin, unpin
        self.segments: list[_Segment] = []
        self.in_use = 0
        self.peak_in_use = 0
        self.peak_capacity = 0
        self.refused = 0            # allocations that did not fit (spilled by the caller)

    @property
    def capacity(self) -> int:
        return sum(s.size for s in self.segments)

    def allocate(self, nbytes: int) -> PoolExtent | None:
        """A page-aligned extent of at least `nbytes`, or None when the pool is at its
        limit (NOTE [Host pool accounting] 1)."""
        length = round_up(max(nbytes, 1))
        for index, segment in enumerate(self.segments):
            extent = segment.allocate(length)
            if extent is not None:
                return self._taken(index, segment, extent)
        room = self.limit - self.capacity
        if length > room:
            self.refused += 1
            return None
        segment = self._grow(min(room, max(length, self.segment_bytes)))
        if segment is None:
            return None
        return self._taken(len(self.segments) - 1, segment, segment.allocate(length))

    def reserve(self, nbytes: int) -> None:
        """Add one segment so that the pool holds at least `nbytes` (never past `limit`;
        nothing when it holds that much already). Where so large a segment cannot be
        mapped or page-locked at once, nothing changes: allocations grow the pool by
        `segment_bytes` at a time, as without a reservation."""
        grow = min(round_up(nbytes), self.limit) - self.capacity
        if grow > 0:
            self._grow(grow, at_once=True)

    def _grow(self, size: int, *, at_once: bool = False) -> _Segment | None:
        """A new segment of `size` bytes; None, with the limit lowered to what the pool
        holds and a warning, where the memory cannot be mapped or page-locked (the
        caller spills to the next tier instead of failing the step). `at_once` (a
        reservation): a failure only says so, and leaves the limit, since smaller
        segments may still be had."""
        try:
            segment = _Segment(size, self._pin, self._unpin)
        except (OSError, OutcoreError) as exc:
            if at_once:
                warn(f"the host tier could not reserve {format_bytes(size)} at once ({exc}); "
                     f"it grows by {format_bytes(self.segment_bytes)} at a time instead",
                     RuntimeWarning, stacklevel=4)
                return None
            self.limit = self.capacity
            self.refused += 1
            warn(f"the host tier could not grow by {format_bytes(size)} ({exc}); it stays at "
                 f"{format_bytes(self.capacity)} and what does not fit spills to disk",
                 RuntimeWarning, stacklevel=4)
            return None
        self.segments.append(segment)
        self.peak_capacity = max(self.peak_capacity, self.capacity)
        return segment

    def _taken(self, index: int, segment: _Segment, extent: Extent) -> PoolExtent:
        self.in_use += extent.length
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return PoolExtent(index, extent.offset, extent.length,
                          segment.buffer.address + extent.offset)

    def free(self, extent: PoolExtent) -> None:
        self.segments[extent.segment].allocator.free(Extent(extent.offset, extent.length))
        self.in_use -= extent.length

    def segment(self, extent: PoolExtent) -> _Segment:
        return self.segments[extent.segment]

    def view(self, extent: PoolExtent, nbytes: int) -> memoryview:
        """The extent's first `nbytes` as a writable memoryview (tests, reads by the user)."""
        segment = self.segments[extent.segment]
        return segment.buffer.view[extent.offset:extent.offset + nbytes]

    def close(self) -> None:
        """Unlock and unmap every segment (one a storage still points at, when it lets
        go). Call only once no copy uses them."""
        segments, self.segments = self.segments, []
        for segment in segments:
            segment.close()
        self.in_use = 0

    def __repr__(self) -> str:
        return (f"HostPool({len(self.segments)} segments, {format_bytes(self.capacity)} of "
                f"{format_bytes(self.limit)}, in use {format_bytes(self.in_use)})")
