"""Where every managed storage is, and the in-place moves between the tiers.

A storage keeps its Python identity and every tensor, view and autograd saved tensor
that refers to it keeps working: eviction copies its bytes to the slow tier and then
`resize_(0)`s it; restoring `resize_`s it back and copies the bytes in at storage level,
so no version counter moves (DESIGN.md section 3).

States:  FAST (resident) --evict--> OUT (copy in flight, memory still held)
              --finish--> SLOW (resize_(0), bytes only on the slow tier)
              --restore--> IN (memory allocated, copy in flight) --ready--> FAST
A FAST entry whose slow copy is still current is `clean`: it can be dropped with no copy.
"""
from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import OutcoreError
from ..units import format_bytes

FAST, OUT, SLOW, IN = "fast", "out", "slow", "in"


@dataclass(eq=False)
class Entry:
    key: int
    ref: weakref.ref
    nbytes: int
    state: str = FAST
    extent: object = None      # slow-tier location, kept while the copy there is current
    clean: bool = False        # the slow copy equals the fast contents
    future: object = None      # the transfer in flight (OUT or IN)
    pinned: bool = False       # cannot be resized (from_numpy, mmap, shared memory): stays put

    @property
    def occupies_fast(self) -> bool:
        return self.state in (FAST, OUT, IN)


@dataclass
class Stats:
    bytes_read: int = 0
    bytes_written: int = 0
    wait_s: float = 0.0
    peak_resident: int = 0
    unplanned_bytes: int = 0   # moved by on-demand fallbacks, not by the schedule


