"""The replaying executor: follow a Schedule while the user's step runs.

Before function i it runs the schedule's begin-actions (WAIT, SWAP_IN) and makes the
op's inputs resident (waiting only on transfers not finished yet); after it, the
end-actions (SWAP_OUT, DROP, FREE). Array ids of the trace are bound to storages as the
step touches them, in the order the recorder numbered them, so a mismatch in op or in
storage is seen at once. From a mismatch on, the iteration runs on-demand (never wrong,
only slower) and the next iteration is recorded again.

Every storage an op reads passes through `Residency.ready` first, whatever the plan
says: a wrong or stale plan costs time, never correctness.

Functions the planner inserted to recompute an array (`Function.repeats`) are run by
the replayer itself, before the step's next op: NOTE [Replaying a recompute] in
recompute.py. Ops on scalars that the record has elsewhere or not at all neither leave
the plan nor count in the step's shape: NOTE [Small ops off the record] in plans.py.
"""
from __future__ import annotations

import functools
import math
import time
import weakref

import torch
import torch.utils._pytree as pytree
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)
from torch.utils._python_dispatch import _disable_current_modes

from ..aten import (_READ_PAST_OP_IDS, BINDING_OPS, FRESH_ARGUMENT_OPS, binds_storage,
                    broadcast_shape, call_split, count_foreach_writes, distinct_storages,
                    is_foreach, makes_nothing_new, note_read_past, op_inputs, output_tensors,
                    split_foreach, storage_of, written_tensors)
from ..plan.schedule import DROP, FREE, SWAP_IN, SWAP_OUT, WAIT
from ..states import DISCARDED, FAST, IN, ON_SLOW_TIER, OUT, SLOW
from ..trace.recorder import OptimizerSteps, op_phase
from ..units import count, format_bytes
from .compose import DISTRIBUTED_NAMESPACES, around
from .headroom import Headroom
from .interrupts import HeldMode, Shield
from . import recompute
from .on_demand import OnDemand, created_bytes, infeasible, mark_written, needed
from .plans import (SMALL_OP_BYTES, Ran, family_of, function_keys, shape_of, sizes_after,
                    sizes_made)
from .residency import Residency
from .steplog import StepLog


# An op's tensor arguments, and the storages it takes as arguments (NOTE [Storage
# arguments] in aten.py: a `set_`'s source, made resident before it like any input).
_tensors_read = op_inputs


def _pointwise_width(func, args, kwargs, tensors) -> int:
    """The element size of a pointwise op's output as PyTorch makes it: its meta kernel
    run on meta copies of the arguments, cached by what type promotion reads (each
    tensor's dtype and whether it is 0-dim, each scalar's type, the other arguments, the
    default dtype). Promotion is the op's own: a float tensor divided by a 0-dim int64
    counter stays float (helper-104: AveragedModel's 1 KiB bias, counted at int64's
    width, left its plan every replay), a bool mask times 0.5 or the sigmoid of an int
    tensor makes floats, a `bitwise_and` of bool masks and a comparison make bools (counted
    as floats, Qwen2-MoE's masks left the plan). Where the meta kernel fails: the widest
    input's size (an op that made more leaves the plan after it: rule 5)."""
    key = (func, torch.get_default_dtype(), *map(_promotion_key, args),
           *((name, _promotion_key(value)) for name, value in kwargs.items()))
    width = _WIDTHS.get(key)
    if width is not None:
        return width
    try:
        with _disable_current_modes():
            meta_args, meta_kwargs = pytree.tree_map_only(
                torch.Tensor, lambda t: torch.empty_like(t, device="meta"), (args, kwargs))
            out = func(*meta_args, **meta_kwargs)
        width = max((t.element_size() for t in output_tensors(out)), default=1)
    except Exception:       # noqa: BLE001 - a kernel with no meta answer: the widest input
        # (rule 5 after), not cached: the failure may be the values' (an int scalar past
        # int64's range), and the next call with the same key would be sized by it.
        return max((t.element_size() for t in tensors), default=1)
    if len(_WIDTHS) < 4096:
        _WIDTHS[key] = width
    return width


