"""The rest of a step that left its plan, run far below the budget.

NOTE [Far below the budget]

After a deviation the rest of a step runs op by op (`OnDemand`): before each op its
inputs are made ready and room is left for its outputs (a meta kernel asked, cached by
argument signature), after it the outputs are tracked and the budget restored. That is
40-55 µs of Python per op on a 2-core machine, most of a step of small ops
(docs/executor.md, "Recording and replaying"). Where nothing is on the slow tier and the
step holds far less than its budget, none of it changes what runs until the step holds
more, so the replayer runs the ops as they come (`Headroom.run`) under these rules:

  1. Entered at the first op run on demand after a deviation (the op that left the
     plan, where it ran, counted), every transfer settled, only where every tracked
     storage is resident (`Residency.offloaded` is 0, no entry in another state: no op
     needs an input made ready), no storage is owned by a collective or FSDP, the
     tracked bytes with the margin (rule 4) are at most half the budget, and the fast
     tier is RAM: on a GPU an op that passed the budget before it was seen (rule 4)
     could fail for want of memory.
  2. Each op's inputs are looked up once: a tracked one is touched (its place in the
     LRU order) and, where the op writes it, marked written (a clean slow copy of it is
     stale from then: evicting it must write); one first seen (made outside any op) is
     tracked, as `OnDemand.before` does, where it fits beside what is counted and the
     margin; one made here (rule 3) is left as it is. An input found in any state but
     FAST, or one first seen that does not fit, ends the headroom before the op runs
     (`OnDemand` then makes its room first).
  3. Each storage an op makes on the fast tier's device (one elsewhere is outside the
     budget: Residency NOTE 6) is kept in `made` with a weak reference and counted in
     `live` until it dies (its weakref callback, on any thread, queues its bytes; the
     step's thread takes them off before it next reads `live`). Nothing made here is
     tracked, so nothing made here can move, and none of it is lost.
  4. Before each op, where the tracked bytes, `live`, those of the inputs first seen and
     the op's room pass the budget, and after it, where the tracked bytes, `live` and
     the margin do, the headroom ends (`leave`): every live storage made here is
     tracked, the least recently used are evicted to the budget, and the step goes on
     with `OnDemand` (the op before which it ended runs there). The margin is twice the
     most a function of the plan made, or any op made here since; an op's room is the
     margin or twice its largest input, the larger. So an op that alone makes more than
     both, and than the room left beside what is counted (a factory of a size the data
     gives, a product much larger than its factors), passes the budget before it is
     seen, as in a passive replay (docs/executor.md, "Passive mode"); `OnDemand` would
     have made room for it first (its meta kernel asked). An op that needs more than
     the budget on its own is found at the end as on demand (`InfeasibleBudget`).
  5. An op in a distributed namespace ends the headroom before it runs, and is never
     the op at which it begins (`compose.around` tracks what a collective holds while
     in flight; a collective is in the step's shape whatever its size), as does the
     step's end (`leave` with no eviction): the storages that outlive the step are
     tracked, as `OnDemand` would have left them.
  6. The step's shape is noted as `OnDemand` notes it (`Replayer._ran_on_demand`: each
     op's name, the bytes it made and read, in order), so that step shapes and families
     are the same whichever ran the op; the step's peak counts `live` too; and what an
     op made past its meta kernel is learnt (`learn_created`, asked where it made more
     than its largest movable input, the room `OnDemand` would have left it at least).
"""
from __future__ import annotations

import functools
from collections import deque
import weakref

from ..aten import (distinct_storages, note_read_past, op_inputs, output_tensors,
                    written_tensors)
from ..states import FAST
from .interrupts import no_raise
from .on_demand import created_bytes, learn_created, mark_written
from .residency import Residency


@no_raise      # a weakref callback: a signal landing here is noted (NOTE [Interrupts] 6)
def _gone(died: deque, key: int, nbytes: int, ref) -> None:
    died.append((key, nbytes, ref))           # any thread: deque.append is atomic


