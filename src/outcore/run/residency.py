"""Where every managed storage is, and the in-place moves between the tiers.

A storage keeps its Python identity and every tensor, view and autograd saved tensor
that refers to it keeps working: eviction copies its bytes to the slow tier and then
`resize_(0)`s it; restoring `resize_`s it back and copies the bytes in at storage level,
so no version counter moves (docs/executor.md, "In-place eviction").

States (`outcore.states.Residence`, shared with the planner and the checker):

    FAST --evict--> OUT (copy in flight, memory still held) --finish--> SLOW (resize_(0))
    SLOW --restore--> IN (memory allocated, copy in flight) --ready--> FAST
    OUT --restore--> FAST (the eviction is cancelled: the copy is waited for and kept)
    SLOW --map_slow--> MAPPED (between iterations: NOTE [Mapped state] in mapped.py)
    MAPPED --unmap_all--> SLOW, or FAST and dirty if the user wrote to it meanwhile
    FAST --discard--> DISCARDED (no copy anywhere) --remake (ready)--> FAST
    any --the storage dies--> DEAD

A FAST entry whose slow copy is still current is `clean`: it can be dropped with no copy.

NOTE [Residency invariants]
  1. `resident` is the sum of `nbytes` over entries not retired (rule 2) in FAST, OUT
     or IN; `offloaded` the sum over those in SLOW or MAPPED; DISCARDED ones are in
     neither (their bytes exist nowhere until remade). `recount()` computes both from the
     table; tests assert they agree. Foreign entries (`disown`) are in neither: their
     bytes are their storages' current sizes, `owned_bytes()`.
  2. Only the thread that runs the step changes the table. A storage may die on any
     thread (the mover's worker drops the last reference of a storage whose write it
     just finished; autograd drops saved tensors): its weakref callback only appends
     the entry to `_dead`, and `_reap_dead()` retires it (undoing its share of the
     counters once, from the state it is in then, and freeing its extent when no
     transfer is in flight) before the table is next read or changed. Every lookup by
     storage goes through `track` or `entry_of`, which retire first: a new storage can
     get a dead one's address (its key) while the dead entry still waits in `_dead`,
     and must not be taken for it (a step that replays the same ops would seem to
     deviate).
  3. An entry's `future` is cleared only after its transfer's result is known, so an
     exception that lands while waiting leaves the transfer where the next wait finds it.
  4. Every move changes the storage first and the entry's state and counters after, in
     one held section (NOTE [Interrupts] in interrupts.py): no signal lands in between,
     and an exception from the storage or the mover leaves the entry as it was.
  5. A storage a collective touched, and one another library resizes itself, are
     never moved (`disown`; NOTE [Collectives in flight] and NOTE [Storages FSDP owns]
     in compose.py). A storage found resized behind outcore's back (a FAST one whose
     size is not its entry's, a SLOW one with memory) is disowned on the spot, never
     copied from or over.
  6. Only storages on the mover's device move (`mover.device_type`, and its index where
     it has one). Under offload="host" the step's CPU storages (an optimizer's step
     counters, a loss moved to the host) are tracked `elsewhere`: in no counter (they
     are not in GPU memory), never moved; the planner sees them at 0 bytes. A storage
     on a device the mover does not reach is refused with an error when first seen
     (`_elsewhere`).
  7. A storage that cannot be resized (from_numpy, a memory map, one shared with numpy
     through `.numpy()`) or that lives in shared memory (`share_memory_()`: PyTorch
     calls it resizable, but resizing it crashes the process) is pinned, never moved
     (`movable`; a CUDA storage is never in shared memory, whatever `is_shared()`
     says, and one sent to another process through CUDA IPC is not detected). So is
     one PyTorch reads in C++ past the dispatcher (a PackedSequence's batch_sizes: NOTE
     [Read past the dispatcher] in aten.py), from the op that makes it.
     `.numpy()` makes a storage unresizable for good, also one already tracked:
     `evict` then pins it and notes it in `newly_pinned`. While an OutOfCore is
     open, `.numpy()` hands out an array that leaves the storage resizable and pins it
     only while such an array lives (NOTE [Sharing a storage outcore moves], rules
     7-9): `end_exports()` lets it move again at the next iteration. A recording checks
     each array an op reads or makes (`pin_if_unmovable`), so the plan counts as held
     also those unmovable from their first op that die within the step (a DataLoader
     worker's batch, in shared memory).
  8. When a step completes, pinned storages the next step does not start from (inputs
     of earlier steps, a small loss the user keeps in a list) are let go of (`let_go`):
     they never move, so counting them would only shrink the room the plan has, more
     with every step whose inputs the user keeps. A later step that reads one tracks it
     again, as a new entry. Those a collective or FSDP owns stay (NOTE 5). A step that
     raised lets go of those it first tracked (`let_go_since`): helper-188, refused
     again and again, each retry on a new batch the user kept, counted one more batch
     in every recording after it.
  9. So are a step's inputs that a replay holds no more at the step's end while the
     user does, where they are resident (`Replayer.left_behind`): a batch the plan
     freed after its last read, kept in the user's list, and the last step's batch
     found beside a new one and not read. With sizes that vary, replays track, and
     each such batch stayed tracked for good, counted beside every later plan (a huge
     budget's peak climbed 1.8 -> 12.5 MB over 40 steps of 0.2-0.4 MB batches,
     helper-88), while a passive replay (fixed sizes) tracks none. A storage is
     managed while a step uses it (README); one written out stays tracked until it is
     read (its bytes are on the slow tier). The last step's pinned inputs (small, from
     numpy, in shared memory) that a replay's new batch finds unread are let go of
     there and then (`let_go_of`), not at the step's end: they can make no room, and
     counted beside the new batch, which the plan counts in their place, each replay
     whose batch was not the last one's passed the budget by one batch (helper-184).
 10. An eviction that fails (no room on the slow tier: a full disk, a file size limit;
     or its write fails) while an optimizer's step runs keeps the tensor in memory,
     dirty, over the budget, and the error waits for the step's end (`keep_when_full`,
     `kept_error`; a kept write is never taken for a copy on the slow tier): raised there,
     it left some parameters updated and the rest not, and a lazily made state half
     made for good (Adam's `exp_avg` without its `exp_avg_sq`: a KeyError at every
     later step, helper-133). InfeasibleBudget does the same there (run/recording.py).
"""
from __future__ import annotations

import collections
import errno
import functools
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

from .. import aten
from ..errors import OutcoreError, file_too_large, no_room, warn
from ..memory.malloc import WITHIN_OP, resident_bytes
from ..memory.pages import advise_huge
from ..states import (DEAD, DISCARDED, FAST, IN, MAPPED, OCCUPIES_FAST, ON_SLOW_TIER, OUT, SLOW,
                      Residence)
from ..units import format_bytes
from . import mapped
from .movers.disk import SwapFileShort
from .interrupts import no_raise
from .sharing import exported