def _promotion_key(value):
    """What `_pointwise_width`'s answer depends on in one argument."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.dim() == 0, value.device.type
    if isinstance(value, (list, tuple)):
        return type(value), *map(_promotion_key, value)
    if isinstance(value, (str, type(None), torch.dtype, torch.memory_format, torch.layout)):
        return value
    return type(value)          # a number: its type; anything else: its type alone


_WIDTHS: dict = {}      # `_pointwise_width` by `_promotion_key`

_now = time.perf_counter
_STRIDED = torch.strided


def _outputs(out) -> tuple[list, list]:
    """`output_tensors(out)` and their `distinct_storages`; for the usual output, one plain
    strided tensor, the same answer without their generators and sets."""
    if type(out) is torch.Tensor and out.layout is _STRIDED:
        storage = storage_of(out)
        return [out], [] if storage is None else [storage]
    outputs = output_tensors(out)
    return outputs, distinct_storages(outputs)


class _Op:
    """What a replay asks of an op at every call, asked of PyTorch once per op and replay
    (`Replayer._op`): its name as the recorder has it, whether it is a collective
    (`DISTRIBUTED_NAMESPACES`), a multi-tensor op (`is_foreach`), one whose outputs PyTorch
    reads past the dispatcher (`note_read_past`). `nothing_new` and `pointwise`
    (`_runs_small`) are asked where first needed. An OpOverload's `namespace`, `tags` and
    hash are Python properties, and its schema's name a new string per read: asked per
    call, they were a good part of what outcore added to each op."""

    __slots__ = ("func", "name", "distributed", "foreach", "read_past", "nothing_new",
                 "pointwise")

    def __init__(self, func):
        self.func = func                # held: no other object takes its id meanwhile
        self.name = str(func)
        self.distributed = func.namespace in DISTRIBUTED_NAMESPACES
        self.foreach = is_foreach(func)
        self.read_past = id(func) in _READ_PAST_OP_IDS
        self.nothing_new = self.pointwise = None


def _op_schema_name(op: str) -> str:
    """"aten.lift_fresh.default" -> "aten::lift_fresh" (a recorded op's schema name)."""
    namespace, _, rest = op.partition(".")
    return f"{namespace}::{rest.rsplit('.', 1)[0]}" if "." in rest else f"{namespace}::{rest}"


FRESH_OR_BINDING = FRESH_ARGUMENT_OPS | BINDING_OPS
# The end of a deviation's reason where the tensor read in place of the recorded one is a
# storage outcore tracks already (parts of the model taken in turns: OutOfCore._periodic).
ANOTHER_TRACKED = "reads another array than recorded (one outcore tracks already)"


class _Tables:
    """What following one plan needs from its trace, made once per plan and shared by
    every replay of it (`_tables`): read only. Made at each replay's start, they cost
    every iteration a few milliseconds per thousand functions."""

    def __init__(self, trace, keys):
        fns = trace.functions
        self.op_names = [f.op for f in fns]
        self.expected = [f.arrays() for f in fns]
        # How many of each function's arrays it read (or wrote) rather than created: a
        # step that reads more storages than that is off its record, even where the
        # function also created arrays (an extra input must not bind to an output's id).
        # `lift_fresh` is the exception: its argument, made just before it outside the
        # dispatcher, is recorded as created, yet it is the op's input (FRESH_ARGUMENT_OPS);
        # so is `set_`'s storage made by `copy.deepcopy` or `torch.load` (BINDING_OPS).
        fresh = [_op_schema_name(f.op) in FRESH_OR_BINDING for f in fns]
        self.n_read = [len(f.accesses) if made_before
                       else sum(a.kind != "create" for a in f.accesses)
                       for f, made_before in zip(fns, fresh)]
        self.nbytes = [a.nbytes for a in trace.arrays]
        self.is_input = [a.kind == "input" for a in trace.arrays]
        self.is_state = [a.kind == "persistent" and a.existed_before for a in trace.arrays]
        self.dirty = [tuple(a.array for a in f.accesses if a.kind != "read") for f in fns]
        # What each function creates, its workspace too: told to the trim governor before
        # it runs (NOTE [Announced outputs] in memory/malloc.py); not what `lift_fresh`
        # and `set_` are recorded to create, which exists before them (above).
        self.outputs = [f.workspace_bytes + (0 if made_before else sum(
                            self.nbytes[a.array] for a in f.accesses if a.kind == "create"))
                        for f, made_before in zip(fns, fresh)]
        # NOTE [Small ops off the record]: a function keyed None is small or inserted.
        self.small = [k is None and f.repeats is None for k, f in zip(keys, fns)]
        # The bytes each function creates by its key (0 for one keyed None): a passive
        # replay checks what the step made where this is not 0 (`Replayer._follow`).
        self.made = [0 if k is None else k[1] for k in keys]
        # NOTE [Replaying a recompute] (recompute.py): the functions run again, and
        # which arrays they make again.
        self.repeats = [f.repeats for f in fns]
        self.sources = {r for r in self.repeats if r is not None}
        self.made_again: dict[int, int] = {}        # y' (or a temporary copy of y) -> y
        remade: dict[int, list[int]] = {}           # y -> the arrays that make it again
        self.producer: dict[int, int] = {}          # y -> the function that made it
        self.follower: dict[int, int] = {}          # that function -> its in-place follower
        for fn in fns:
            if fn.repeats is None:
                continue
            made = [a.array for a in fn.accesses if a.kind == "create"]
            if made:                                # a repeated producer
                y = next(a.array for a in fns[fn.repeats].accesses if a.kind == "create")
                self.made_again[made[0]] = y
                remade.setdefault(y, []).append(made[0])
                self.producer[y] = producer = fn.repeats
            else:                                   # its follower, right after it
                self.follower[producer] = fn.repeats
        self.y_of = {p: y for y, p in self.producer.items()}
        # NOTE 5: every copy of y made before the last is a temporary, discarded again
        # where the plan frees it; y's calls are kept for the next remake till then.
        self.temporary = {t for copies in remade.values() for t in copies[:-1]}
        self.twice = {y for y, copies in remade.items() if len(copies) > 1}


# id(schedule) -> (keys, _Tables); an entry goes when its schedule does (a finalizer),
# so that a later schedule with the same id() never sees it.
_TABLES: dict[int, tuple] = {}


def _tables(trace, schedule, keys) -> _Tables:
    """The `_Tables` of the plan (`trace`, `schedule`, `keys`), made at its first replay."""
    key = id(schedule)
    found = _TABLES.get(key)
    if found is not None and found[0] is keys and found[1] is trace:
        return found[2]
    if found is None:
        weakref.finalize(schedule, _TABLES.pop, key, None)
    _TABLES[key] = (keys, trace, _Tables(trace, keys))
    return _TABLES[key][2]


class Replayer(HeldMode):
    def __init__(self, trace, schedule, residency: Residency, budget: int, carried: dict,
                 shield: Shield, inputs=(), *, keys, may_follow: bool = True,
                 lasting=frozenset(), others=None):
        super().__init__(shield)
        self.res = residency
        self.budget = budget
        self._take(trace, schedule, keys)
        self._ran: list = []            # the keys of the ops run after a deviation (shape)
        # The name of every op the step ran, as the recorder has them: its family after
        # a deviation (rule 2 of NOTE [Step shapes]; the plan's ops are not, where it
        # passed small functions or ran small ops off the record).
        self._ops: list = []
        # The optimizer steps begun and not ended (`trace.recorder.op_phase`), from
        # `start` on.
        self._optimizers = OptimizerSteps()
        self._optimizer_hooks: list = []
        self._sizes: dict = {}          # array id: bytes bound or made, where not the plan's
        # Every op run after a deviation, small ones too (`plans.Ran`), for rule 10 of
        # NOTE [Step shapes] (`outgrown_sizes`).
        self._made: list = []
        self.replaced: set = set()      # origins of batches taken for parameters (_note_replaced)
        # Shapes of the plans that found another storage where they had state that still
        # lives, and (shape, origin) of such buffers read only (`_note_replaced`; taken
        # up by `_Iteration._adopt` where the step ended off its plans).
        self.stale: set = set()
        self.swapped: set = set()
        self.by_id: list = [None] * len(trace.arrays)
        self.aid_of: dict = {}       # entry -> the array id it was bound to, for the log
        # NOTE [Step shapes] rule 9: other plans this step may turn out to follow
        # (`others(keys, expected, nbytes, name)`: (plan, {array id: its id there}, what
        # it starts from, the other plans' state) for a plan whose record ran this
        # step's first functions and then `name`, or None), and the function where the
        # step last took one up.
        self._others = others
        self.switched_at = None
        self._inputs = inputs        # entries the last step read as inputs (not strangers)
        for aid, entry in carried.items():
            self.by_id[aid] = entry
            self.aid_of[entry] = aid
        self.started_from = dict(carried)   # {aid: entry} of the state it started from
        self.index = 0
        self.deviation: str | None = None
        # NOTE [Step shapes] rule 10: the step's arrays were smaller than the plan's
        # somewhere (`smaller`), or one was larger, which left the plan (`_larger`; it
        # outgrew the plan if it then ran the plan's ops: `outgrew`).
        self.smaller = self._larger = False
        self.more = 0                   # bytes a passive replay made past the record's
        self._followed: list = []       # weakrefs: storages a passive replay saw made
        # (function, `plans.Ran`) of those that made more
        self._made_larger: list = []
        self._read_sizes: dict = {}     # array id -> bytes of an input larger than planned
        self.infeasible = None       # an op after the deviation that no budget this size fits
        self._fallen = 0             # ops run on demand since the deviation
        self._headroom = None        # NOTE [Far below the budget] in headroom.py
        self._may_enter = False
        self.skipped_actions = 0
        self._zombies: list = []    # FREEd by the plan while PyTorch still held the storage
        self._lingering: list = []  # ...and still held at the next op (`_reap`)
        self._on_demand = OnDemand(residency, budget)
        self._by_id: dict = {}        # id(func) -> its `_Op` (`_op`)
        # A plan that moves nothing needs no bookkeeping: only follow the op sequence,
        # so that a step that changes is still noticed (and then runs on-demand).
        # Not while another plan kept moves something (it needs to know which storages
        # this step leaves, NOTE [Step shapes] in plans.py, rule 4), nor while a storage
        # is on the slow tier (a step that ran on demand, or another plan, left it
        # there, and following makes nothing ready).
        self.passive = may_follow and schedule.bytes_moved == 0 and residency.offloaded == 0
        self._strangers: list = []
        self._stranger_bytes = 0      # of the strangers and the lingering together
        self._left: list = []         # inputs freed by the plan or left for a new batch
        self._lasting = lasting      # entries of other plans' state: strangers that stay
        self.log = StepLog(time.perf_counter())
        # (func, args, kwargs, self) -> None, called before each op where the state_dir
        # asks (`Durable.watch`): the iteration after a recording only.
        self.watch = None
        if self._sources:
            self.passive = False

    def _take(self, trace, schedule, keys) -> None:
        """What following the plan of (`trace`, `schedule`) needs, made once per plan."""
        self.trace = trace
        self.schedule = schedule
        self.n = len(trace.functions)
        self.keys = keys                # plans.function_keys(trace), made once per plan
        t = _tables(trace, schedule, keys)          # read only: shared by its replays
        self.op_names, self.expected, self.n_read = t.op_names, t.expected, t.n_read
        self.nbytes, self.is_input, self.is_state = t.nbytes, t.is_input, t.is_state
        self.dirty, self.small, self.repeats = t.dirty, t.small, t.repeats
        self._made_by_key = t.made
        self.outputs = t.outputs
        self.res.follow(t)          # the trim governor learns each op's growth per plan
        self._sources, self._made_again, self._producer = t.sources, t.made_again, t.producer
        self._follower, self._y_of = t.follower, t.y_of
        self._temporary, self._twice = t.temporary, t.twice
        self._curve = schedule.resident_curve
        self._recompute_state()

    # -- recompute (NOTE [Replaying a recompute] in recompute.py) --------------------------
    def _recompute_state(self) -> None:
        """This replay's own recompute state (the plan's tables are `_Tables`)."""
        self._calls: dict[int, recompute.Call] = {}
        self._held: dict[int, object] = {}          # y -> its entry, from its FREE on
        self._kept: dict[int, list] = {}            # y -> its calls, while copies remain
        self._written_off: dict = {}    # key -> weakref of storages small ops off the record wrote

    def _capture(self, i, func, args, kwargs):
        call = recompute.capture(func, args, kwargs, producer=i in self._y_of)
        if call is not None:
            self._calls[i] = call
        return call

    def _drop(self, y: int, entry) -> None:
        """The plan frees y, which a repeat makes again: discard its bytes if its calls
        were kept (NOTE 1 and 2); else it is written out like any storage the plan frees
        while something holds it, and the repeat reads it back."""
        producer = self._producer[y]
        calls = [self._calls.pop(producer, None)]
        follower = self._follower.get(producer)
        if follower is not None:
            calls.append(self._calls.pop(follower, None))
        if any(c is None for c in calls) or calls[0].out_index < 0:
            calls = None
        elif y in self._twice:
            self._kept[y] = calls                 # NOTE 5: made again more than once
        self._discard(y, entry, calls)

    def _discard(self, y: int, entry, calls) -> None:
        """Discard y's bytes with the calls that make them again; without calls (or if
        the discard is refused) it is written out at the next op and read back."""
        storage = entry.ref() if entry is not None else None
        if storage is None:
            return                      # never bound, or died: no repeat will find it
        if calls is not None and self._written_off:     # rule 8 of NOTE [Small ops ...]
            written = self._written_off.get(entry.key)
            if written is not None and written() is not None or any(
                    t._version != v and t.untyped_storage()._cdata != entry.key
                    for call in calls for t, v in call.versions or ()):
                calls = None            # written off the record: written out instead
        self._held[y] = entry
        if calls is None or not self.res.discard(entry, recompute.Remake(
                self.res, calls, recompute.describe(entry.nbytes, self.op_names[self._producer[y]]),
                storage)):
            if entry.state is FAST and not entry.pinned:
                self._zombies.append(entry)       # lingers beside the plan (`_reap`)

    def _repeat(self, k: int) -> None:
        """Run inserted function k: its actions, and the remake of the array it makes."""
        res = self.res
        taken = time.perf_counter()
        if self._zombies:              # freed by the repeat before, still held
            self._reap()
        if self._stranger_bytes:       # lingering beside the plan: the repeat's room first
            self._keep_room(k)
        self._actions(self.schedule.begin[k])
        fn = self.trace.functions[k]
        for acc in fn.accesses:
            a = acc.array
            if acc.kind == "create":
                y = self._made_again[a]
                if a not in self._temporary:
                    self._kept.pop(y, None)    # the last copy: its calls go (NOTE 5)
                entry = self._held.get(y)
                if entry is None or entry.ref() is None:
                    continue
                self.by_id[a] = entry
                self.aid_of[entry] = a
                res.ready(entry)           # remade here (a failure leaves it held: NOTE 4)
                del self._held[y]
            entry = self.by_id[a]
            if entry is not None:
                res.ready(entry)
                res.touch(entry)
        self._actions(self.schedule.end[k])
        self.index = k + 1              # ran under the plan: in the shape (`shape`)
        if self.res.newly_pinned:
            self._check_pinned()
        now = time.perf_counter()
        self.log.function(k, taken, taken, now, now, res.resident, res.offloaded, res.last_rss)

    def _remake_held(self) -> None:
        """NOTE 4: whatever is still discarded and alive is made again now: when the
        iteration ends, and when the step leaves the plan (before the op that left it
        runs, which may change what a repeat reads). One that cannot be remade gets its
        memory back filled with NaN, and the first error is raised."""
        held, self._held, self._calls, self._kept = self._held, {}, {}, {}
        error = None
        for entry in held.values():
            if entry.state is not DISCARDED or entry.ref() is None:
                continue
            try:
                try:
                    self._room_for_remake(entry)
                except Exception as exc:     # noqa: BLE001 - a full disk: remade over the
                    error = error or exc     # budget all the same, never lost
                self.res.ready(entry)
            except BaseException as exc:  # noqa: BLE001 - the others are still remade
                self.res.abandon(entry)
                error = error or exc
        if error is not None:
            raise error

    def _room_for_remake(self, entry) -> None:
        """Before a remake or a read-back off the plan's order: finish the plan's writes
        under way, then write out the least recently used, until the array and what its
        remake brings into memory (its inputs not there, and for an input discarded too,
        its remake's, and so on) fit the budget beside the rest. The plan left no room
        for all held arrays at once (it remakes each before its use), and remaking them
        together went over the budget by their sum."""
        res, need, keep, todo = self.res, 0, set(), [entry]
        while todo:
            e = todo.pop()
            if e.key in keep:
                continue
            keep.add(e.key)
            if e.state is DISCARDED and e.remake is not None:
                need += e.nbytes
                todo += [i for t, _ in e.remake.versions
                         if (i := res.entry_of(t.untyped_storage())) is not None]
            elif not e.occupies_fast:
                need += e.nbytes
        # The plan's writes under way free their room first, at no new move: between two
        # functions (a small op off the record) the plan may fill the budget with them.
        over = res.resident + need - self.budget
        if over > 0:
            for e in [e for e in res.entries.values() if e.state is OUT and e.key not in keep]:
                res.finish(e)
                over -= e.nbytes
                if over <= 0:
                    break
        res.evict_lru(self.budget - need, keep)

    def _ready_off_plan(self, entry) -> None:
        """Make `entry` ready outside the plan's order: one discarded is remade once its
        room, its chain's included, was made (`_room_for_remake`); so is one read back from
        the slow tier (a small storage under min_move_bytes 0 that the plan has out)."""
        read_back = entry.state in ON_SLOW_TIER
        if read_back or (entry.state is DISCARDED and entry.remake is not None):
            self._room_for_remake(entry)
        self.res.ready(entry)
        if read_back:           # beside the plan, which has it out: counted till let go of
            self.linger(entry)

    # -- iteration boundaries ------------------------------------------------------------
    def start(self) -> None:
        """Put carried-over persistent arrays where the schedule wants them at the start:
        write out (or drop, if clean) what it starts without, then read in what it
        starts with but the last iteration left on the slow tier. In a steady loop the
        schedule starts where it ended and nothing moves (simulate: `boundary_s`)."""
        self.log = StepLog(time.perf_counter())
        self._watch_optimizers()
        self.res.spans = []
        self.res.newly_pinned = []      # the recording's own: its plan knows them
        # ...but not state that became unmovable since this plan was recorded, while
        # other steps ran: its moves would be skipped and the budget passed.
        self.res.newly_pinned += [e for aid, e in enumerate(self.by_id)
                                  if e is not None and self._pinned_but_moved(aid, e)]
        wanted = set(self.schedule.resident_at_start)
        moving = [e for aid, e in enumerate(self.by_id) if e is not None and aid not in wanted]
        for entry in moving:
            if entry.state is IN:       # a read left waiting (an interrupted share_memory_)
                self.res.ready(entry)
        for entry in moving:
            self.res.evict(entry)
        for entry in moving:
            self.res.finish(entry)
        self._find_strangers()
        self._send_off_lasting()
        if self.res.newly_pinned:
            # Storages the plan moves out cannot move (`.numpy()` arrays of them kept since
            # the last step): reading in what the plan starts with beside them passed the
            # budget before any op ran (helper-127: 15.0 MiB under 12). Leave the plan
            # first; on demand reads each op's arrays in, making room among the rest.
            self._check_pinned()
            return
        coming = [e for aid in wanted if (e := self.by_id[aid]) is not None and e.state is SLOW]
        if self._stranger_bytes:       # strangers are alive until the step drops them
            self._make_room(self.res.resident - self._stranger_bytes
                            + sum(e.nbytes for e in coming))
        for entry in coming:
            self.res.restore(entry)
        for entry in coming:
            self.res.ready(entry)
        if self.res.newly_pinned:       # found unmovable as they were read in
            self._check_pinned()

    # -- strangers: resident storages the schedule does not know -----------------------------
    def _find_strangers(self) -> None:
        """Note the resident storages the schedule does not know: the trace never saw a
        tensor the step drops without an op (the last step's gradients, when `zero_grad()`
        comes at the top of the step), so the plan counts their room as free. Storages the
        last step read as inputs are not strangers (a batch used again is read at once).
        Passive mode follows ops without making their inputs ready: it evicts nothing."""
        self._strangers, self._stranger_bytes = [], 0
        if self.passive:
            return
        known = self.aid_of.keys() | set(self._inputs)     # entries hash by identity
        self._strangers = [e for e in self.res.lru.values() if e not in known and not e.pinned]
        self._stranger_bytes = sum(e.nbytes for e in self._strangers)

    def _send_off_lasting(self) -> None:
        """Strangers that are another plan's state (Adam's moments, in a micro-batch that
        does not step: NOTE [Step shapes] in plans.py, rule 7) do not die within the step:
        where the plan's peak leaves no room for them, start writing them out now, least
        recently used first, overlapped with the first functions, rather than
        synchronously where the room runs out (`_make_room` waits for them there)."""
        if not self._lasting or not self._strangers:
            return
        need = max(self._curve, default=0) + self._stranger_bytes - self.schedule.budget
        for entry in self._strangers:
            if need <= 0:
                break
            if entry in self._lasting and entry.state is FAST:
                self.res.evict(entry, unplanned=True)
                need -= entry.nbytes
        self._strangers = [e for e in self._strangers if e.state is FAST or e.state is OUT]
        self._stranger_bytes = sum(e.nbytes for e in self._strangers)

    def _note_replaced(self, aid: int, storage, tensors) -> None:
        """The step reads a new tensor where the record had array `aid`: if that was a
        plain leaf requiring grad that the step only reads (recorded as a parameter, as a
        functional model's weights are), it is a batch made with requires_grad=True, and
        the next recording takes it for an input (`replaced`, Recording.batch_leaves).
        Where it was state and the tensor the record had still lives, `_Iteration._adopt`
        takes it up if the step ends off its plans: each plan that found it so is stale
        (`stale`: the user replaced that state, the old one still held elsewhere, as DDP
        keeps its own list of a module's buffers, helper-128; the step may have taken up
        another plan, rule 9, that holds it too, helper-129) and is dropped, the next
        step of its shape recorded with the new one; a module buffer the step only reads
        may take turns (`swapped`: two tables read in turn, a batch put in a buffer with
        the last ones kept; helper-127): the second time for a step's shape, the next
        recording takes it for an input. Only where the step ended off its plans with
        its own plan's shape or after taking up another: one that took up another plan
        and ran it to its end, or left its plan for a step of another shape, was another
        kind of step (a branch, a task with weights of its own: helper-131), not a
        replacement. Nor is a parameter read where the record had another parameter, if
        this step's plan binds it to another array or another plan starts from it: the
        step reads the model's weights in another order (stochastic depth: the head's
        weight where the plan read the next layer's, helper-172). Buffers are not so
        excused: two buffers that swap roles every step take turns (helper-174)."""
        arr = self.trace.arrays[aid]
        entry = self.res.entry_of(storage)
        if (entry is not None and arr.category == "parameter"
                and (entry in self.aid_of or entry in self._lasting)):
            return
        before = self.by_id[aid]
        written = any(aid in d for d in self.dirty)
        if (arr.kind == "persistent" and arr.existed_before and before is not None
                and before.ref() is not None):
            shape = shape_of(self.keys)
            self.stale.add(shape)
            if arr.category == "buffer" and not written:
                self.swapped.add((shape, arr.origin))
        if written or arr.category != "parameter":
            return
        for t in tensors:
            if t.untyped_storage()._cdata == storage._cdata:
                if t.is_leaf and t.requires_grad and type(t) is not torch.nn.Parameter:
                    self.replaced.add(arr.origin)
                return

    def _in_turns(self, i: int, aid: int, entry, storage) -> bool:
        """Rule 13 of NOTE [Step shapes]: function i, the first of the step to read state
        array `aid`, reads another storage of its size that the step has not read yet:
        tracked and state of the step too or of none of its arrays, both movable; or, where
        the plan's is pinned, one pinned too, tracked, or under min_move_bytes and not
        tracked (a head's bias: a pinned storage no step starts from is let go of between
        steps, Residency NOTE 8).
        Parts of a model of one size taken in turns (a head per task, one task a step:
        helper-182). The plan goes on with the two swapped (`_take_turns`), where no other
        plan reads it there (rule 9)."""
        bound, trace, res = self.by_id[aid], self.trace, self.res
        if (bound is None or entry in self._lasting or self._sources or not self.is_state[aid]
                or trace.arrays[aid].first_use != i or bound.owner or bound.elsewhere
                or bound.nbytes != self.nbytes[aid]):
            return False
        if entry is None:           # rule 7's binding anew, for a small pinned array of any op
            return (bound.pinned and bound.state is FAST and storage.nbytes() == bound.nbytes
                    and bound.nbytes < res.min_move_bytes)
        if (entry.owner or entry.elsewhere or entry.nbytes != bound.nbytes
                or entry.pinned != bound.pinned or bound.pinned and bound.state is not FAST):
            return False
        other = self.aid_of.get(entry)
        return other is None or (self.is_state[other] and trace.arrays[other].first_use > i
                                 and self.nbytes[other] == self.nbytes[aid])

    def _take_turns(self, aid: int, entry) -> None:
        """Bind array `aid` to `entry` and the array `entry` was bound to, if any, to the
        storage `aid` had (`_in_turns`; `entry` None: a pinned storage not tracked yet,
        bound as `_one` tracks it). The plan has `aid` resident here, and the other wherever
        it has it: the storage `aid` had goes to the slow tier first (dropped where its
        copy there is current: read ahead for this function, the usual case; else
        written, and waited for), so that reading `entry` back (unplanned, in `ready_all`)
        keeps the count on the plan's curve. A pinned one cannot move: where no array of
        the plan is left bound to it, it is let go of (Residency NOTE 8), and counted no
        more beside the one that takes its place."""
        res, bound = self.res, self.by_id[aid]
        other = self.aid_of.pop(entry, None) if entry is not None else None
        self.aid_of.pop(bound, None)
        self.by_id[aid] = None
        if entry is not None:
            self._bind(aid, entry)
        if other is not None:
            self._bind(other, bound)
        elif bound.pinned:
            res.let_go_of([bound])
        if bound.pinned:
            return
        if bound.state is IN:
            res.ready(bound)
        res.evict(bound, unplanned=True)
        res.finish(bound)

    def _bind(self, aid: int, entry) -> None:
        """Array `aid` of the trace is `entry`'s storage in this iteration."""
        self.by_id[aid] = entry
        self.aid_of[entry] = aid
        if self.is_state[aid]:
            self.started_from[aid] = entry

    def linger(self, entry) -> None:
        """`entry` was made resident outside the plan (sharing.py: `.numpy()` or
        `torch.save` of a storage the plan has on the slow tier, or dropped): it lingers
        beside the plan like a storage the plan freed that the step still holds, and is
        let go of (dropped when clean, else written) where the budget needs its room
        (`_make_room`); the plan's next action for it finds it resident."""
        if entry not in self._lingering:
            self._lingering.append(entry)
            self._stranger_bytes += entry.nbytes

    def _new_batch(self, reading) -> None:
        """An input array of the trace is bound to a storage the last step did not read
        (a new batch), by an op that reads the storages `reading`: the last step's
        inputs that this step has not read (yet) are strangers from now on, so that
        `_make_room` counts them beside the plan (else the first replay of a loop over
        pre-built batches holds the old batch beside the new one, over the budget by one
        batch). Those pinned (small, from numpy, in shared memory) can make no room: they
        are let go of at once (Residency NOTE 9; kept till the step's end, each replay
        whose batch was not the last one's passed the budget by that batch, helper-184),
        but not one this op reads too, whose entry binds as the op's slots all match
        (helper-186: `torch.cat([old, new])` let go of the old batch and bound it dead:
        counted nowhere, and a later read of it deviated). Once per iteration."""
        here = {e for s in reading if (e := self.res.entry_of(s)) is not None}
        self.res.let_go_of([e for e in self._inputs
                            if e not in self.aid_of and e not in here and e.pinned])
        old = [e for e in self._inputs if e not in self.aid_of and e.state is FAST
               and e.ref() is not None and not e.pinned]
        self._inputs = ()
        self._strangers += old
        self._stranger_bytes += sum(e.nbytes for e in old)
        self._left += old

    def left_behind(self) -> list:
        """The inputs the plan freed that the user still holds (a batch kept in a list),
        and those of the last step that `_new_batch` found beside a new batch, that are
        bound to none of the step's arrays at its end: let go of where resident
        (Residency NOTE 9)."""
        by_id, aid_of = self.by_id, self.aid_of      # aid_of keeps freed arrays' entries
        return [e for e in self._left if e.ref() is not None and e not in self._lasting
                and (e not in aid_of or by_id[aid_of[e]] is not e)]

    def _make_room(self, planned: int, excess: int | None = None, keep=()) -> None:
        """Function i will hold `planned` bytes by the schedule, and strangers may still
        hold theirs: write out the least recently used of them, synchronously, until both
        fit in the plan's budget (the budget less what pinned storages may hold,
        ooc.planned_budget; unplanned bytes in the report). Most strangers die before they
        matter (zero_grad drops them), so this runs only where the sum would not fit.
        `excess`: the bytes to write out, where the caller measured them instead; `keep`:
        entries not to write out (the next op's own)."""
        res = self.res

        def alive(entries, bound_ok):
            return [e for e in entries if (e.state is FAST or e.state is OUT)
                    and e.ref() is not None and (bound_ok or e not in self.aid_of)]
        strangers, lingering = alive(self._strangers, False), alive(self._lingering, True)
        # Those being written out first, then strangers, then what the plan freed late.
        candidates = [e for e in sorted(strangers, key=lambda e: e.state is not OUT) + lingering
                      if e not in keep]
        if excess is None:
            excess = planned + sum(e.nbytes for e in candidates) - self.schedule.budget
        out = []
        while candidates and excess > 0:
            entry = candidates.pop(0)
            out.append(entry)
            excess -= entry.nbytes
        for entry in out:
            res.evict(entry, unplanned=True)
        for entry in out:
            res.finish(entry)
        gone = set(out)                              # entries hash by identity
        self._strangers = [e for e in strangers if e not in gone]
        self._lingering = [e for e in lingering if e not in gone]
        self._stranger_bytes = sum(e.nbytes for e in self._strangers + self._lingering)

    def release(self) -> None:
        """After `finish`: drop `others`, a method of the iteration that holds this
        replayer and its OutOfCore. Kept, the two made a cycle, and an OutOfCore closed
        and dropped lived on (its threads, its swap file's disk space, the mappings of a
        deleted state file) until the cycle collector ran, and one dropped unclosed kept
        the next OutOfCore() from being made (helper-137)."""
        self._others = None

    def finish(self) -> None:
        self.res.follow(None)           # no op of the plan from here (NOTE [Each op's growth])
        self._zombies, self._lingering = [], []     # what the user still holds at the end stays
        if self.deviation is None and self.index != self.n:
            self._skip_small(None, True)    # small functions the step did not run at its end
        if self.deviation is None and self.index != self.n and self._switch(None):
            self._skip_small(None, True)    # a plan whose record ends here (rule 9)
        if self.deviation is None and self.index != self.n:
            self.deviation = (f"the step ended after {self.index} of the {self.n} recorded functions")
        try:
            try:
                if self._headroom is not None:
                    self._leave_headroom(evict=False)   # NOTE [Far below the budget] 5
                self._remake_held()
            finally:
                self.res.settle()
        finally:
            for hook in self._optimizer_hooks:
                hook.remove()
            self._optimizer_hooks = []
            self._close_log()

    def _close_log(self) -> None:
        spans, self.res.spans = self.res.spans, None
        log = self.log
        log.end = time.perf_counter()
        aid_of = self.aid_of
        log.transfers = [(aid_of.get(entry, -1), direction, nbytes, start, end)
                         for entry, direction, nbytes, start, end in spans or ()]

    def input_entries(self) -> list:
        """Entries bound to the trace's input arrays, while their storage lives."""
        return [e for arr, e in zip(self.trace.arrays, self.by_id)
                if arr.kind == "input" and e is not None and e.ref() is not None]

    def shape(self) -> int:
        """The shape of the step that ran (NOTE [Step shapes] in plans.py, rule 1): the
        record's functions up to where it left them, then the ops run on demand. A step
        that ran the plan to its end on smaller tensors has the plan's shape (rule 10); one
        that left it has the sizes it bound and made up to there, as a recording of it
        has them, small functions too: with the plan's, a micro-batch of 16 that left
        the plan of a first micro-batch of 32 had a shape no recording has (the first 32
        functions at 32, the rest at 16), each such step added a shape never planned,
        and the loop never settled (helper-80: micro-batches of 32, 24, 32, 16 with a
        step every second; half of 150 iterations recorded or deviated)."""
        keys = self.keys[:self.index]
        if self.deviation is not None and self._sizes:
            sizes = list(self.nbytes)
            for aid, nbytes in self._sizes.items():
                sizes[aid] = nbytes
            keys = function_keys(self.trace, sizes)[:self.index]
        return shape_of([*keys, *self._ran])

    def family(self) -> int:
        """The family of a step that left its plan (NOTE [Step shapes] in plans.py, rule
        2): that of the ops it ran. (One that ran a plan to its end has the plan's, as it
        has its shape: `Plan.family`.)"""
        return family_of(self._ops)

    @property
    def outgrew(self) -> bool:
        """Rule 10: the step left its plan at an array larger than planned and then ran
        the plan's ops, one for one, to its end: the same step on larger tensors. Asked
        once the step has ended."""
        return self.outgrown_sizes is not None

    @functools.cached_property
    def outgrown_sizes(self) -> dict | None:
        """Rule 10: {array id: bytes} of a step that left its plan at function k at an
        array larger than planned and then ran on demand: the arrays bound before, the
        input that did not fit, and what the ops from k on made (`plans.sizes_after`);
        None where it did not leave so, or those ops are not the plan's functions from k
        to the end (another shape of step, not a larger one). Asked once the step has
        ended."""
        if not self._larger or self.deviation is None:
            return None
        k = self.log.deviation[0]
        after = sizes_after(self.trace, self.keys, k, self._made)
        if after is None:
            return None
        sizes = {aid: e.nbytes for aid, e in enumerate(self.by_id) if e is not None}
        # A passive replay bound nothing before k: what its functions that made more
        # there (within the room its plan left) made and read grows too, else the next
        # step as large deviated there. (What it read at the others, it did not see.)
        for i, ran in self._made_larger:
            if i < k:
                made = sizes_made(self.trace, self.keys, [i], [ran])
                sizes.update((a, n) for a, n in (made or {}).items() if n > sizes.get(a, 0))
        for aid, nbytes in (*self._read_sizes.items(), *after.items()):
            sizes[aid] = max(nbytes, sizes.get(aid, 0))
        return sizes

    def ending(self) -> dict:
        """{array id: entry} of the arrays alive at the end (plans.Ending)."""
        return {aid: e for aid, e in enumerate(self.by_id) if e is not None and e.ref() is not None}

    def persistent_entries(self) -> dict:
        """Entries of the state the next iteration starts from (persistent arrays that
        existed before the step), by array id, while their storage lives."""
        out = {}
        for arr in self.trace.arrays:
            entry = self.by_id[arr.id]
            if (arr.kind == "persistent" and arr.existed_before and entry is not None
                    and entry.ref() is not None):
                out[arr.id] = entry
        return out

    # -- interception ----------------------------------------------------------------------
    def _dispatch(self, func, args, kwargs):
        if self.watch is not None:                  # rarely: NOTE [Durable state] rule 17
            self.watch(func, args, kwargs, self)
        res = self.res
        if res.stopped_callback is not None:         # compose.py, NOTE [Collectives
            res.raise_stopped_callback()             # in flight] rule 5
        op = self._by_id.get(id(func))
        if op is None:
            op = self._op(func)
        if op.distributed:                           # compose.py
            if self._headroom is not None:
                self._leave_headroom()       # NOTE [Far below the budget] rule 5
            return around(res, func, args, kwargs, self._run)
        if self.passive and self.deviation is None:
            return self._follow(func, args, kwargs, op)
        if op.foreach:
            return call_split(func, args, kwargs, self._part)
        self._ops.append(op.name)           # `_part`, as `call_split` calls it
        return self._one(func, args, kwargs, None)

    def _run(self, func, args, kwargs):
        if self.passive and self.deviation is None:
            return self._follow(func, args, kwargs)
        return call_split(func, args, kwargs, self._part)

    def _part(self, func, args, kwargs, split=None):
        """An op, or a part of a `_foreach_*` op, as the recorder has it (a function)."""
        self._ops.append(self._name(func))
        return self._one(func, args, kwargs, split)

    def _follow(self, func, args, kwargs, op=None):
        if op is None:
            op = self._op(func)
        if op.foreach:
            calls = split_foreach(func, args, kwargs)
            if calls is not None:
                return self._follow_split(func, args, kwargs,
                                          [self._name(f) for f, _, _ in calls])
        # One function (the usual case): as `_follow_split` with one name, without its lists.
        name = op.name
        self._ops.append(name)
        i = self.index
        if i >= self.n or self.small[i] or self.op_names[i] != name:
            storages = distinct_storages(_tensors_read(func, args, kwargs))
            small = self._runs_small(func, args, kwargs, storages, op)
            # A small op at the small function of its name (the usual case) stands where
            # it is: `_skip_small` would pass no function.
            if not (i < self.n and small and self.op_names[i] == name
                    and self.repeats[i] is None):
                if not (self._skip_small(name, small) and self.index < self.n
                        and self.op_names[self.index] == name):
                    return self._off_record(self._unmatched(name), func, args, kwargs, storages,
                                            small, larger=self._small_grew(i, name, small))
                i = self.index
        self.index = i + 1
        taken = _now()
        out = func(*args, **kwargs)
        if op.foreach:
            count_foreach_writes(func, args, kwargs)
        if op.read_past:
            note_read_past(func, out)   # NOTE [Read past the dispatcher] in aten.py
        done = _now()
        res, log = self.res, self.log
        # `StepLog.function`, written out: a call less per op.
        log.index.append(i)
        log.times.extend((taken, taken, done, done))
        log.memory.extend((res.resident, res.offloaded, res.last_rss))
        planned = self._made_by_key[i]
        if planned:
            outputs, made = _outputs(out)
            self._followed += map(weakref.ref, made)
            self._made_more(i, planned, func, args, kwargs, outputs, made)
        return out

    def _follow_split(self, func, args, kwargs, names):
        """`_follow` of a multi-tensor op that the recorder has as the functions `names`."""
        self._ops += names
        i = self.index
        if self.op_names[i:i + len(names)] != names or len(names) == 1 and self.small[i]:
            storages = distinct_storages(_tensors_read(func, args, kwargs))
            small = self._runs_small(func, args, kwargs, storages)
            if not (self._skip_small(names[0], small)
                    and self.op_names[self.index:self.index + len(names)] == names):
                return self._off_record(self._unmatched(names[0]), func, args, kwargs,
                                        storages, small, larger=self._small_grew(i, names[0],
                                                                                 small))
            i = self.index
        self.index = i + len(names)
        taken = _now()
        out = func(*args, **kwargs)
        count_foreach_writes(func, args, kwargs)
        note_read_past(func, out)       # NOTE [Read past the dispatcher] in aten.py
        done = _now()
        res = self.res
        self.log.function(i, taken, taken, done, done, res.resident, res.offloaded, res.last_rss)
        key = self.keys[i]
        if key is not None and key[1] or len(names) > 1 and any(
                k is not None and k[1] for k in self.keys[i + 1:i + len(names)]):
            outputs = output_tensors(out)
            made = distinct_storages(outputs)
            self._followed += map(weakref.ref, made)
            if len(names) == 1:
                self._made_more(i, key[1], func, args, kwargs, outputs, made)
        return out

    def _made_more(self, i, planned, func, args, kwargs, outputs, made) -> None:
        """Rule 10 of NOTE [Step shapes] in a passive replay, which tracks nothing: where
        the functions so far made more than recorded by more than the plan leaves free
        under its budget (the same step on larger tensors, which could pass the budget
        unseen), the step leaves the plan after function i, and the rest runs on
        demand, tracked. A few bytes more (an output sized by the data: `x[mask]`) stay
        passive."""
        if sum(s.nbytes() for s in made) <= planned:
            return                                        # (every call but a rare one)
        # As the recorder numbers them: storages of no bytes are no arrays (an eval-mode
        # batch norm's saved statistics; helper-87: counted, they made the sizes of the
        # whole step unusable for rule 10).
        read = [s for s in distinct_storages(_tensors_read(func, args, kwargs)) if s.nbytes()]
        keys = {s._cdata for s in read}
        made = [s for s in made if s._cdata not in keys and s.nbytes()]
        more = sum(s.nbytes() for s in made) - planned
        if more <= 0:
            return
        name = self._name(func)
        ran = Ran(name, tuple(s.nbytes() for s in made), tuple(s.nbytes() for s in read), False)
        self._made_larger.append((i, ran))
        self.more += more
        if self.more <= self.schedule.budget - self.schedule.peak_bytes:
            return
        self.index, self._larger = i, True
        self._deviate(f"function {i} ({name}) produced {list(ran.made)} new bytes, recorded "
                      f"{planned} in all", None, None, None)
        self._on_demand.after([], written_tensors(func, args, kwargs), outputs)
        self._ran_on_demand(name, ran.made, read=ran.read)

    def _op(self, func) -> _Op:
        """`func`'s `_Op`, made at its first call in this replay (kept by id: an
        OpOverload's hash is a Python method)."""
        op = self._by_id.get(id(func))
        if op is None:
            op = self._by_id[id(func)] = _Op(func)
        return op

    def _name(self, func) -> str:
        return self._op(func).name

    def _one(self, func, args, kwargs, split=None):
        if self.deviation is not None:
            return self._fallback(func, args, kwargs)
        if self.index < self.n and self.repeats[self.index] is not None:
            if self._zombies:
                self._reap()
            while self.index < self.n and self.repeats[self.index] is not None:
                self._repeat(self.index)
        i = self.index
        name = self._name(func)
        res = self.res
        inputs = _tensors_read(func, args, kwargs)
        if binds_storage(func):
            inputs = inputs[1:]     # set_'s self is read as the recorder sees it: bound anew
        storages = None
        if i >= self.n or name != self.op_names[i] or self.small[i]:
            storages = distinct_storages(inputs)
            small = self._runs_small(func, args, kwargs, storages)
            if not self._skip_small(name, small):
                return self._off_record(self._unmatched(name), func, args, kwargs, storages,
                                        small, larger=self._small_grew(i, name, small))
            i = self.index
        taken = _now()
        if self._zombies:
            self._reap()
        if storages is None:
            storages = distinct_storages(inputs)
        in_storages = [s for s in storages if s.nbytes() or res.entry_of(s)]
        expected = self.expected[i]
        if len(in_storages) > self.n_read[i]:
            return self._off_record(f"function {i} ({name}) reads more arrays than recorded",
                                    func, args, kwargs, in_storages,
                                    self._runs_small(func, args, kwargs, in_storages))
        entries, untracked, binds, turns = [], [], [], []
        for storage, aid in zip(in_storages, expected):
            # A storage first seen here is counted only once its slot binds: one where the
            # record had another array leaves it uncounted and goes on demand, which makes
            # its room first (OnDemand.before), so that the count never passes the budget
            # for memory that was there all along. (A new storage bound in an earlier
            # slot is an input the plan counts already.)
            entry = res.entry_of(storage)
            bound = self.by_id[aid]
            if (bound is not None and bound is not entry and self.nbytes[aid] <= SMALL_OP_BYTES
                    and self.nbytes[aid] < res.min_move_bytes and not self._sources):
                bound = None        # rule 7 of NOTE [Small ops off the record]: bound anew
            if bound is None:
                nbytes = entry.nbytes if entry is not None else storage.nbytes()
                if nbytes != self.nbytes[aid]:          # rule 10 of NOTE [Step shapes]
                    self.smaller |= nbytes < self.nbytes[aid]
                    self._sizes[aid] = nbytes
                if nbytes > self.nbytes[aid]:
                    trace = self.trace
                    out = self._off_record(f"function {i} ({name}) reads an array of {nbytes} "
                                           f"bytes, recorded {self.nbytes[aid]}", func, args,
                                           kwargs, in_storages,
                                           self._runs_small(func, args, kwargs, in_storages),
                                           larger=(expected.index(aid), nbytes))
                    if self._larger and self.trace is trace:    # no other plan taken up
                        self._read_sizes[aid] = nbytes
                    return out
                if self._inputs and self.is_input[aid] and entry not in self._inputs:
                    self._new_batch(in_storages)
                if entry is None:
                    untracked.append((len(entries), storage, aid))
                    entries.append(None)
                    continue
                binds.append((aid, entry))
            elif bound is not entry:
                if self._in_turns(i, aid, entry, storage):
                    if self._switch(name, False, in_storages):      # rule 9 first
                        return self._one(func, args, kwargs)
                    turns.append((aid, entry))
                    if entry is None:                  # pinned both: tracked below
                        untracked.append((len(entries), storage, aid))
                    entries.append(entry)
                    continue
                small = self._runs_small(func, args, kwargs, in_storages)
                if not small:
                    self._note_replaced(aid, storage, inputs)
                why = (ANOTHER_TRACKED if entry is not None
                       else "reads another array than recorded")
                return self._off_record(f"function {i} ({name}) {why}", func, args, kwargs,
                                        in_storages, small)
            entries.append(entry)
        for aid, entry in turns:        # only once every slot matched, as binds
            self._take_turns(aid, entry)
        for aid, entry in binds:        # only once every slot matched (an extra binds none)
            self._bind(aid, entry)
        if self._stranger_bytes:        # rarely: no call per op otherwise
            self._keep_room(i)
        actions = self.schedule.begin[i]
        if actions:                     # most functions have none: no call then
            self._actions(actions)
        for k, storage, aid in untracked:
            # Counted after the frees the plan makes for this function (the memory was
            # there all along: a new batch, state replaced between iterations), so that
            # the count passes neither the plan's curve nor the budget on the way.
            entries[k] = entry = res.track(storage, self.nbytes[aid])
            if self._pinned_but_moved(aid, entry):
                res.newly_pinned.append(entry)      # NOTE 7 of residency.py: leave
            self._bind(aid, entry)
        res.ready_all(entries, self.outputs[i], None if self.smaller else i)
        for entry in entries:
            res.touch(entry)
        if self._sources and self.small[i] and i not in self._sources:
            # Rule 8 for a small write the record has: where its array was bound to
            # another storage than recorded (a fresh buffer each step, here a bias).
            self._spare_remakes(func, args, kwargs)
        call = self._capture(i, func, args, kwargs) if i in self._sources else None
        started = _now()
        out = func(*args, **kwargs)
        if id(func) in _READ_PAST_OP_IDS:
            note_read_past(func, out)   # NOTE [Read past the dispatcher] in aten.py
        returned = _now()
        if call is not None:
            recompute.ran(call)
        known = {e.key for e in entries}
        created = [s for s in _outputs(out)[1]
                   if s._cdata not in known and (s.nbytes() or res.entry_of(s))]
        rest = expected[len(entries):]
        if len(created) != len(rest) or any(      # smaller is the plan's: rule 10
                s.nbytes() > self.nbytes[aid] for s, aid in zip(created, rest)):
            if self._small(func, in_storages) and all(
                    s.nbytes() <= SMALL_OP_BYTES for s in created) and not self._writes_beside_repeats(
                    func, args, kwargs):
                mark_written(res, entries, written_tensors(func, args, kwargs))
                for storage in created:
                    res.track(storage)          # rule 6: counted (pinned) from here
                return out                      # rule 4b, after it ran: the index stays
            self._larger = len(created) == len(rest)
            self._deviate(f"function {i} ({name}) produced {[s.nbytes() for s in created]} new "
                          f"bytes, recorded {[self.nbytes[a] for a in rest]}", None, None, None)
            made = self._on_demand.after(entries, written_tensors(func, args, kwargs),
                                         output_tensors(out))
            self._ran_on_demand(name, [e.nbytes for e in made], read=[e.nbytes for e in entries])
            return out
        for storage, aid in zip(created, rest):
            if storage.nbytes() < self.nbytes[aid]:
                self.smaller = True
                self._sizes[aid] = storage.nbytes()
            entry = self.by_id[aid] = res.track(storage, self.nbytes[aid])
            self.aid_of[entry] = aid
        if call is not None and i in self._y_of and not recompute.captured(
                call, out, self.by_id[self._y_of[i]].ref()):
            del self._calls[i]
        for aid in self.dirty[i]:
            entry = self.by_id[aid]
            if entry is not None:
                res.mark_written(entry)
        actions = self.schedule.end[i]
        if actions:
            self._actions(actions)
        self.index = i + 1              # ran under the plan: in the shape (`shape`)
        if res.newly_pinned:
            self._check_pinned()
        log = self.log                  # `StepLog.function`, written out: a call less per op
        log.index.append(i)
        log.times.extend((taken, started, returned, _now()))
        log.memory.extend((res.resident, res.offloaded, res.last_rss))
        return out

    def _actions(self, actions) -> None:
        res = self.res
        for act in actions:
            entry = self.by_id[act.array]
            if act.kind == FREE and act.array in self._producer:
                self._drop(act.array, entry)           # made again by a repeat
                self.by_id[act.array] = None
                continue
            if act.kind == FREE and act.array in self._temporary:     # NOTE 5
                y = self._made_again[act.array]
                self._discard(y, entry, self._kept.get(y))
                self.by_id[act.array] = None
                continue
            if entry is None or entry.pinned:
                # Pinned arrays stay put by design; an unbound one was never touched in
                # this iteration (e.g. an input the step has not read yet): worth a count.
                if entry is None and act.kind != FREE:
                    self.skipped_actions += 1
                continue
            kind = act.kind
            if kind == WAIT:
                res.finish(entry)
            elif kind == SWAP_IN:
                res.restore(entry)
            elif kind == SWAP_OUT:
                res.evict(entry)
            elif kind == DROP:
                # The plan frees a clean array's memory here, at once. One with no current
                # copy on the slow tier (state replaced between iterations by new tensors:
                # `p.data = p.data.clone()`, `model.to(...)` and back) is written out first,
                # synchronously: nothing later in the plan waits for that write, and its
                # memory stayed beside the plan until something did (over the budget).
                if entry.clean:
                    res.evict(entry)
                else:
                    res.evict(entry, unplanned=True)
                    res.finish(entry)
            elif kind == FREE:
                # Dead for the plan. The storage usually dies as soon as the op's caller
                # lets go of it; whatever still holds it at the next op gets evicted.
                if entry.ref() is not None and entry.state is FAST:
                    self._zombies.append(entry)
                    if self.is_input[act.array]:      # the user's batch: NOTE 9 of residency.py
                        self._left.append(entry)
                self.by_id[act.array] = None

    @property
    def in_optimizer(self) -> bool:
        """Whether the step stands inside an optimizer's step(), as the optimizers' hooks
        say (`_watch_optimizers`)."""
        return bool(self._optimizers)

    def raised_in_optimizer(self, exc: BaseException | None) -> bool:
        """Whether `exc` came out of an optimizer's step() (`OptimizerSteps`)."""
        return self._optimizers.raised_inside(exc)

    def _watch_optimizers(self) -> None:
        """Follow optimizer steps as the recorder does (`trace.recorder.op_phase`), from the
        step's start (an optimizer's pre-hook has run before a deviation inside its step
        can happen). After a deviation no op maps onto the record's, nor onto its
        phases: the phase InfeasibleBudget names and the advice it gives come from here
        (helper-80: Adam's update after a deviation in forward was called "forward",
        with "lower the batch"). The hooks go in `finish`."""
        steps = self._optimizers = OptimizerSteps()

        def began(*_):
            steps.begin()

        def returned(*_):
            steps.end()
        self._optimizer_hooks = [register_optimizer_step_pre_hook(began),
                                 register_optimizer_step_post_hook(returned)]

    def _pinned_but_moved(self, aid: int, entry) -> bool:
        """Whether array `aid` is bound to a storage that can never move (first met here:
        an optimizer state loaded with torch.load, a parameter from from_numpy; or carried
        state pinned since the plan was recorded) while the schedule moves it: the step
        then leaves the plan as `_check_pinned` says, since the plan's budget counted on
        moving it (else the replay ran over the budget, silently). Small storages are
        pinned in the recording too: the plan knows them."""
        return (entry.pinned and entry.nbytes >= self.res.min_move_bytes
                and aid in self.schedule.moved_arrays)

    def read_past(self, entry) -> None:
        """`entry` was just pinned: PyTorch reads it past the dispatcher (NOTE [Read past
        the dispatcher] in aten.py, a PackedSequence's batch_sizes built by hand). The
        recording counted it held (`SafeRecording.read_past`): where the plan does not
        move it, the step keeps its plan; where it does (`_pinned_but_moved`), it
        leaves the plan (`_check_pinned`)."""
        aid = self.aid_of.get(entry)
        if aid is None or not self._pinned_but_moved(aid, entry):
            self.res.newly_pinned = [e for e in self.res.newly_pinned if e is not entry]

    def _check_pinned(self) -> None:
        """A storage the plan moves became unmovable since it was recorded (Residency NOTE
        7: a `.numpy()` array of it kept across iterations, say), or was replaced by one
        that cannot move (`_pinned_but_moved`): the plan's budget no longer holds with it
        resident, so the step leaves the plan (on-demand keeps the budget, counting it
        pinned) and the next iteration is recorded again with it pinned."""
        pinned, self.res.newly_pinned = self.res.newly_pinned, []
        if pinned and self.deviation is None:
            nbytes = sum(e.nbytes for e in pinned)
            why = ("an asynchronous collective started between iterations holds them (they "
                   "stay in RAM for good: NOTE [Collectives in flight] rule 6 in "
                   "run/compose.py)" if any(e.owner == "collective" for e in pinned) else
                   "a numpy array from .numpy() still points into them (they move again "
                   "once it is dropped), or they were made unresizable (from_numpy, "
                   "torch.load) or shared (share_memory_()) since they were recorded "
                   "(those stay in RAM for good; weights assigned from a file loaded by "
                   "mapping, load_state_dict(assign=True) after torch.load(mmap=True), move "
                   "once outcore.integrations.make_movable(model, ooc) is called between "
                   "iterations)")
            self._deviate(f"function {self.index}: {count(len(pinned), 'storage')} of "
                          f"{format_bytes(nbytes)} that the plan moves cannot move now (those "
                          "met so far: the step leaves its plan at the first): "
                          f"{why}; counted as pinned", None, None, None)

    def _reap(self) -> None:
        """Storages the plan freed but something (a user variable, `param.grad`, autograd,
        a collective's thread about to let go) still holds at the next op: they linger
        beside the plan, counted like strangers, and are written out (synchronously) only
        where the planned bytes and they would pass the budget (`_make_room`), so the
        budget holds and nothing is lost. Most die within an op or two: writing each out
        at once cost a synchronous write that nothing read back (FSDP2's all-gather
        outputs: 3 MiB in some replays of examples/fsdp2.py)."""
        zombies, self._zombies = self._zombies, []
        alive = [e for e in zombies if e.ref() is not None and e.state is FAST]
        self._lingering += alive
        self._stranger_bytes += sum(e.nbytes for e in alive)

    def _keep_room(self, i: int) -> None:
        """Function i holds `_curve[i]` bytes by the plan: where the strangers and the
        lingering beside it would pass the budget, write some out (`_make_room`)."""
        if self._stranger_bytes and self._curve[i] + self._stranger_bytes > self.schedule.budget:
            self._make_room(self._curve[i])

    # -- small ops off the record (NOTE [Small ops off the record] in plans.py) ---------
    def _small(self, func, storages, op=None) -> bool:
        """Rule 1, as an op runs: it reads only storages of at most SMALL_OP_BYTES."""
        if (op if op is not None else self._op(func)).distributed:
            return False
        entry_of = self.res.entry_of
        for s in storages:
            entry = entry_of(s)
            if (entry.nbytes if entry is not None else s.nbytes()) > SMALL_OP_BYTES:
                return False
        return True

    def _skip_small(self, name, small: bool) -> bool:
        """Rule 4a: stand at the function an op named `name` (None: the end of the step)
        matches, from `index` on, past small functions only: one of its name, small or
        not for a small op (`small`), not small for another. Run the actions of those
        passed. False where none is reached."""
        j, n = self.index, self.n
        while j < n and not (self.op_names[j] == name and self.repeats[j] is None
                             and (small or not self.small[j])):
            if not self.small[j]:
                return False
            j += 1
        if j == n and name is not None:
            return False
        for k in range(self.index, j):
            if self._stranger_bytes:      # as `_one` does before a function's actions
                self._keep_room(k)
            self._actions(self.schedule.begin[k])
            self._actions(self.schedule.end[k])
        self.index = j
        return True

    def _unmatched(self, name) -> str:
        """Why an op named `name` matched no function from `index` on (rule 4)."""
        i = self.index
        if i >= self.n:
            return f"function {i}: expected the end of the step, the step ran {name}"
        if self.op_names[i] == name:
            return (f"function {i} ({name}): the record's op is small (it read and made "
                    f"{SMALL_OP_BYTES:,} B at most), the step's reads or may make more")
        return f"function {i}: expected {self.op_names[i]}, the step ran {name}"

    def _off_record(self, reason, func, args, kwargs, storages, small, larger=False):
        """The op does not match the function the step stands at: a small op (`small`:
        `_runs_small`) runs as it is (rule 4b), any other leaves the plan; `larger`: for
        being larger than the record's (rule 10 of NOTE [Step shapes]: `outgrew`), and
        where it was an array it reads, (its slot, its bytes)."""
        if small:
            self._spare_remakes(func, args, kwargs)
            return self._extra(func, args, kwargs, storages)
        if self._switch(self._name(func), larger, storages):
            return self._one(func, args, kwargs)
        self._larger = bool(larger)
        return self._deviate(reason, func, args, kwargs)

    def _small_grew(self, i, name, small) -> bool:
        """Rule 10: the op the record has at function i on small tensors, on larger ones."""
        return not small and i < self.n and name == self.op_names[i]

    # -- another plan of a shape this step turns out to have (NOTE [Step shapes] rule 9) ---
    def _switch(self, name, larger=False, storages=()) -> bool:
        """The step left its record at function k, before op `name` ran: where another
        plan's record ran the same first k functions on the same arrays and then `name`
        on the storages `name` reads (where that plan knows them), follow that plan from
        k on. `name` None: the step ended after k functions, and that plan's record ends
        there. Again later in the same step, at a later function only (so it ends).
        `larger`: it left at an array larger than the plan's (rule 10; `_off_record`)."""
        if (self._others is None or self.passive
                or self.switched_at is not None and self.index <= self.switched_at):
            return False
        k, old = self.index, self.by_id
        sizes = list(self.nbytes)       # those the step made (rule 10), freed ones too
        for aid, nbytes in self._sizes.items():
            sizes[aid] = nbytes
        for entry, aid in self.aid_of.items():
            sizes[aid] = entry.nbytes
        reads = [self.res.entry_of(s) for s in storages]
        found = self._others(self.keys[:k], self.expected[:k], sizes, name, larger,
                             (reads, old))
        if found is None:
            return False
        plan, ids, carried, lasting = found
        if self._zombies:
            self._reap()
        calls, held, kept, written = self._calls, self._held, self._kept, self._written_off
        self._take(plan.trace, plan.schedule, plan.keys)
        self._take_recomputes(calls, held, kept, written)
        self.by_id, self.aid_of = [None] * len(plan.trace.arrays), {}
        # The sizes the step ran, in this plan's ids, where they are not its (`shape`).
        self._sizes = {theirs: sizes[aid] for aid, theirs in ids.items()
                       if sizes[aid] != self.nbytes[theirs]}
        self.switched_at = k
        self.started_from = {}
        for aid, theirs in ids.items():      # the same ids (first access), remade ones paired
            if old[aid] is not None:
                self._bind(theirs, old[aid])
        for aid, entry in carried.items():   # state the step has not touched yet
            if self.by_id[aid] is None and entry not in self.aid_of:
                self._bind(aid, entry)
        for entry in old:       # a transfer the plan left started, for an array this one
            if entry is not None and entry not in self.aid_of:    # does not have: done now,
                if entry.state is IN:                             # a stranger from here
                    self.res.ready(entry)
                elif entry.state is OUT:
                    self.res.finish(entry)
        self._lasting, self._lingering = lasting, []
        self._reconcile(k)
        return True

    def _take_recomputes(self, calls, held, kept, written) -> None:
        """After a switch: the first k functions, their repeats included, are the same
        in both plans, so a call kept at function i is the call the new plan keeps
        there, if it recomputes from it; an array discarded is one it remakes, if it
        remakes it. What the new plan does not recompute is let go (its call) or made
        again now (its array, room made first)."""
        self._calls = {i: c for i, c in calls.items() if i in self._sources}
        self._kept = {y: c for y, c in kept.items() if y in self._twice}
        self._written_off = written
        for y, entry in held.items():
            if y in self._producer:
                self._held[y] = entry
            elif entry.state is DISCARDED and entry.ref() is not None:
                self._ready_off_plan(entry)

    def _reconcile(self, k: int) -> None:
        """Put the arrays where the plan switched to has them before function k: its
        actions up to there, replayed on paper, say which are in fast memory and which it
        is still writing out. What it has out is written out now (synchronously), what it
        is writing starts its write (its WAIT comes later), the rest of the fast memory is
        strangers' (`_make_room`), and what it has in comes back (waited for, as in
        `start`: a later DROP or SWAP_OUT passes over an array still being read). A
        read the plan left started and this one has out is waited for and dropped; a
        write it started that this one waited for already is waited for now."""
        sched, fns, res = self.schedule, self.trace.functions, self.res
        fast, writing = set(sched.resident_at_start), set()
        for i in range(k):
            for when, actions in ((0, sched.begin[i]), (1, sched.end[i])):
                if when:
                    fast.update(a.array for a in fns[i].accesses if a.kind == "create")
                for act in actions:
                    if act.kind == SWAP_IN:
                        fast.add(act.array)
                    elif act.kind == SWAP_OUT:
                        writing.add(act.array)
                    elif act.kind == WAIT:       # the last function's end waits too
                        fast.discard(act.array)
                        writing.discard(act.array)
                    else:                        # FREE, DROP
                        fast.discard(act.array)
        bound = [(aid, e) for aid, e in enumerate(self.by_id) if e is not None]
        out = [e for aid, e in bound if aid not in fast or aid in writing]
        for entry in out:
            if entry.state is IN:            # read in by the plan left: dropped once there
                res.ready(entry)
        for entry in out:
            res.evict(entry, unplanned=True)
        for entry in out:
            if self.aid_of[entry] not in writing:     # its WAIT is still to come
                res.finish(entry)
        self._find_strangers()
        if self._stranger_bytes:
            self._make_room(self._curve[k] if k < self.n else 0)
        coming = [e for aid, e in bound
                  if aid in fast and aid not in writing and e.state in (SLOW, OUT)]
        for entry in coming:
            res.restore(entry, unplanned=True)
        for entry in coming:    # as `start`: the plan's later moves of it find it FAST
            res.ready(entry)

    def _writes_beside_repeats(self, func, args, kwargs) -> bool:
        """Rule 8, after an op ran: in a plan that recomputes, an op off the record that
        wrote may have changed what a remake reads (its calls check their inputs'
        versions), too late to spare them (`_spare_remakes`)."""
        return bool(self._sources) and bool(written_tensors(func, args, kwargs))

    def _spare_remakes(self, func, args, kwargs) -> None:
        """Rule 8, before a small op off the record runs: in a plan that recomputes, no
        remake may see what it writes. A kept call, or a discarded array's remake, that
        reads a storage the op writes runs again on a copy of it taken now
        (`recompute.spare`); an array whose own storage the op writes is written out
        where the plan frees it instead of discarded (`_discard`). What the op writes is
        made ready first (its room made where it is discarded): its bytes are copied."""
        if not self._sources:
            return
        storages = distinct_storages(written_tensors(func, args, kwargs))
        if not storages:
            return
        res = self.res
        for storage in storages:
            entry = res.entry_of(storage)
            if entry is not None:
                self._ready_off_plan(entry)
            self._written_off[storage._cdata] = weakref.ref(storage)
        written = {s._cdata for s in storages}
        for calls in (list(self._calls.values()), *self._kept.values()):
            for call in calls:
                if call is not None:
                    recompute.spare(call, written)
        for entry in self._held.values():
            remake = entry.remake if entry.state is DISCARDED else None
            if remake is not None and entry.ref() is not None:
                remake.spare(written)

    def _runs_small(self, func, args, kwargs, storages, op=None) -> bool:
        """Rules 1 and 5, before the op runs: it reads only small storages, and its meta
        kernel does not say it makes a larger one (a factory: `torch.full((n,), 1.0)`),
        nor, unless the record has a small function of its name where the step stands,
        did an earlier call of its signature make one (rule 5: a rare MoE expert's
        `nonzero`, recorded small, is judged by its own call, helper-156; an op the
        record lacks there by what its signature made, whose room is made first,
        helper-158). `op`: `func`'s `_Op`, where the caller has it."""
        if op is None:
            op = self._op(func)
        if not self._small(func, storages, op):
            return False
        if op.nothing_new is None:
            op.nothing_new = makes_nothing_new(func)
            op.pointwise = torch.Tag.pointwise in func.tags
        if op.nothing_new:
            return True
        if op.pointwise:
            # `created_bytes` counts a pointwise op's output at its widest input dtype, room
            # to spare; here it is counted as PyTorch promotes (`_pointwise_width`).
            tensors = _tensors_read(func, args, kwargs)
            try:                # a strided nested tensor has no sizes: RuntimeError
                shape = broadcast_shape([t.shape for t in tensors])
            except RuntimeError:
                shape = None
            if shape is None:
                return False
            width = _pointwise_width(func, args, kwargs, tensors)
            return math.prod(shape) * width <= SMALL_OP_BYTES
        i = self.index
        recorded_small = i < self.n and self.small[i] and self.op_names[i] == op.name
        made = created_bytes(func, args, kwargs, learned=not recorded_small)
        return made is None or made <= SMALL_OP_BYTES

    def _extra(self, func, args, kwargs, storages):
        """Rule 4b: run a small op that the record does not have here, as it is; one that
        made a larger storage all the same leaves the plan after it ran (rule 5)."""
        res = self.res
        entries = [e for s in storages if (e := res.entry_of(s)) is not None]
        # The index stays while small ops run off the record, so the room for what they
        # make and leave beside the plan is kept before each, as before a function
        # (`_keep_room`): AdamW's first step, per parameter, ran some sixty small ops at
        # one index of a replay whose record had the later steps', and with
        # min_move_bytes=0 what they left passed the budget by 2 KiB (helper-209).
        # What the earlier ones made and still hold may be no stranger yet: the room is
        # measured on the managed bytes themselves, against the whole budget (pinned
        # storages are in them), as `_room_for_remake` measures it.
        # Not in a passive replay: it makes nothing ready, and an op that read what was
        # written out here read an empty storage (helper-211: a segmentation fault).
        over = res.resident + SMALL_OP_BYTES - self.budget
        if over > 0 and self._stranger_bytes and not self.passive:
            self._make_room(0, excess=over, keep=entries)
        for entry in entries:
            self._ready_off_plan(entry)         # a small activation may be discarded
        out = func(*args, **kwargs)
        note_read_past(func, out)       # NOTE [Read past the dispatcher] in aten.py
        mark_written(res, entries, written_tensors(func, args, kwargs))
        outputs = output_tensors(out)
        new = [s for s in distinct_storages(outputs) if s.nbytes() and res.entry_of(s) is None]
        large = [s.nbytes() for s in new if s.nbytes() > SMALL_OP_BYTES]
        if not large:
            for storage in new:
                res.track(storage)              # rule 6: counted (pinned) from here
                entry = res.entry_of(storage)
                if entry is not None and not entry.pinned and not self.passive:
                    self.linger(entry)          # movable: beside the plan, written out where
                                                # the budget needs its room
        else:
            name = self._name(func)
            self._deviate(f"function {self.index}: the step ran {name}, which the record does "
                          f"not have there, and it made {large} bytes", None, None, None)
            made = self._on_demand.after(entries, written_tensors(func, args, kwargs), outputs)
            self._ran_on_demand(name, [e.nbytes for e in made])
        return out

    def _ran_on_demand(self, name: str, sizes: list, small: bool = False,
                       read=None) -> None:
        """Note an op run after the deviation, which made storages of `sizes` bytes: in
        the step's shape unless it is small (rule 3), and for rule 10 in any case, with
        the bytes of each storage it `read` (its distinct input storages, in order, as
        the recorder numbers them; None where not known)."""
        if not small:
            self._ran.append((name, sum(sizes)))
        self._made.append(Ran(name, tuple(sizes), None if read is None else tuple(read), small))

    # -- leaving the plan ------------------------------------------------------------------
    def _deviate(self, reason, func, args, kwargs):
        self.deviation = reason
        self.log.deviation = (self.index, reason)
        if self.passive:
            self._track_followed()
        try:
            self._remake_held()
        finally:
            self.res.settle()        # no planned transfer is left half-done
        # NOTE [Far below the budget] rule 1: asked at the first op run on demand, once
        # the op that left the plan (if it ran) is counted.
        self._may_enter = True
        if func is None:
            return None
        return self._fallback(func, args, kwargs)

    def _leave_headroom(self, evict: bool = True) -> None:
        headroom, self._headroom = self._headroom, None
        headroom.leave(evict)

    def _track_followed(self) -> None:
        """A passive replay leaving its plan: track the storages it saw made that live
        (activations saved for backward), so that the rest of the step, run on demand,
        counts them against the budget and may move them; untracked, they were seen
        only when an op read them, and the step held more than it counted."""
        followed, self._followed = self._followed, []
        for ref in followed:
            storage = ref()
            if storage is not None and storage.nbytes():
                self.res.track(storage)

    def _fallback(self, func, args, kwargs):
        """Run an op of a step that left its record, op by op (OnDemand). An op that needs
        more than the budget at once runs all the same (the step is completed, correct,
        over the budget), and the iteration then raises InfeasibleBudget (OutOfCore._adopt)
        as a recording would have: before, such a step went over the budget silently,
        every time it came back. The error names the op of the rest of the step that
        needed the most, not the first over the budget: the step runs to its end anyway,
        and a user who took the first one's figure met the error again at the next op
        over it, in the same step. Far below the budget, the op runs with less work
        (NOTE [Far below the budget] in headroom.py)."""
        distributed = func.namespace in DISTRIBUTED_NAMESPACES
        if self._may_enter and not distributed:      # rule 5 (helper-124); `_dispatch`
            self._may_enter = False                  # leaves it before a collective
            self._headroom = Headroom.enter(self.res, self.budget, self.keys)
        if self._headroom is not None:
            ran = self._headroom.run(func, args, kwargs)
            if ran is not None:
                out, read, made, storages = ran
                self._fallen += 1
                self._ran_on_demand(self._name(func), made, read=read, small=not any(
                    n > SMALL_OP_BYTES for n in (*read, *made)))
                if self._headroom.over():
                    self._leave_headroom()
                    res = self.res
                    self._note_needed(func, args, kwargs, [
                        e for s in storages if (e := res.entry_of(s)) is not None], ())
                return out
            self._leave_headroom()           # rule 2
        out = self._on_demand.run(func, args, kwargs)
        self._fallen += 1
        entries, made = self._on_demand.last
        self._ran_on_demand(self._name(func), [e.nbytes for e in made], small=not (
            distributed or any(e.nbytes > SMALL_OP_BYTES for e in (*entries, *made))),
            read=[e.nbytes for e in entries])
        self._note_needed(func, args, kwargs, entries, made)
        return out

    def _note_needed(self, func, args, kwargs, entries, made) -> None:
        """An op run after the deviation that read `entries` and made `made` needed more
        than the budget, and more than any before it: noted to raise at the step's end
        (`_fallback`)."""
        movable, pinned = needed(self.res, entries, made)
        worst = self.budget if self.infeasible is None else self.infeasible.needed_bytes
        if movable + pinned > worst:
            phase = op_phase(self._optimizers, _tensors_read(func, args, kwargs))
            self.infeasible = infeasible(
                self.index + self._fallen - 1, f"{func}, run on demand", phase, movable,
                pinned, self.budget, self.res.min_move_bytes, deviated=True, res=self.res)