class Residency:
    """The table of managed storages, keyed by the storage's C pointer while it lives."""

    def __init__(self, mover, *, min_move_bytes: int = 0):
        self.mover = mover
        self.min_move_bytes = min_move_bytes
        self.entries: dict[int, Entry] = {}
        self.resident = 0                       # bytes of managed storages in fast memory
        self.offloaded = 0                      # bytes of live managed storages only on the slow tier
        self.stats = Stats()
        self.lru: OrderedDict[int, Entry] = OrderedDict()   # FAST entries, least recent first
        self.before_first_eviction = None     # called once, when the budget first needs room
        self.memory_check = None              # called after memory is freed or taken

    # -- tracking ----------------------------------------------------------------------
    def track(self, storage) -> Entry:
        """The entry of `storage`, created (as FAST) on first sight. Storages that cannot
        be resized, and small ones not worth a transfer, are pinned in fast memory."""
        key = storage._cdata
        entry = self.entries.get(key)
        if entry is None:
            nbytes = storage.nbytes()
            entry = Entry(key, weakref.ref(storage, self._died(key)), nbytes,
                          pinned=nbytes < self.min_move_bytes or not storage.resizable())
            self.entries[key] = entry
            self._add_resident(entry.nbytes)
        self.touch(entry)
        return entry

    def touch(self, entry: Entry) -> None:
        if entry.state == FAST:
            self.lru[entry.key] = entry
            self.lru.move_to_end(entry.key)

    def _died(self, key):
        def callback(_ref):
            entry = self.entries.pop(key, None)
            if entry is None:
                return
            self.lru.pop(key, None)
            if entry.occupies_fast:
                self.resident -= entry.nbytes
            elif entry.state == SLOW:
                self.offloaded -= entry.nbytes
            if entry.extent is not None and entry.future is None:
                self.mover.free(entry.extent)
                entry.extent = None
        return callback

    def _add_resident(self, nbytes: int) -> None:
        self.resident += nbytes
        if self.resident > self.stats.peak_resident:
            self.stats.peak_resident = self.resident

    def mark_written(self, entry: Entry) -> None:
        """The fast contents changed: the slow copy is stale."""
        entry.clean = False

    # -- moves -------------------------------------------------------------------------
    def evict(self, entry: Entry, *, unplanned: bool = False) -> None:
        """Start moving a FAST entry to the slow tier (memory is held until `finish`)."""
        if entry.state != FAST or entry.pinned:
            return
        storage = entry.ref()
        if storage is None:
            return
        if not storage.resizable():       # e.g. shared with numpy since it was tracked
            entry.pinned = True
            return
        if self.before_first_eviction is not None:
            hook, self.before_first_eviction = self.before_first_eviction, None
            hook()
        if entry.clean and entry.extent is not None:
            self.lru.pop(entry.key, None)
            storage.resize_(0)                  # the slow copy is current: just let go
            entry.state = SLOW
            self.resident -= entry.nbytes
            self.offloaded += entry.nbytes
            return
        nbytes = storage.nbytes()
        if nbytes != entry.nbytes:           # an op resized it (e.g. an `out=` argument)
            self.resident += nbytes - entry.nbytes
            entry.nbytes = nbytes
        if entry.extent is not None and entry.extent.length < nbytes:
            self.mover.free(entry.extent)
            entry.extent = None
        if entry.extent is None:
            entry.extent = self.mover.allocate(nbytes)     # may raise (disk full): still FAST
        self.lru.pop(entry.key, None)
        entry.future = self.mover.write(storage.data_ptr(), entry.nbytes, entry.extent, storage)
        entry.state = OUT
        self.stats.bytes_written += entry.nbytes
        if unplanned:
            self.stats.unplanned_bytes += entry.nbytes

    def finish(self, entry: Entry) -> None:
        """Wait for an OUT entry's copy, then release its fast memory."""
        if entry.state != OUT:
            return
        self._wait(entry, "writing")
        storage = entry.ref()
        entry.state = SLOW
        entry.clean = True
        self.resident -= entry.nbytes
        self.offloaded += entry.nbytes
        if storage is not None:
            storage.resize_(0)
        if self.memory_check is not None:
            self.memory_check()

    def restore(self, entry: Entry, *, unplanned: bool = False) -> None:
        """Start bringing a SLOW entry back (memory is allocated now, bytes arrive async)."""
        if entry.state == OUT:      # still being written: cancel by keeping it
            self._wait(entry, "writing")
            entry.state, entry.clean = FAST, True
            self.touch(entry)
            return
        if entry.state != SLOW:
            return
        storage = entry.ref()
        if storage is None:
            return
        if self.memory_check is not None:
            self.memory_check()
        storage.resize_(entry.nbytes)
        entry.future = self.mover.read(storage.data_ptr(), entry.nbytes, entry.extent, storage)
        entry.state = IN
        self.offloaded -= entry.nbytes
        self._add_resident(entry.nbytes)
        self.stats.bytes_read += entry.nbytes
        if unplanned:
            self.stats.unplanned_bytes += entry.nbytes

    def ready(self, entry: Entry) -> None:
        """Make sure an entry is usable now: wait for its swap-in, or restore it."""
        if self.memory_check is not None:       # every op passes here: the step's growth
            self.memory_check()
        if entry.state == FAST:
            return
        if entry.state == SLOW:
            self.restore(entry, unplanned=True)
        if entry.state == OUT:
            self.restore(entry)       # cancels the eviction
            return
        if entry.state == IN:
            self._wait(entry, "reading")
            entry.state, entry.clean = FAST, True
            self.touch(entry)

    def _wait(self, entry: Entry, doing: str) -> None:
        future, entry.future = entry.future, None
        start = time.perf_counter()
        try:
            future.result()
        except OSError as exc:
            if doing == "reading":
                storage = entry.ref()
                if storage is not None:
                    storage.resize_(0)      # never leave garbage where data was
                entry.state = SLOW
                self.resident -= entry.nbytes
                self.offloaded += entry.nbytes
            else:
                entry.state = FAST           # the fast copy is intact: keep it
                self.touch(entry)
            raise OutcoreError(
                f"{doing} {format_bytes(entry.nbytes)} {'from' if doing == 'reading' else 'to'} the "
                f"swap file in {self.mover.location} failed: {exc.strerror or exc}. "
                + ("The tensor is still in memory; nothing was lost." if doing == "writing" else
                   "That tensor's contents could not be restored.")) from exc
        finally:
            self.stats.wait_s += time.perf_counter() - start

    # -- bulk --------------------------------------------------------------------------
    def settle(self) -> None:
        """Finish every transfer in flight (evictions complete, swap-ins land)."""
        for entry in list(self.entries.values()):
            if entry.state == OUT:
                self.finish(entry)
            elif entry.state == IN:
                self.ready(entry)

    def restore_all(self) -> None:
        """Bring every live storage back to fast memory (the state between iterations)."""
        self.settle()
        slow = [e for e in self.entries.values() if e.state == SLOW]
        for entry in slow:
            self.restore(entry)
        for entry in slow:
            self.ready(entry)

    def evict_lru(self, target: int, keep: set) -> None:
        """On-demand: evict least recently used entries not in `keep` until resident
        bytes are at most `target`, synchronously."""
        started, pending = [], 0
        for key in list(self.lru):
            if self.resident - pending <= target:
                break
            entry = self.lru[key]
            if key in keep or entry.pinned:
                continue
            self.evict(entry, unplanned=True)
            if entry.state == OUT:
                started.append(entry)
                pending += entry.nbytes
        for entry in started:
            self.finish(entry)