class ValuesLost(OutcoreError):
    """`persist` met a storage whose values were lost (`Entry.lost`)."""


# A failed read is tried this many times in all before it is reported (see _wait).
READ_ATTEMPTS = 3
# The resident set is sampled at most this often (reading /proc costs a few microseconds).
RSS_SAMPLE_S = 0.002


def movable(storage) -> bool:
    """NOTE 7: whether outcore may resize `storage` to 0 and back. Shared memory is asked
    of CPU storages only: PyTorch's `is_shared()` is True for every CUDA storage (CUDA
    memory can always be sent to another process), and asking it of one pinned the
    whole of a GPU step, every array "never moves" (the first run on a GPU,
    docs/gpu-check.md)."""
    if not storage.resizable() or exported(storage) or aten.read_past(storage):
        return False
    return storage.device.type != "cpu" or not storage.is_shared()


_WARNED_NO_SWAP: list = []


def _warn_no_swap() -> None:
    """Once per process: this PyTorch cannot map state in place (aten.SWAPS_DATA_PTR)."""
    if _WARNED_NO_SWAP:
        return
    _WARNED_NO_SWAP.append(True)
    import torch
    warn(
        f"this PyTorch ({torch.__version__}) has no UntypedStorage._swap_data_ptr_, which "
        "outcore uses to leave state on the slow tier usable in place between iterations: "
        "that state is read back into the fast tier (GPU memory, or RAM) at "
        "each iteration's end instead, over the budget until the next iteration moves it "
        "out again. Upgrade PyTorch to keep it where it is (2.13, the release outcore is "
        "tested with, has it)", stacklevel=3)


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:   # the limit, named
        return f"{exc.strerror or 'File too large'}: {file_too_large(None)}"
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__


@no_raise      # a weakref callback: a signal landing here is noted (NOTE [Interrupts] 6)
def _note_death(dead, entry, _ref) -> None:
    """A tracked storage died, on any thread, at any moment: only note it (NOTE 2)."""
    dead.append(entry)


# NOTE [Victims]: on demand, the entry evicted first is the one of least `used + cost`
# (GreedyDual, the weighted form of LRU): `used` is the clock (`Residency.aging`) when it
# was last used, `cost` what evicting it moves per byte: 1 for a clean entry (its bytes
# are read back, never written), 2 for a dirty one (written, then read back). The clock
# becomes each victim's `used + cost`, so an entry left unused long enough goes first,
# clean or dirty, as under LRU; among the recently used, a clean one goes before a dirty
# one. Plain LRU, in a loop whose working set just exceeds the budget, evicted the entry
# the next op needed (Mamba's backward scan over 56 time steps, one 3.5 MiB
# gradient accumulator written and read back twice a step while the saved input, clean,
# stayed: 2034 MiB moved in that step, 537 MiB dropping the clean one). The walk looks
# at the least recent VICTIM_WINDOW candidates past those LRU would take, so it stays
# short in a table of thousands of entries; and GreedyDual's choice is taken only where
# it moves no more bytes (`_moves`) than LRU's would.
VICTIM_WINDOW = 64


def _weight(entry) -> float:
    """What evicting `entry` moves per byte: 1 clean (read back), 2 dirty (written too)."""
    return 1.0 if entry.clean and entry.extent is not None else 2.0


def _cost(entry) -> float:
    return entry.used + _weight(entry)


def _covering(entries: list, excess: int) -> list:
    """The first of `entries` whose bytes cover `excess`."""
    chosen, cover = [], 0
    for entry in entries:
        if cover >= excess:
            break
        chosen.append(entry)
        cover += entry.nbytes
    return chosen


def _moves(entries: list) -> float:
    return sum(_weight(entry) * entry.nbytes for entry in entries)


@dataclass(eq=False)
class Entry:
    key: int
    ref: weakref.ref
    nbytes: int
    state: Residence = FAST
    extent: object = None      # slow-tier location, kept while the copy there is current
    clean: bool = False        # the slow copy equals the fast contents
    future: object = None      # the transfer in flight (OUT or IN)
    pinned: bool = False       # not `movable` (NOTE 7), or small: stays put
    mapping: object = None     # MAPPED: the storage's private mapping of `extent`
    owner: str = ""            # who keeps it in place, when not outcore (`disown`)
    # Owned by a library that resizes it itself: counted at its current size, outside
    # the counters (`owned_bytes`), since its size changes behind outcore's back.
    foreign: bool = False
    # On another device than the fast tier's (NOTE 6): in no counter, never moved.
    elsewhere: bool = False
    # DISCARDED: what makes its bytes again (run/recompute.Remake), called with the storage.
    remake: object = None
    # Residency.aging when last used: `evict_lru` evicts the least `used + cost` first.
    used: float = 0.0
    # Residency.tracked when it was first tracked: which iteration first saw it (NOTE 8).
    serial: int = 0
    # Its values were lost (bytes 0xFF now, its error raised: a swap file shortened by
    # something else, a recompute that could not be remade): a state_dir commits no
    # state holding it (NOTE [Durable state] rule 12).
    lost: bool = False

    @property
    def occupies_fast(self) -> bool:
        return self.state in OCCUPIES_FAST


@dataclass
class Stats:
    bytes_read: int = 0
    bytes_written: int = 0
    wait_s: float = 0.0
    peak_resident: int = 0
    unplanned_bytes: int = 0   # moved by on-demand fallbacks, not by the schedule
    peak_rss: int = 0          # the process's resident set, sampled (sample_rss), at most
    peak_unmanaged: int = 0    # the resident set less the managed resident bytes, at most
    bytes_recomputed: int = 0  # made again by recompute instead of read back (`remake`)