class Headroom:
    """Runs the ops of a step that left its plan while far below the budget (NOTE [Far
    below the budget])."""

    def __init__(self, res: Residency, budget: int, margin: int):
        self.res, self.budget, self.margin = res, budget, margin
        self.made: dict[int, weakref.ref] = {}    # key -> weakref, of storages made here
        self.live = 0                             # their bytes, while they live (rule 3)
        self._died: deque = deque()

    @classmethod
    def enter(cls, res: Residency, budget: int, keys) -> "Headroom | None":
        """A Headroom where rule 1 allows one, else None. `keys`: the plan's function keys
        (`plans.function_keys`), for the margin (rule 4)."""
        if (res.mover.device_type != "cpu" or res.offloaded or res.owned
                or any(e.state is not FAST for e in res.entries.values())):
            return None
        margin = 2 * max((key[1] for key in keys if key is not None), default=0)
        if res.resident + margin > budget // 2:
            return None
        return cls(res, budget, margin)

    def run(self, func, args, kwargs):
        """Run one op (rules 2 and 3). Returns (its output, the bytes of each storage it
        read in order, the bytes of each it made, the storages it read and made), or
        None, having run nothing, where an input is not resident, or one first seen or
        the op's room does not fit beside what is counted (rules 2 and 4): the caller
        leaves and runs the op on demand."""
        res, made = self.res, self.made
        looked = res.entries_of(distinct_storages(op_inputs(func, args, kwargs)))
        first = largest = movable = 0
        for s, entry in looked:
            nbytes = s.nbytes()
            if nbytes > largest:
                largest = nbytes
            if entry is None:
                ref = made.get(s._cdata)
                if ref is None or ref() is not s:
                    first += nbytes
                elif nbytes >= res.min_move_bytes and nbytes > movable:
                    movable = nbytes            # as `room` sees it, tracked
            elif entry.state is not FAST:
                return None
            elif not entry.pinned and entry.nbytes > movable:
                movable = entry.nbytes
        if first or 2 * largest > self.margin:
            self._settle()
            if (res.resident + self.live + first + max(self.margin, 2 * largest)
                    > self.budget):
                return None
        entries, read = [], []
        for s, entry in looked:
            if entry is None:
                key = s._cdata
                ref = made.get(key)
                if ref is not None and ref() is s:
                    read.append(s.nbytes())
                    made[key] = made.pop(key)       # last used last: the LRU order
                    continue
                entry = res.track(s)
                if entry.nbytes > movable and not entry.pinned:
                    movable = entry.nbytes
            else:
                res.touch(entry)
            entries.append(entry)
            read.append(entry.nbytes)
        out = func(*args, **kwargs)
        note_read_past(func, out)       # NOTE [Read past the dispatcher] in aten.py
        written = written_tensors(func, args, kwargs)
        if written:
            mark_written(res, entries, written)
        sizes, outputs = [], []
        seen = {s._cdata for s, _ in looked}
        died, device = self._died, res.mover.device_type
        for s in distinct_storages(output_tensors(out)):
            key, nbytes = s._cdata, s.nbytes()
            if key in seen:
                continue
            entry = res.entry_of(s)
            if entry is not None:               # tracked already: counted there
                sizes.append(entry.nbytes)
            elif nbytes:
                sizes.append(nbytes)
                outputs.append(s)
                if s.device.type == device:     # else outside the budget (NOTE 6)
                    made[key] = weakref.ref(s, functools.partial(_gone, died, key, nbytes))
                    self.live += nbytes
        total = sum(sizes)
        if 2 * total > self.margin:
            self.margin = 2 * total
        if total > movable:
            # Where the op made more than its largest movable input, the room `OnDemand`
            # leaves may be short of it (no meta kernel, one that under-reports):
            # remembered, as `OnDemand.after` does, for the next call of its signature
            # run on demand.
            known = created_bytes(func, args, kwargs)
            if known is None or total != known:        # less: a scaled room's line moves
                learn_created(func, args, kwargs, total)
        return out, read, sizes, [s for s, _ in looked] + outputs

    def over(self) -> bool:
        """Whether the step now holds too much to go on so (rule 4); notes its peak."""
        self._settle()
        res = self.res
        held = res.resident + self.live
        res.note_peak(held)
        return held + self.margin > self.budget

    def leave(self, evict: bool = True) -> None:
        """Track every live storage made here, least recently used first (rules 4 and 5),
        and, with `evict`, evict the least recently used to the budget. (They come
        after the tracked ones in the LRU order, which op by op would have interleaved
        them by use: what is evicted then can differ a little from op by op.)"""
        self._settle()
        res = self.res
        for ref in self.made.values():
            storage = ref()
            if storage is not None and storage.nbytes():
                res.track(storage)
        self.made, self.live = {}, 0
        if evict:
            res.evict_lru(self.budget, set())

    def _settle(self) -> None:
        died, made = self._died, self.made
        while died:
            key, nbytes, ref = died.popleft()
            self.live -= nbytes
            if made.get(key) is ref:
                del made[key]