class Residency:
    """The table of managed storages, keyed by the storage's C pointer while it lives."""

    def __init__(self, mover, *, min_move_bytes: int = 0):
        self.mover = mover
        self.min_move_bytes = min_move_bytes
        self.entries: dict[int, Entry] = {}
        self.tracked = 0        # entries made so far (Entry.serial)
        self.resident = 0                       # bytes of managed storages in fast memory
        self.offloaded = 0                      # bytes of live managed storages only on the slow tier
        self.pinned_resident = 0                # the part of `resident` that never moves
        self.stats = Stats()
        self.lru: OrderedDict[int, Entry] = OrderedDict()   # FAST entries, least recent first
        self.before_first_eviction = None     # called once, when the budget first needs room
        self.memory_check = None              # (bytes about to be allocated=0): called where
                                              # memory is freed or taken
        self.memory_follow = None             # (plan): a replay follows that plan from here
        self.largest = 0                      # the largest storage tracked so far (the trim
                                              # governor's margin: NOTE [Trim at the bound])
        self._dead: collections.deque = collections.deque()   # appended from any thread
        self._dying: list[Entry] = []         # dead, with a transfer still in flight
        self._warned_unmapped = False         # ... said once (map_slow)
        self._rss_sampled = 0.0
        self.last_rss = 0                     # the resident set at the latest sample
        # When a list: (entry, "in" or "out", bytes, start, end) of every transfer that
        # completes, in perf_counter seconds, for the replayer's timeline (view/timeline.py).
        self.spans: list | None = None
        # Evictions of the collective's storages asked for while it is dispatched
        # (hold_moves), else None; and the keys of those storages.
        self._deferred: list | None = None
        self._held: set[int] = set()
        # NOTE 10: while it returns True, an eviction that fails keeps the tensor, and
        # its error in `kept_error` (the first), for the step's end.
        self.keep_when_full = None
        self.kept_error: OutcoreError | None = None
        self.write_failures = 0    # writes to the slow tier that failed (a full disk): the
                                   # tensors stayed in memory, maybe over the budget
        # A Future callback stopped on another thread (NOTE [Collectives in flight] rule
        # 5 in compose.py), until the step's thread raises it (`raise_stopped_callback`).
        self.stopped_callback: Exception | None = None
        self.owned: dict[int, Entry] = {}       # foreign entries, by key (disown)
        # Entries `evict` found unmovable since they were tracked (NOTE 7); the replayer
        # takes them, since its plan counted on moving them.
        self.newly_pinned: list[Entry] = []
        # Entries pinned while a numpy array of theirs lived (NOTE 7): `end_exports`.
        self._export_pins: list[Entry] = []
        self._owned_sampled = 0                 # owned_bytes() at the latest sample
        self.aging = 0.0                        # `evict_lru`'s clock: the last victim's cost
        # From the process's first iteration until a recording completes: {key: bytes} of
        # the storages first seen as an op's input and not made there (the user's, made
        # before the OutOfCore): OutOfCore takes them off its base (NOTE [The process's
        # base] rule 5).
        self.adopting: dict[int, int] | None = None
        # Storages loaded by mapping a file that `make_movable` named: each gets memory of
        # its own when first tracked (NOTE [Loaded by mapping] in mapped.py).
        self.adoptable: dict[int, weakref.ref] = {}
        self.adopted_at_first_eviction = 0     # ... its bytes then (`before_first_eviction`)

    # -- tracking ----------------------------------------------------------------------
    def track(self, storage, planned: int | None = None) -> Entry:
        """The entry of `storage`, created (as FAST) on first sight. Storages that cannot
        be resized, and small ones not worth a transfer, are pinned in fast memory; small
        by `planned` where given, the bytes a plan has for the array (a smaller step's
        array that the plan moves or discards must move: NOTE [Step shapes] in
        run/plans.py, rule 10)."""
        if self._dead:
            self._reap_dead()
        key = storage._cdata
        entry = self.entries.get(key)
        if entry is None:
            elsewhere = self._elsewhere(storage)    # NOTE 6: outside the budget, never moved
            if not elsewhere and not storage.resizable():
                named = self.adoptable.pop(key, None)
                if not mapped.adopt_orphan(storage) and named is not None and named() is storage:
                    mapped.adopt_loaded(storage)       # NOTE [Loaded by mapping] in mapped.py
            nbytes = storage.nbytes()
            small = (nbytes if planned is None else max(nbytes, planned)) < self.min_move_bytes
            entry = Entry(key, None, nbytes, pinned=elsewhere or small
                          or not movable(storage), elsewhere=elsewhere)
            entry.ref = weakref.ref(storage, self._died(entry))
            self.tracked += 1
            entry.serial = self.tracked
            self.entries[key] = entry
            if nbytes > self.largest:
                self.largest = nbytes
            if self._deferred is not None:        # made while a collective is dispatched
                self._held.add(key)
            if elsewhere:
                return entry
            self._add_resident(entry.nbytes)
            if entry.pinned:
                self.pinned_resident += entry.nbytes
                if exported(storage):
                    self._export_pins.append(entry)
        self.touch(entry)
        return entry

    def end_exports(self) -> None:
        """Let the entries pinned only because a numpy array of theirs lived move again
        once no such array is left (NOTE 7). Called between iterations, on the step's
        thread; one still held stays pinned, one that became unmovable for another
        reason (shared since, say) stays pinned for good."""
        still = []
        for entry in self._export_pins:
            storage = entry.ref()
            if storage is None or entry.state is not FAST or not entry.pinned or entry.owner:
                continue                    # died, let go of (NOTE 8), or disowned since
            if entry.elsewhere or entry.nbytes < self.min_move_bytes:
                continue                    # pinned for those reasons anyway
            if exported(storage):
                still.append(entry)
            elif movable(storage):
                entry.pinned = False
                self.pinned_resident -= entry.nbytes
                self.touch(entry)                   # back in the order evict_lru walks
        self._export_pins = still

    def export_pinned(self, entry) -> bool:
        """Whether `entry` is pinned for a numpy array of its own (NOTE 7), alive or not.
        Read only: any thread."""
        return any(pinned is entry for pinned in self._export_pins)

    @staticmethod
    def stays(entry) -> bool:
        """Whether `let_go` keeps `entry` whatever the step starts from: not pinned in
        fast memory, or a collective's or FSDP's (NOTE 5), or elsewhere."""
        return not entry.pinned or entry.state is not FAST or entry.owner or entry.elsewhere

    def let_go(self, keep, also=()) -> None:
        """Stop tracking the FAST pinned entries not in `keep` (NOTE 8), and the entries
        of `also` that are FAST with no transfer in flight, not a collective's or FSDP's,
        not elsewhere (NOTE 9). Their weakref callbacks may still come: `_reap_dead`
        finds them gone from the table and in the DEAD state, and undoes nothing twice."""
        if self._dead:
            self._reap_dead()
        also = {e for e in also if e.state is FAST and e.future is None and not e.owner
                and not e.elsewhere and e not in keep}
        self._forget([entry for entry in self.entries.values()
                      if entry in also or not (self.stays(entry) or entry in keep)])

    def let_go_since(self, serial: int, keep) -> None:
        """`let_go(keep)` of the entries first tracked after `serial` (Entry.serial) only:
        an iteration that raised lets go of what it first saw, its small batch the user
        keeps (NOTE 8), and of nothing made before it (a model made under `building()`
        is tracked from there, its small storages pinned: counted in the base as state
        made under the OutOfCore, and let go of at a first iteration that raised, they
        were taken for state made before it)."""
        if self._dead:
            self._reap_dead()
        self._forget([e for e in self.entries.values() if e.serial > serial and e not in keep
                      and not self.stays(e)])

    def let_go_of(self, entries) -> None:
        """Stop tracking now, within a step, those of `entries` still tracked that are
        FAST, pinned, not a collective's or FSDP's and not elsewhere: the last step's
        small or unmovable batch that a step reading a new one has not read (NOTE 9,
        `Replayer._new_batch`). It never moves, so there is no room to make for it, and
        counted until the step's end it stood beside the new batch that the plan counts
        in its place: over the budget by one batch (helper-184). One the step reads
        later is tracked again, as a new entry."""
        if self._dead:
            self._reap_dead()
        self._forget([e for e in entries if self.entries.get(e.key) is e
                      and e.state is FAST and e.pinned and not e.owner and not e.elsewhere])

    def _forget(self, entries) -> None:
        """Take `entries` (tracked, FAST, not elsewhere) out of the table and the counters."""
        for entry in entries:
            key = entry.key
            del self.entries[key]
            if self.lru.get(key) is entry:
                del self.lru[key]
            self.resident -= entry.nbytes
            if entry.pinned:
                self.pinned_resident -= entry.nbytes
            entry.state = DEAD
            if entry.extent is not None and entry.future is None:
                # A slow copy (from a state_dir commit: persist) that no entry names any
                # more: else a storage that lives on is written to a fresh extent at every
                # commit, and the file grows (the mover defers a committed extent).
                self.mover.free(entry.extent)
                entry.extent, entry.clean = None, False

    def entry_of(self, storage) -> Entry | None:
        """The entry of `storage` if it is tracked, else None. The storages that died are
        retired first (NOTE 2): a new storage can sit at a dead one's address (`_cdata`,
        the key), and must not be taken for it. Every lookup by storage goes through
        here or `track`."""
        if self._dead:
            self._reap_dead()
        return self.entries.get(storage._cdata)

    def entries_of(self, storages) -> list:
        """(storage, its entry or None) for each of `storages` that is tracked or holds
        bytes (a storage of none, untracked, is no array), in order: `entry_of` for each,
        the dead retired once."""
        if self._dead:
            self._reap_dead()
        get = self.entries.get
        return [(s, entry) for s in storages
                if (entry := get(s._cdata)) is not None or s.nbytes()]

    def _elsewhere(self, storage) -> bool:
        """Whether `storage` is on a device this mover does not move from (NOTE 6): a
        CPU storage in a GPU step stays put, outside the counters; a storage on a device
        the mover cannot reach is refused before anything moves."""
        device = storage.device
        if device.type == "meta":
            # No memory behind it (a shape inferred inside the step, the meta tensors of
            # the ZeroTensor fallback under forward-mode AD): outside every counter, never
            # moved. Tracked as resident, its first eviction wrote from address 0 on the
            # mover's thread: a segmentation fault.
            return self.mover.device_type != "meta"
        if device.type == self.mover.device_type:
            index = getattr(self.mover, "device_index", None)
            if index is None or device.index in (None, index):
                return False
            raise OutcoreError(
                f"a tensor on {device} ({format_bytes(storage.nbytes())}) reached an OutOfCore "
                f"whose fast tier is {self.mover.device_type}:{index}: one OutOfCore manages one "
                "device. Call torch.cuda.set_device (or use that device) before creating the "
                "OutOfCore, and keep the step on it")
        if device.type == "cpu":
            return True
        raise OutcoreError(
            f"a {device.type} tensor ({format_bytes(storage.nbytes())}) reached an OutOfCore whose "
            f"fast tier is {self.mover.device_type} memory: offload='disk' manages CPU tensors, "
            "offload='host' CUDA tensors. Create the OutOfCore with the offload for the "
            "device the step runs on")

    def touch(self, entry: Entry) -> None:
        # A pinned entry never leaves: kept out of the order, which evict_lru walks for
        # every op that needs room (thousands of small pinned storages, biases and
        # Adam's step counts, made each walk long: O(storages) per op).
        if entry.state is FAST and not entry.elsewhere and not entry.pinned:
            self.lru[entry.key] = entry
            self.lru.move_to_end(entry.key)
            entry.used = self.aging

    def _died(self, entry: Entry):
        return functools.partial(_note_death, self._dead, entry)

    def _reap_dead(self) -> None:
        """Retire the entries whose storage died (NOTE 2)."""
        while self._dead:
            entry = self._dead.popleft()
            if self.entries.get(entry.key) is entry:
                del self.entries[entry.key]
            if self.lru.get(entry.key) is entry:
                del self.lru[entry.key]
            if entry.foreign or entry.elsewhere:
                if self.owned.get(entry.key) is entry:
                    del self.owned[entry.key]
                    if not self.owned:
                        self._owned_sampled = 0     # none left: the sample would stay
                entry.state = DEAD
                continue
            state = entry.state
            if state in OCCUPIES_FAST:
                self.resident -= entry.nbytes
                if entry.pinned:
                    self.pinned_resident -= entry.nbytes
            elif state in ON_SLOW_TIER:
                self.offloaded -= entry.nbytes
            if entry.mapping is not None:
                entry.mapping.close()
                entry.mapping = None
            entry.remake = None                # lets go of the inputs it kept
            entry.state = DEAD
            if entry.future is not None:
                self._dying.append(entry)      # its extent is freed once the copy is done
            elif entry.extent is not None:
                self.mover.free(entry.extent)
                entry.extent = None
        if self._dying:
            self._free_finished()

    def _free_finished(self, wait: bool = False) -> None:
        still = []
        for entry in self._dying:
            future = entry.future
            if not wait and not future.done():
                still.append(entry)
                continue
            try:
                future.result()
            except Exception:
                pass                # the storage is gone: its bytes no longer matter
            entry.future = None
            if entry.extent is not None:
                self.mover.free(entry.extent)
                entry.extent = None
        self._dying = still

    def _add_resident(self, nbytes: int) -> None:
        if self._dead:                 # the peak counts live storages only
            self._reap_dead()
        self.resident += nbytes
        self._raise_peak(self.resident)

    def note_peak(self, held: int) -> None:
        """The step holds `held` bytes of managed memory, some of it untracked (NOTE [Far
        below the budget] in headroom.py, rule 6): the peak counts it."""
        self._raise_peak(held)

    def _raise_peak(self, held: int) -> None:
        """The peak counts `held` bytes beside the foreign ones as they are now. Their
        sample (`_owned_sampled`, taken at most every RSS_SAMPLE_S) may be stale: FSDP
        frees its unsharded parameters behind outcore's back, and the plan fills that
        room at once (its next swap-ins), so a peak made of the bytes of now and the
        foreign bytes of before counted both (helper-183: FSDP2 with bf16 parameters,
        replays 77 KiB over the budget with 0 bytes foreign, 525,824 sampled). A new peak
        reads them afresh first; only a new peak pays for the read."""
        if held + self._owned_sampled > self.stats.peak_resident:
            if self.owned:
                self._owned_sampled = self.owned_bytes()
            if held + self._owned_sampled > self.stats.peak_resident:
                self.stats.peak_resident = held + self._owned_sampled

    def mark_written(self, entry: Entry) -> None:
        """The fast contents changed: the slow copy is stale."""
        entry.clean = False

    def largest_tracked(self) -> int:
        """The largest storage tracked so far (`largest`)."""
        return self.largest

    def recount(self) -> tuple[int, int]:
        """(resident, offloaded) recomputed from the table (NOTE 1), after retiring the
        entries that died. One whose storage dies meanwhile, on another thread, counts
        until it is retired, as in the counters: skipped here for its dead storage, it
        made the two disagree by its bytes (a write-out finishing on the mover's thread
        between the retiring and the loop)."""
        if self._dead:
            self._reap_dead()
        resident = offloaded = 0
        for entry in self.entries.values():
            if entry.foreign or entry.elsewhere:
                continue            # not counted
            if entry.state in OCCUPIES_FAST:
                resident += entry.nbytes
            elif entry.state in ON_SLOW_TIER:
                offloaded += entry.nbytes
        return resident, offloaded

    def pin_if_unmovable(self, entry: Entry, storage) -> bool:
        """Pin a FAST entry whose storage became unmovable since it was tracked (NOTE 7),
        noting it in `newly_pinned`; returns whether it is pinned now."""
        if entry.pinned:
            return True
        if movable(storage):
            return False
        entry.pinned = True
        self.pinned_resident += entry.nbytes
        if self.lru.get(entry.key) is entry:        # never evicted now: out of the order
            del self.lru[entry.key]
        self.newly_pinned.append(entry)
        if exported(storage):
            self._export_pins.append(entry)
        return True

    # -- moves -------------------------------------------------------------------------
    def evict(self, entry: Entry, *, unplanned: bool = False) -> None:
        """Start moving a FAST entry to the slow tier (memory is held until `finish`)."""
        if entry.state is not FAST or entry.pinned:
            return
        storage = entry.ref()
        if storage is None:
            return
        if self._deferred is not None and entry.key in self._held:    # NOTE 5
            self._deferred.append((entry, unplanned))
            return
        if self.pin_if_unmovable(entry, storage):    # e.g. shared with numpy since tracked
            return
        if storage.nbytes() != entry.nbytes:     # resized by its owner meanwhile (NOTE 5)
            self.disown(storage, entry.nbytes, "resized by another library", foreign=True)
            return
        if self.before_first_eviction is not None:
            hook, self.before_first_eviction = self.before_first_eviction, None
            self.adopted_at_first_eviction = sum(self.adopting.values()) if self.adopting else 0
            hook()
        if entry.clean and entry.extent is not None:
            storage.resize_(0)                  # the slow copy is current: just let go
            self.lru.pop(entry.key, None)
            entry.state = SLOW
            self.resident -= entry.nbytes
            self.offloaded += entry.nbytes
            return
        try:
            self._extent_for_write(entry, storage)  # may raise (disk full): still FAST
        except OutcoreError as err:
            self.write_failures += 1
            if self.keep_when_full is None or not self.keep_when_full():
                raise
            self.kept_error = self.kept_error or err     # NOTE 10
            return
        entry.future = self.mover.write(storage.data_ptr(), entry.nbytes, entry.extent, storage)
        self.lru.pop(entry.key, None)
        entry.state = OUT
        self.stats.bytes_written += entry.nbytes
        if unplanned:
            self.stats.unplanned_bytes += entry.nbytes

    def _extent_for_write(self, entry: Entry, storage) -> int:
        """Give a FAST entry an extent its current bytes may be written to: its own, unless
        too short or committed to a state manifest (kept: NOTE [Durable state]), else a
        fresh one. Notes a size an op changed (e.g. an `out=` argument). Returns nbytes."""
        nbytes = storage.nbytes()
        if nbytes != entry.nbytes:
            self.resident += nbytes - entry.nbytes
            entry.nbytes = nbytes
        if entry.extent is not None and (entry.extent.length < nbytes
                                         or self.mover.is_committed(entry.extent)):
            self.mover.free(entry.extent)
            entry.extent = None
        if entry.extent is None:
            if self._dead:             # dead storages' extents first go back (NOTE 2)
                self._reap_dead()
            entry.extent = self.mover.allocate(nbytes)
        return nbytes

    def finish(self, entry: Entry) -> None:
        """Wait for an OUT entry's copy, then release its fast memory."""
        if entry.state is not OUT:
            return
        self._wait(entry, "writing")
        if entry.state is FAST:         # its write failed and it was kept (NOTE 10)
            return
        storage = entry.ref()
        if storage is not None:
            storage.resize_(0)
        entry.state = SLOW
        entry.clean = True
        self.resident -= entry.nbytes
        self.offloaded += entry.nbytes
        if self.memory_check is not None:
            self.memory_check()

    def restore(self, entry: Entry, *, unplanned: bool = False) -> None:
        """Start bringing a SLOW entry back (memory is allocated now, bytes arrive async)."""
        if entry.state is MAPPED:
            self._unmap(entry)
        if entry.state is OUT:      # still being written: cancel by keeping it
            self._wait(entry, "writing")
            if entry.state is OUT:      # written; else kept after a failed write (NOTE 10)
                entry.state, entry.clean = FAST, True
            self.touch(entry)
            return
        if entry.state is not SLOW:
            return
        storage = entry.ref()
        if storage is None:
            return
        if storage.nbytes():                 # its owner re-allocated it meanwhile (NOTE 5)
            self.disown(storage, entry.nbytes, "resized by another library", foreign=True)
            return
        if self.memory_check is not None:
            self.memory_check(entry.nbytes)
        storage.resize_(entry.nbytes)        # may raise (out of memory): still SLOW
        if self.mover.device_type == "cpu":
            advise_huge(storage.data_ptr(), entry.nbytes)     # NOTE [Huge pages for reads]
        try:
            entry.future = self.mover.read(storage.data_ptr(), entry.nbytes, entry.extent, storage)
        except BaseException:
            storage.resize_(0)               # never leave garbage where data was
            raise
        entry.state = IN
        self.offloaded -= entry.nbytes
        self._add_resident(entry.nbytes)
        self.stats.bytes_read += entry.nbytes
        if unplanned:
            self.stats.unplanned_bytes += entry.nbytes

    def discard(self, entry: Entry, remake) -> bool:
        """Drop a FAST entry's bytes without a copy: `remake(storage)` makes them again
        when next needed (NOTE [Replaying a recompute] in recompute.py). False (and
        nothing changed) when the entry is not FAST, cannot move, or has died: the
        caller then keeps its bytes another way."""
        storage = entry.ref()
        if (entry.state is not FAST or entry.pinned or storage is None
                or storage.nbytes() != entry.nbytes or self.pin_if_unmovable(entry, storage)):
            return False
        storage.resize_(0)
        self.lru.pop(entry.key, None)
        entry.state, entry.clean, entry.remake = DISCARDED, False, remake
        self.resident -= entry.nbytes
        if self.memory_check is not None:
            self.memory_check()
        return True

    def abandon(self, entry: Entry) -> None:
        """A DISCARDED entry that cannot be remade: its storage gets its size back, every
        byte 0xFF (NaN in floating point), FAST and dirty, so that no tensor is left
        without memory (NOTE 4 in recompute.py). Its values are lost."""
        storage = entry.ref()
        if entry.state is not DISCARDED or storage is None:
            return
        entry.lost = True          # first: a Ctrl-C below leaves it marked (helper-205)
        storage.resize_(entry.nbytes)
        import torch
        torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage).fill_(255)
        entry.state, entry.clean, entry.remake = FAST, False, None
        self._add_resident(entry.nbytes)
        self.touch(entry)

    def remake(self, entry: Entry) -> None:
        """Make a DISCARDED entry's bytes again, in its own storage: FAST and dirty. An
        error leaves it DISCARDED and empty, never half-made."""
        storage = entry.ref()
        if entry.state is not DISCARDED or storage is None:
            return
        if self.memory_check is not None:
            self.memory_check(entry.nbytes)
        try:
            entry.remake(storage, entry.nbytes)   # gives the storage its memory back
        except BaseException:
            storage.resize_(0)               # may have memory: still DISCARDED, empty
            raise
        entry.state, entry.clean, entry.remake = FAST, False, None
        self.stats.bytes_recomputed += entry.nbytes
        self._add_resident(entry.nbytes)
        self.touch(entry)

    def sample_rss(self, force: bool = False) -> None:
        """Note the process's resident set beside the managed bytes (Stats.peak_rss,
        peak_unmanaged), at most every RSS_SAMPLE_S unless `force`."""
        now = time.perf_counter()
        if not force and now - self._rss_sampled < RSS_SAMPLE_S:
            return
        self._rss_sampled = now
        rss = self.last_rss = resident_bytes()
        stats = self.stats
        if self.owned:
            self._owned_sampled = self.owned_bytes()
            if self.resident + self._owned_sampled > stats.peak_resident:
                stats.peak_resident = self.resident + self._owned_sampled
        if rss > stats.peak_rss:
            stats.peak_rss = rss
        if rss - self.resident > stats.peak_unmanaged:
            stats.peak_unmanaged = rss - self.resident

    def follow(self, plan) -> None:
        """A replay follows `plan` (one object per plan) from here, or None: it has ended.
        Tells the trim governor, which learns each op's growth per plan (NOTE [Each op's
        growth] in memory/malloc.py)."""
        if self.memory_follow is not None:
            self.memory_follow(plan)

    def ready(self, entry: Entry) -> None:
        """Make sure an entry is usable now: wait for its swap-in, or restore it."""
        self.ready_all((entry,), key=WITHIN_OP)

    def ready_all(self, entries, outputs: int | None = None, key=None) -> None:
        """`ready` for each of an op's input entries, in order, with the per-op samples
        (`sample_rss`, `memory_check`) taken once: each is throttled to one reading every
        2 ms (the check reads at every op a plan names), so a second call within the op
        only reads the clock. `outputs`: the bytes the op will create, where the caller
        knows them (NOTE [Announced outputs] in memory/malloc.py); `key`: the op's index in
        the plan the caller follows, None for an op no plan knows, WITHIN_OP for no new op
        (NOTE [Each op's growth] there)."""
        self.sample_rss()
        if self.memory_check is not None:       # every op passes here: the step's growth
            self.memory_check(outputs=outputs, key=key)
        for entry in entries:
            if entry.state is not FAST or self._dead:     # most inputs: resident already
                self._ready(entry)

    def _ready(self, entry: Entry) -> None:
        if self._dead:
            self._reap_dead()
        if entry.state is MAPPED:
            self._unmap(entry)
        state = entry.state
        if state is FAST:
            return
        if state is DISCARDED:
            self.remake(entry)
            return
        if state is SLOW:
            self.restore(entry, unplanned=True)
        if entry.state is OUT:
            self.restore(entry)       # cancels the eviction
            return
        if entry.state is IN:
            self._wait(entry, "reading")
            entry.state, entry.clean = FAST, True
            self.touch(entry)

    def _wait(self, entry: Entry, doing: str) -> None:
        """Wait for the entry's transfer; on failure put the entry where its bytes are.

        A failed read is tried again (READ_ATTEMPTS in all, with a RuntimeWarning for
        each failure): the bytes are only in the swap file, and a transient error must
        not leave the tensor empty. A failed write is not: the tensor is still whole in
        memory, and the error says so."""
        start = time.perf_counter()
        try:
            for attempt in range(1, READ_ATTEMPTS + 1):
                try:
                    span = entry.future.result()
                    if self.spans is not None and span is not None:
                        self.spans.append((entry, "in" if doing == "reading" else "out",
                                           entry.nbytes, *span))
                    break
                except Exception as exc:
                    entry.future = None
                    storage = entry.ref() if doing == "reading" else None
                    if (storage is not None and attempt < READ_ATTEMPTS
                            and not isinstance(exc, SwapFileShort)):      # for good
                        entry.future = self.mover.read(storage.data_ptr(), entry.nbytes,
                                                       entry.extent, storage)
                        warn(f"reading {format_bytes(entry.nbytes)} from {self.mover.where} "
                             f"failed ({_reason(exc)}); trying again ({attempt + 1} of "
                             f"{READ_ATTEMPTS})", RuntimeWarning, stacklevel=4)
                        continue
                    self._failed(entry, doing, exc)
                    break               # a failed write kept (NOTE 10): FAST again
        finally:
            self.stats.wait_s += time.perf_counter() - start
        entry.future = None

    def _failed(self, entry: Entry, doing: str, exc: Exception) -> None:
        """Put an entry whose transfer failed where its bytes are, and raise (a write
        inside an optimizer's step: keep the error for the step's end, NOTE 10)."""
        storage = entry.ref() if doing == "reading" else None
        if isinstance(exc, SwapFileShort) and storage is not None:
            # Its bytes are gone for good: an empty storage under the tensor would be a
            # segmentation fault when read, a mapping past the file's end a SIGBUS.
            entry.lost = True           # first: a Ctrl-C below leaves it marked
            storage.resize_(entry.nbytes)
            storage.fill_(0xFF)         # NaN in every floating-point dtype, -1 in an int
            entry.state, entry.clean = FAST, False
            self.touch(entry)
        elif doing == "reading":
            if storage is not None:
                storage.resize_(0)      # never leave garbage where data was
            entry.state = SLOW
            self.resident -= entry.nbytes
            self.offloaded += entry.nbytes
        else:
            entry.state, entry.clean = FAST, False     # the fast copy is intact: keep it
            self.touch(entry)
        kind = no_room(exc) if doing == "writing" and isinstance(exc, OSError) else OutcoreError
        self.write_failures += doing == "writing"
        err = kind(
            f"{doing} {format_bytes(entry.nbytes)} {'from' if doing == 'reading' else 'to'} "
            f"{self.mover.where} failed: {_reason(exc)}. "
            + ("The tensor is still in memory; nothing was lost." if doing == "writing" else
               "Its bytes are lost with the end of the file: the tensor now holds bytes 0xFF "
               "(NaN in a floating-point tensor, -1 in an integer one), never other "
               "numbers. Go on from your last checkpoint." if isinstance(exc, SwapFileShort)
               else
               f"It failed {READ_ATTEMPTS} times. The tensor's bytes are still whole on the "
               "slow tier: when the iteration ends the tensor is mapped from there (README, "
               "\"Between iterations\"), and the next iteration or close() reads it again."))
        err.__cause__ = exc
        if doing == "writing" and self.keep_when_full is not None and self.keep_when_full():
            self.kept_error = self.kept_error or err     # NOTE 10
            return
        raise err

    def raise_stopped_callback(self, at_end: bool = False) -> None:
        """Raise, on the step's thread, the error that stopped a Future callback on
        another thread (NOTE [Collectives in flight] rule 5): `add_done_callback` drops
        a callback's exception, and so does a `.then` chain nobody waits on, so the step
        would go on without what the callback was to write. `at_end`: found when the
        step had run its last op."""
        err, self.stopped_callback = self.stopped_callback, None
        if err is not None:
            raise OutcoreError(f"{err} " + (
                "It was found when the step had run its last op: the iteration completed "
                "without what the callback was to do; go on from your last checkpoint "
                "(or state_dir), not from these values." if at_end else
                "The step's thread stopped at its next op after it: the step cannot go on "
                "without what the callback was to do.")) from err

    def hold_moves(self, storages) -> None:
        """While a collective is dispatched, the storages it reads (`storages`) and those
        it makes are not known to be its own yet: evictions of them asked for meanwhile
        (the op's own after-processing) wait for `release_moves`. Others go on: making
        room for the op's outputs before it runs (evict_lru) among them (helper-96:
        deferred too, a functional all_reduce's output was made beside everything, and
        tensor-parallel recordings passed the budget by up to 14%)."""
        self._deferred = []
        self._held = {s._cdata for s in storages}

    def release_moves(self, storages, owner: str) -> None:
        """The collective returned: disown `storages` (the ones it touched, NOTE 5), then
        carry out the evictions held back (those of disowned storages do nothing). One
        not tracked yet (a passive replay tracks nothing) is tracked first, so that it
        stays disowned if the step later leaves its plan and runs on demand."""
        deferred = self._deferred or []
        self._deferred, self._held = None, set()
        for storage in storages:
            entry = self.entry_of(storage)
            if entry is None and storage.nbytes():
                entry = self.track(storage)
            if entry is not None and entry.state in OCCUPIES_FAST:
                self.disown(storage, entry.nbytes, owner)
        for entry, unplanned in deferred:
            self.evict(entry, unplanned=unplanned)
        for entry, _ in deferred:
            self.finish(entry)

    def disown(self, storage, nbytes: int, owner: str, *, foreign: bool = False) -> Entry:
        """Keep `storage` where it is from now on (NOTE 5): a collective may still touch
        it (counted at `nbytes` like any resident entry), or, `foreign`, the library
        `owner` resizes it itself (counted at its current size, `owned_bytes()`). A
        foreign storage outcore had moved out is taken back as resident without its old
        bytes: only a library that re-allocates it and writes it before use meets it so.
        Any other is read back first (the caller made room for it): a collective started
        between iterations on a parameter left on the slow tier sent from address 0, and
        the parameter would have lost its bytes (helper-175)."""
        if self._dead:
            self._reap_dead()
        entry = self.entries.get(storage._cdata)
        if entry is not None and (entry.owner or entry.elsewhere):
            return entry
        if entry is None:
            entry = Entry(storage._cdata, None, nbytes)
            entry.ref = weakref.ref(storage, self._died(entry))
            self.entries[entry.key] = entry
        else:
            if entry.state is OUT:
                self.finish(entry)
            elif entry.state in (IN, DISCARDED) or (entry.state in ON_SLOW_TIER
                                                    and not foreign):
                self.ready(entry)
            if entry.state is MAPPED:
                self._unmap(entry)
            if entry.pinned:
                self.pinned_resident -= entry.nbytes
            if entry.state in OCCUPIES_FAST:
                self.resident -= entry.nbytes
            elif entry.state in ON_SLOW_TIER:
                self.offloaded -= entry.nbytes
            if entry.extent is not None:
                self.mover.free(entry.extent)
            entry.extent, entry.clean = None, False
            entry.nbytes = nbytes
        self.lru.pop(entry.key, None)
        entry.state, entry.pinned, entry.owner, entry.foreign = FAST, True, owner, foreign
        if foreign:
            self.owned[entry.key] = entry
        else:
            self.pinned_resident += nbytes
            self._add_resident(nbytes)
        return entry

    def owned_bytes(self) -> int:
        """Bytes foreign entries hold right now (their storages' current sizes)."""
        total = 0
        for entry in self.owned.values():
            storage = entry.ref()
            if storage is not None:
                total += storage.nbytes()
        return total

    # -- bulk --------------------------------------------------------------------------
    def settle(self) -> None:
        """Finish every transfer in flight (evictions complete, swap-ins land)."""
        if self._dead:
            self._reap_dead()
        error = None
        for entry in list(self.entries.values()):
            try:
                if entry.state is OUT:
                    self.finish(entry)
                elif entry.state is IN:
                    self.ready(entry)
            except OutcoreError as exc:
                error = error or exc      # the others still settle
        self._free_finished(wait=True)
        if error is not None:
            raise error

    def persist(self, storage):
        """Make sure the swap file holds `storage`'s current bytes, for a state manifest
        (NOTE [Durable state] in durable.py): on the slow tier it does; a resident one
        that is not clean is written now, synchronously, to a fresh extent where its own
        is committed, and stays resident. Returns (extent, offset of its first byte in
        the file, nbytes). Call after settle()."""
        entry = self.track(storage)
        if entry.lost:                      # NOTE [Durable state] rule 12
            raise ValuesLost("the values of a tensor of the state were lost in this OutOfCore "
                             "(its error said so: it holds bytes 0xFF, NaN in floating point), "
                             "and a commit would make them durable.")
        if entry.state is FAST and not (entry.clean and entry.extent is not None):
            nbytes = self._extent_for_write(entry, storage)
            try:
                self.mover.write(storage.data_ptr(), nbytes, entry.extent, storage).result()
            except OSError as exc:
                raise OutcoreError(f"writing {format_bytes(nbytes)} of state to {self.mover.location} "
                                   f"failed: {_reason(exc)}. The state in memory is intact.") from exc
            self.stats.bytes_written += nbytes
            entry.clean = True
        elif entry.state not in (FAST, SLOW, MAPPED):
            raise OutcoreError(f"internal: a state storage is {entry.state} while committing")
        return entry.extent, entry.extent.offset + self.mover.head(entry.extent), entry.nbytes

    # -- between iterations (NOTE [Mapped state] in mapped.py) ------------------------------
    def map_slow(self) -> None:
        """Map every live SLOW entry, after `settle()`, so that its storage is usable in
        place until the next iteration. Where the kernel refuses a mapping the entry is
        read back instead; the first error is raised once all were tried."""
        if self._dead:
            self._reap_dead()
        error, refused = None, []
        for entry in list(self.entries.values()):
            if entry.state is not SLOW or entry.ref() is None:
                continue
            outcome = self._map(entry, promote=True)
            if outcome is True:
                continue
            if not aten.SWAPS_DATA_PTR:
                _warn_no_swap()
            elif outcome:                   # the kernel's refusal
                refused.append((entry.nbytes, outcome))
            try:                   # refused (ENOMEM, a filesystem without mmap)
                self.restore(entry)
                self.ready(entry)
            except Exception as exc:       # noqa: BLE001 - the rest still get mapped
                error = error or exc
        if refused and not self._warned_unmapped:
            self._warned_unmapped = True
            exc = refused[0][1]
            warn(
                f"the kernel refused to map {len(refused)} storages of state left on the "
                f"slow tier ({format_bytes(sum(n for n, _ in refused))}; {exc}): they were "
                "read back into memory, over the budget until the next iteration moves them "
                "out again" + mapped.why_refused(exc), stacklevel=3)
        if error is not None:
            raise error

    def map_one(self, entry: Entry, *, promote: bool = False) -> bool:
        """Map one SLOW entry (no transfer may touch its extent until it is unmapped:
        NOTE [Mapped state], rule 5); False, and nothing changed, where the mover or the
        kernel refuses. `promote`: let the mover first move a spilled extent to where it
        can be mapped (between iterations only)."""
        return self._map(entry, promote) is True

    def _map(self, entry: Entry, promote: bool):
        """`map_one`: True where mapped; the kernel's refusal (mapped.KernelRefused),
        which the user is told of (`map_slow`); False otherwise."""
        storage = entry.ref()
        if entry.state is not SLOW or storage is None or not aten.SWAPS_DATA_PTR:
            return False
        try:
            if promote:
                entry.extent = self.mover.promote(entry.extent, entry.nbytes)
            entry.mapping = self.mover.map(entry.extent, entry.nbytes, storage)
        except mapped.KernelRefused as exc:
            return exc
        except Exception:          # noqa: BLE001 - refused by design (a spilled extent)
            return False
        entry.state = MAPPED
        return True

    def mappings(self) -> list:
        return [e.mapping for e in self.entries.values() if e.state is MAPPED]

    def mapped_extents(self) -> dict:
        """{offset: extent} of the MAPPED entries: what a process forked now maps."""
        return {e.extent.offset: e.extent for e in list(self.entries.values())
                if e.state is MAPPED and e.extent is not None}

    def unmap_all(self, budget: int) -> None:
        """Take every MAPPED storage back before an iteration: unwritten ones go back to
        SLOW at no cost, written ones come back FAST and dirty, evicted synchronously
        (least recently used first) whenever they would exceed `budget`."""
        if self._dead:
            self._reap_dead()
        mapped_entries = [e for e in self.entries.values() if e.state is MAPPED]
        if mapped_entries:
            self.mover.synchronize()      # writes queued to mapped memory have landed
        for entry in mapped_entries:
            self._unmap(entry)
            if self.resident > budget:
                self.evict_lru(budget, set())

    def unmap(self, entries) -> None:
        """Take these MAPPED entries back (as `unmap_all` does, without making room)."""
        entries = [e for e in entries if e.state is MAPPED]
        if entries:
            self.mover.synchronize()      # once, as unmap_all
        for entry in entries:
            self._unmap(entry)

    def _unmap(self, entry: Entry) -> None:
        storage = entry.ref()
        if storage is None:
            return                      # died: retired by _reap_dead
        written = entry.mapping.unmap(storage)
        entry.mapping = None
        if written:
            entry.state, entry.clean = FAST, False
            self.offloaded -= entry.nbytes
            self._add_resident(entry.nbytes)
            self.touch(entry)
        else:
            entry.state = SLOW

    def release_mappings(self) -> None:
        """At close(): MAPPED storages stay mapped (the mapping keeps the unnamed swap file
        alive until they die) and are handed to the next OutOfCore that meets them."""
        for entry in self.entries.values():
            storage = entry.ref()
            if entry.state is MAPPED and storage is not None and entry.mapping is not None:
                mapped.orphan(storage, entry.mapping)
                entry.mapping = None

    def _victims(self, excess: int, keep: set) -> list:
        """The keys `evict_lru` evicts to free `excess` bytes, chosen before any is evicted
        (evicting changes the order): NOTE [Victims]."""
        # The least recent entries that cover the excess (what LRU would take), then those
        # after them that could cost less than the dearest of these: a clean entry used
        # since (`_cost`; `used` grows along the order), at most VICTIM_WINDOW in all.
        window, cover, dearest = [], 0, None
        for key, entry in self.lru.items():
            if dearest is None and cover >= excess:
                dearest = max(map(_cost, window))
            if dearest is not None and (entry.used + 1.0 >= dearest
                                        or len(window) >= VICTIM_WINDOW):
                break
            if key not in keep and not entry.pinned:
                window.append(entry)
                cover += entry.nbytes
        chosen = _covering(window, excess)                  # LRU's choice
        if len(window) > len(chosen):
            # GreedyDual's choice where it moves no more bytes than LRU's: a large clean
            # entry is not dropped to free a little of a small dirty one (helper-113).
            greedy = _covering(sorted(window, key=_cost), excess)   # stable: LRU among equals
            if _moves(greedy) <= _moves(chosen):
                chosen = greedy
        for entry in chosen:
            self.aging = max(self.aging, _cost(entry))
        return [entry.key for entry in chosen]

    def evict_lru(self, target: int, keep: set) -> bool:
        """On-demand: evict entries not in `keep`, least recently used first with clean
        ones before dirty ones (NOTE [Victims]), until resident bytes are at most
        `target`, synchronously. Returns whether any went to the slow
        tier now (not when deferred)."""
        if self._deferred is not None:            # a collective is being dispatched
            keep = set(keep) | self._held         # its storages stay (hold_moves)
        if self.owned:                            # foreign storages hold room too
            self._owned_sampled = self.owned_bytes()     # fresh: the peak counts it too
            target -= self._owned_sampled
        if self._dead:
            self._reap_dead()
        if self.resident <= target:               # most calls: no copy of the order
            return False
        chosen = self._victims(self.resident - target, keep)
        started, pending, evicted = [], 0, False
        for keys in (chosen, None):
            if keys is None:
                if self.resident - pending <= target:
                    break
                keys = list(self.lru)
            for key in keys:
                if self.resident - pending <= target:
                    break
                entry = self.lru.get(key)
                if entry is None or key in keep or entry.pinned:
                    continue
                self.evict(entry, unplanned=True)
                evicted = evicted or entry.state is not FAST
                if entry.state is OUT:
                    started.append(entry)
                    pending += entry.nbytes
        for entry in started:
            self.finish(entry)
        return evicted
