"""Memory-safe execution without a plan: make an op's inputs resident before it runs and
evict the least recently used storages after it whenever the budget needs the room.

This is how the recording iteration runs (nothing is known about the future yet) and how
the rest of an iteration runs once it deviated from its plan. It never loses data: an
evicted storage is written out before its memory is released.
"""
from __future__ import annotations

import collections
import functools
import math

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_map

from ..errors import STOPPED, InfeasibleBudget
from ..units import exact_bytes, format_bytes
from ..states import FAST, OCCUPIES_FAST
from .residency import Residency
from ..aten import _PLAIN as _PLAIN_TENSORS
from ..aten import distinct_storages as storages
from ..aten import (broadcast_shape, byte_span, iter_tensors, made_outside, makes_nothing_new,
                    note_read_past, op_inputs, out_arguments, output_tensors, written_tensors)


_STRIDED = torch.strided


class OnDemand:
    def __init__(self, residency: Residency, budget: int):
        self.residency = residency
        self.budget = budget
        self._asked = None          # (func, args, kwargs, room left) between before and after
        self._alias_only = False    # ... and whether the op is a view of plain dense tensors
        self.last = ((), ())        # the last op's (entries, created): `needed` reads them

    def before(self, inputs, func, args=(), kwargs=None) -> list:
        """Make every input storage resident, with room left for what `func(*args,
        **kwargs)` will create (`room`); return their entries."""
        res = self.residency
        # One pass over the storages (every op passes here): the entries of those
        # tracked, None for those first seen here that hold bytes.
        looked = res.entries_of(storages(inputs))
        # A storage passed as one (`set_(source)`, as `copy.deepcopy` of a tensor calls it)
        # is among `inputs` (NOTE [Storage arguments] in aten.py): made resident like any,
        # and one made outside any op, in RAM already, is counted here.
        untracked = sum(s.nbytes() for s, entry in looked if entry is None)
        if untracked:
            # Storages first seen here (made before the step, or outside any op) were in
            # RAM all along: make their room before they are counted, so that the count
            # never passes the budget for memory that did not grow.
            res.evict_lru(self.budget - untracked, {s._cdata for s, _ in looked})
        entries = []
        for s, entry in looked:
            if entry is None:
                entry = res.track(s)
                if (res.adopting is not None and not entry.elsewhere
                        and not made_outside(s)):
                    res.adopting[entry.key] = entry.nbytes
            else:
                res.touch(entry)        # what `track` does for a tracked one
            entries.append(entry)
        incoming = sum(e.nbytes for e in entries if e.state not in OCCUPIES_FAST)
        keep = {e.key for e in entries}
        dense, plain = _argument_kinds(args, kwargs)
        made = room(func, entries, args, kwargs or {}, dense=dense)
        res.evict_lru(self.budget - incoming - made, keep)
        res.ready_all(entries)
        self._asked = (func, args, kwargs or {}, made)
        # A view of plain dense tensors makes no storage and writes none: nothing to do
        # after it (`run`). Not so on a sparse tensor (`t`, `transpose`, `unsqueeze`,
        # `select` make new indices and values: helper-119), nor through a subclass, nor
        # for a view op PyTorch would have decomposed (`_only_aliases`).
        self._alias_only = plain and _only_aliases(func)
        return entries

    def run(self, func, args, kwargs):
        """Run one op memory-safe: inputs resident before, budget restored after."""
        inputs = op_inputs(func, args, kwargs)     # NOTE [Storage arguments] in aten.py
        entries = self.before(inputs, func, args, kwargs)
        out = func(*args, **kwargs)
        note_read_past(func, out)       # NOTE [Read past the dispatcher] in aten.py
        if self._alias_only:
            # `before` left room for no output: nothing to track, mark or evict.
            self._asked = None
            self.last = (entries, [])
            return out
        self.last = (entries, self.after(entries, written_tensors(func, args, kwargs),
                                         output_tensors(out)))
        return out

    def after(self, entries, written, outputs) -> list:
        """Track the op's outputs, note what it wrote, and evict until within budget.
        Returns the entries of the storages the op created (not those it returned in place)."""
        res = self.residency
        mark_written(res, entries, written)
        seen = {e.key for e in entries}
        created = [res.track(s) for s in storages(outputs)
                   if s._cdata not in seen and (s.nbytes() or res.entry_of(s))]
        asked, self._asked = self._asked, None
        if asked is not None:
            func, args, kwargs, left = asked
            made = sum(e.nbytes for e in created)
            # Rare: the signature is hashed only then; and where it made less while some
            # op's room is scaled, whose line this may move (NOTE [Workspaces that scale]).
            if made > left or made < left and _SCALED:
                learn_created(func, args, kwargs, made, left)
        res.evict_lru(self.budget, set())
        return created


def mark_written(res: Residency, entries, written) -> None:
    """Note which of `entries` (None: untracked) the op wrote: those whose storage is one
    of the `written` tensors'."""
    if not written:
        return
    written_keys = {s._cdata for s in storages(written)}
    for e in entries:
        if e is not None and e.key in written_keys:
            res.mark_written(e)


def needed(res: Residency, entries, created) -> tuple[int, int]:
    """What an op that read `entries` and made `created` held at once: (bytes of its own
    movable storages, bytes pinned in fast memory beside them). More than the budget in
    all, and no schedule can run it (`infeasible`)."""
    movable = sum(e.nbytes for e in entries if not e.pinned) + sum(
        e.nbytes for e in created if not e.pinned)
    return movable, res.pinned_resident + (res.owned_bytes() if res.owned else 0)


def room(func, entries, args=(), kwargs=None, dense: bool | None = None) -> int:
    """Bytes to leave free before `func` runs for the storages it will create: none for
    an op that only writes its arguments or returns a view of one (`makes_nothing_new`:
    one that writes an argument and returns a new tensor too is asked); what its meta kernel
    says it creates (`created_bytes`) where that can be asked; else as much as its
    largest movable input (an elementwise op or a norm makes an output of about that
    size). Without room an op's outputs come on top of a full budget; with the largest
    input alone, an op whose output is larger (a convolution widening its channels, a
    matmul, a concatenation) still does. An op on a sparse tensor, in place or not, is
    left the bytes of all its inputs, those that never move too: its result holds as
    many entries as the data says (a sparse momentum buffer's `add_` takes the union of
    its indices and the gradient's, in new storages), at most what they hold together,
    and its storages under min_move_bytes stay in memory as they grow (leaving out the
    pinned inputs, a recording of tests/run/test_budget_errors.py's sparse momentum
    went 4 KiB over the budget); so is a view op on one (a sparse `t()`, `transpose`,
    `permute`, `unsqueeze` or `select` makes new indices and values: helper-119), but for
    those that return one of its parts (`_SPARSE_PARTS`); and at least what a dense
    result of its shape holds (`to_dense()`: helper-120, 1.3 MiB over a 12 MiB budget)
    or what the op made before with arguments of the same signature (`learn_created`:
    a meta kernel cannot be asked of sparse arguments). `dense`:
    `_argument_kinds(args, kwargs)[0]`, where known."""
    if dense is None:
        dense = _argument_kinds(args, kwargs)[0]
    if not dense:
        if func.is_view and func._schema.name in _SPARSE_PARTS:
            return 0
        return max(sum(e.nbytes for e in entries), _dense_result_bytes(func, args, kwargs),
                   _learned(func, args, kwargs or {}))
    if func.is_view:
        if _only_aliases(func):
            return 0
        # One PyTorch decomposes (`reshape`, `contiguous`, `to`: reaching the mode under
        # inference_mode) copies where it cannot alias: what its meta kernel makes, as
        # for any op (helper-121: left nothing, it passed the budget at every call).
        made = created_bytes(func, args, kwargs or {})
        return made if made is not None else max(
            (e.nbytes for e in entries if not e.pinned), default=0)
    if makes_nothing_new(func):
        # An `out=` tensor smaller than the result grows in place (helper-82: an empty
        # one, 0 to 256 KiB; helper-84: `sort`'s values and indices): what the meta
        # copies grow by.
        if kwargs and not out_arguments(func).isdisjoint(kwargs):
            return created_bytes(func, args, kwargs) or 0
        return 0
    made = created_bytes(func, args, kwargs or {})
    if made is not None:
        return made
    return max((e.nbytes for e in entries if not e.pinned), default=0)


def _arguments(args, kwargs):
    """The tensors among an op's arguments, as given (a sparse one stays sparse)."""
    for v in (*args, *(kwargs or {}).values()):
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (t for t in v if isinstance(t, torch.Tensor))


_IMPLICIT = torch._C.DispatchKey.CompositeImplicitAutograd
_ALIASES: dict = {}         # id(func) -> (func, `_only_aliases(func)`)


def _only_aliases(func) -> bool:
    """Whether `func` is a view op with a kernel of its own. A view op that PyTorch
    decomposes (CompositeImplicitAutograd: `reshape`, `to`, `pin_memory`) reaches a
    dispatch mode only where it was not decomposed, and copies where it cannot alias
    (helper-119 saw `to.dtype_layout` come so); its outputs are tracked like any op's."""
    known = _ALIASES.get(id(func))           # by id: an OpOverload hashes in Python
    if known is None:
        try:
            aliases = func.is_view and not func.has_kernel_for_dispatch_key(_IMPLICIT)
        except RuntimeError:                 # an op the dispatcher does not know
            aliases = False
        known = _ALIASES[id(func)] = (func, aliases)
    return known[1]


# Ops on a sparse or compressed tensor whose result is a dense tensor of its shape and
# dtype (`Tensor.to_dense()` calls `_to_dense`), and products whose result is dense with
# a shape that follows from the arguments' shapes alone (`S @ D`, `torch.sparse.mm`).
_TO_DENSE = frozenset({"aten::_to_dense", "aten::to_dense"})
_DENSE_PRODUCTS = frozenset({"aten::mm", "aten::addmm", "aten::_sparse_mm",
                             "aten::_sparse_addmm", "aten::bmm"})


def _dense_result_bytes(func, args, kwargs=None) -> int:
    """Bytes of the dense result of `to_dense()` of `args[0]`, or of a product of
    `_DENSE_PRODUCTS` (its meta kernel asked of dense meta stand-ins of the sparse
    arguments: the result's shape follows from theirs); 0 for any other op or where
    that cannot be asked."""
    name = func._schema.name
    if name in _TO_DENSE:
        if not args or not isinstance(args[0], torch.Tensor):
            return 0
        return args[0].numel() * args[0].element_size()
    if name not in _DENSE_PRODUCTS:
        return 0

    def stand_in(x):
        if isinstance(x, torch.Tensor):
            return torch.empty(x.shape, dtype=x.dtype, device="meta")
        return x
    try:
        with _disable_current_modes():
            margs, mkwargs = tree_map(stand_in, (args, kwargs or {}))
            out = func(*margs, **mkwargs)
    except Exception:           # an overload the stand-ins do not fit
        return 0
    return sum(t.numel() * t.element_size() for t in output_tensors(out))


def _learned(func, args, kwargs) -> int:
    """What `func` made before with arguments of this signature (`learn_created`), without
    asking a meta kernel; 0 where nothing is known."""
    try:
        key = (func, _signature(args), _signature(kwargs))
    except _Unhashable:
        return 0
    return max(_CREATED.get(key) or 0, _LEARNED.get(key, 0))


# View ops of a sparse tensor that return one of its parts as it is: no new storage.
_SPARSE_PARTS = frozenset(f"aten::{name}" for name in (
    "_values", "_indices", "values", "indices", "crow_indices", "col_indices",
    "ccol_indices", "row_indices"))


def _argument_kinds(args, kwargs) -> tuple[bool, bool]:
    """(every tensor argument is dense: strided, not nested; every one is besides a plain
    tensor, no subclass), in one pass over them."""
    plain = True
    for t in _arguments(args, kwargs):
        if t.layout is not _STRIDED or t.is_nested:
            return False, False
        if plain and type(t) not in _PLAIN_TENSORS:
            plain = False
    return True, plain


def _meta(x):
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device="meta")
    return x


@functools.lru_cache(maxsize=None)
def _takes_device(func) -> bool:
    """Whether `func` has a keyword `device` argument: a factory, which called without
    one makes CPU tensors (and a random one would draw from the default generator)."""
    return any(arg.name == "device" and arg.kwarg_only for arg in func._schema.arguments)


def _meta_or_none(x):
    """`_meta`, and no generator (a meta kernel draws nothing: `_created_bytes`)."""
    return None if isinstance(x, torch.Generator) else _meta(x)


# What `created_bytes` found, per op and argument signature (`_signature`). The same
# few hundred signatures come back every iteration, and some meta kernels are Python
# decompositions that cost more than the op (native_batch_norm_backward: about 11 ms a
# call on this machine). Bounded: emptied when full.
_CREATED: dict = {}
_CREATED_MAX = 8192
# What an op made beyond that, per signature (`learn_created`): the most of any call.
_LEARNED: dict = {}
# NOTE [Workspaces that scale]
# 1. An op whose meta kernel under-reports (mkldnn_rnn_layer's says 0 bytes for an LSTM's
#    workspace output: about 90 MiB at batch 64, length 64, hidden 384) is learned per
#    signature (`_LEARNED`), sizes included: a step of another sequence length is another
#    signature, and each new length passed the budget by its workspaces again (helper-161:
#    a 2-layer bidirectional LSTM at lengths 40 to 96, up to 176 MiB over a budget of
#    374 MiB, at every step but the first).
# 2. So what a call made beyond its meta kernel's answer is also kept beside the bytes of
#    its first tensor argument (the input), per signature without the sizes that vary
#    (`_scaled_key`: each tensor's dtype, rank and last size, the features, which tell the
#    layers apart; plain arguments by value): of the call with the smallest input and of
#    the one with the largest. A call of a signature not learned gets the meta kernel's
#    answer and what the line through those two gives at its own input (a fixed part and
#    a part per byte; through zero while one size is known): a workspace that grows with
#    the length and the batch, as oneDNN's does, gets its room before the op runs. (The
#    most per byte of any call, first, gave a step after one of batch 1 and length 2,
#    mostly the fixed part, 1.5 times its budget of room for the op: helper-163.)
# 3. Only where the meta kernel gave a number: an op whose output the data decides
#    (`nonzero`) has no answer to scale, and is judged as before (NOTE [Small ops off the
#    record] rule 5 in plans.py).
# 4. A guess: where the line is not the op's (one size known; extra bytes that grow
#    faster than the input), a call gets more room than it needs (evictions earlier than
#    needed) or less (over the budget by the difference, once: its signature is learned
#    then, and the line moves to it); never less than its own signature learned.
_SCALED: dict = {}
# The last calls that made more than the room they were given (their meta kernel's answer
# and what was learned), as (serial number, op, bytes beyond): an iteration over the
# budget names them (OutOfCore's warning, the report's row).
UNDER_REPORTED: collections.deque = collections.deque(maxlen=8)


def _under_reported(op: str, beyond: int) -> None:
    """Note a call that made `beyond` bytes more than the room it was given."""
    serial = UNDER_REPORTED[-1][0] + 1 if UNDER_REPORTED else 1
    UNDER_REPORTED.append((serial, op, beyond))


def under_reported_since(serial: int) -> tuple[int, list]:
    """(the last serial number, the calls of `UNDER_REPORTED` after `serial`)."""
    last = UNDER_REPORTED[-1][0] if UNDER_REPORTED else 0
    return last, [(op, beyond) for n, op, beyond in UNDER_REPORTED if n > serial]


class _Unhashable(Exception):
    pass


# Arguments other than tensors that a signature holds by value: plain values only, so
# that the cache never keeps an object (a generator, a process group) alive.
_PLAIN = (int, float, bool, complex, str, type(None), torch.dtype, torch.device, torch.layout,
          torch.memory_format)


def _sized(t: torch.Tensor) -> tuple:
    """A tensor as a meta kernel sees it: type, layout, dtype, sizes and strides (the
    meta copy keeps nothing else: `_meta`)."""
    layout = t.layout
    return (type(t), layout, t.dtype, t.shape, t.stride() if layout is _STRIDED else None)


def _unsized(t: torch.Tensor) -> tuple:
    """A tensor without the sizes that vary from step to step: type, layout, dtype, rank
    and last size (the features: a sequence's length and the batch come first; NOTE
    [Workspaces that scale])."""
    return (type(t), t.layout, t.dtype, t.dim(), t.shape[-1] if t.dim() else None)


def _signature(x, tensor=_sized):
    """What a meta kernel can see of `x`: each tensor as `tensor` gives it (`_sized`, or
    `_unsized` for `_scaled_key`), a plain argument's value. Raises _Unhashable for
    anything else. Every op run on demand asks for one (about a microsecond per
    argument): list comprehensions rather than generators, and sizes kept as
    `torch.Size` (a tuple: it hashes and compares as one)."""
    if isinstance(x, torch.Tensor):
        if x.is_nested:             # no sizes to ask (raises "doesn't support sizes")
            raise _Unhashable
        return tensor(x)
    if isinstance(x, (list, tuple)):
        return (type(x), *[_signature(y, tensor) for y in x])
    if isinstance(x, dict):
        return tuple([(k, _signature(v, tensor)) for k, v in x.items()])
    if isinstance(x, _PLAIN):
        return (type(x), x)
    if isinstance(x, torch.Generator):     # its state draws values, never sizes
        return torch.Generator
    raise _Unhashable


def created_bytes(func, args, kwargs, learned: bool = True) -> int | None:
    """`_created_bytes`, remembered per op and argument signature: the answer depends on
    nothing else; with `learned`, raised to the most a call of the signature made
    (`learn_created`). Without, the meta kernel's answer alone: what this call makes,
    where None means the data decides (`Replayer._runs_small`: a nonzero of a rare MoE
    expert's mask, of a signature whose other calls made more, was judged by those, and
    a step of that shape left its plan at every replay; helper-156)."""
    if func.namespace != "aten":
        return None
    try:
        key = (func, _signature(args), _signature(kwargs))
    except _Unhashable:
        return _created_bytes(func, args, kwargs)
    if key not in _CREATED:
        if len(_CREATED) >= _CREATED_MAX:
            _CREATED.clear()
            _LEARNED.clear()
            _SCALED.clear()
        _CREATED[key] = _created_bytes(func, args, kwargs)
    made = _CREATED[key]
    more = _LEARNED.get(key) if learned else None
    if more is None and learned and _SCALED and made is not None:
        more = _scaled(func, args, kwargs, made)
    return made if more is None or (made is not None and made >= more) else more


def learn_created(func, args, kwargs, made: int, room: int | None = None) -> None:
    """After the op ran: where it made more than `created_bytes` said (a meta kernel that
    under-reports, as mkldnn_rnn_layer's says 0 bytes for a workspace output of
    megabytes, or none at all), remember what it made, so that the next call with the
    same signature gets its room. The first such call went over the budget by the
    difference; the later ones do not. One with no meta kernel at all, given `room`
    (its largest input's bytes), that made more is named too (UNDER_REPORTED: helper-212,
    wav2vec2's `_ctc_loss.Tensor`, 16 KiB over a recording with no op named)."""
    if func.namespace != "aten" or makes_nothing_new(func):
        return
    try:
        key = (func, _signature(args), _signature(kwargs))
    except _Unhashable:
        return
    said = _CREATED.get(key)
    if said is None and room is not None and made > room and key not in _LEARNED:
        _under_reported(str(func), made - room)
    if said is not None and made > said:
        got = max(said, _LEARNED[key] if key in _LEARNED       # the room created_bytes gave
                  else _scaled(func, args, kwargs, said) or 0)
        if made > got:
            _under_reported(str(func), made - got)
        _learn_scaled(func, args, kwargs, made - said)
    if made > max(said or 0, _LEARNED.get(key, 0)):
        if len(_LEARNED) >= _CREATED_MAX and key not in _LEARNED:
            _LEARNED.clear()
        _LEARNED[key] = made


def _scaled_key(func, args, kwargs):
    """NOTE [Workspaces that scale] rule 2: the signature without the sizes that vary;
    None where there is none (`_Unhashable`)."""
    try:
        return (func, _signature(args, _unsized), _signature(kwargs, _unsized))
    except _Unhashable:
        return None


def _first_bytes(args) -> int:
    first = next(iter_tensors(args), None)
    return 0 if first is None else first.numel() * first.element_size()


def _learn_scaled(func, args, kwargs, beyond: int) -> None:
    """NOTE [Workspaces that scale] rule 2: remember `beyond`, what a call made past its
    meta kernel's answer, beside its first tensor argument's bytes: of the calls of its
    kind, the one with the smallest such argument and the one with the largest (the most
    beyond, of calls with equal arguments)."""
    first = _first_bytes(args)
    key = _scaled_key(func, args, kwargs) if first else None
    if key is None:
        return
    low, high = _SCALED.get(key, ((first, beyond), (first, beyond)))
    if first < low[0] or first == low[0] and beyond > low[1]:
        low = (first, beyond)
    if first > high[0] or first == high[0] and beyond > high[1]:
        high = (first, beyond)
    if len(_SCALED) >= _CREATED_MAX and key not in _SCALED:
        _SCALED.clear()
    _SCALED[key] = (low, high)


def _scaled(func, args, kwargs, said: int) -> int | None:
    """NOTE [Workspaces that scale] rule 2: the meta kernel's answer `said` and what calls
    of this signature's kind made past theirs, at this call's first argument: on the
    line through the smallest and the largest such call (a fixed part and a part per
    byte), through zero where one size was seen, never below zero; None where none was."""
    key = _scaled_key(func, args, kwargs)
    known = None if key is None else _SCALED.get(key)
    if known is None:
        return None
    (lo, lo_beyond), (hi, hi_beyond) = known
    first = _first_bytes(args)
    if hi == lo:
        beyond = hi_beyond * first / hi
    else:
        beyond = lo_beyond + (hi_beyond - lo_beyond) * (first - lo) / (hi - lo)
    return said + max(0, math.ceil(beyond))


def _created_bytes(func, args, kwargs) -> int | None:
    """Bytes of the storages `func(*args, **kwargs)` will create, from its meta kernel
    run on meta copies of the tensor arguments (shapes, strides and dtypes only: no
    data is read or written, no memory taken). None where that cannot be asked: an op
    outside aten, one without a meta kernel, one whose output shape depends on the
    data (nonzero), an argument that is no plain dense tensor. A factory's `device` is
    made meta too (and `pin_memory` off), so that `zeros` or `full` fill nothing. An op
    that draws random numbers (randn, dropout) gets no generator (meta kernels draw
    nothing; checked: the CPU generator's state is compared around the call and put
    back, with None returned, should one ever draw). The call runs with every dispatch
    mode set aside, so no mode (outcore's own included) sees the meta tensors."""
    if func.namespace != "aten":
        return None
    if torch.Tag.nondeterministic_seeded in func.tags:
        state = torch.random.get_rng_state()
        try:
            made = _created_bytes_unseeded(func, args, kwargs)
        finally:
            if not torch.equal(state, torch.random.get_rng_state()):
                torch.random.set_rng_state(state)
                made = None
        return made
    return _created_bytes_unseeded(func, args, kwargs)


def _created_bytes_unseeded(func, args, kwargs) -> int | None:
    if torch.Tag.pointwise in func.tags and out_arguments(func).isdisjoint(kwargs):
        # One output of the arguments' broadcast shape, dense, of the widest dtype among
        # them, 0-dim ones included (`where(mask, x, y)` with a bool mask and 0-dim x, y
        # makes floats: counted as bytes, it went over): what their meta kernels say,
        # without running their (slow) Python references.
        every = list(iter_tensors(args)) + list(iter_tensors(kwargs.values()))
        tensors = [t for t in every if t.dim()]
        return _broadcast_bytes(tensors, every) if tensors else None
    try:
        with _disable_current_modes():
            margs, mkwargs = tree_map(_meta_or_none, (args, kwargs))
            if "device" in mkwargs or _takes_device(func):      # given or not
                mkwargs["device"] = torch.device("meta")
            if mkwargs.get("pin_memory"):
                mkwargs["pin_memory"] = False
            given = [(s, s.nbytes()) for s in storages(iter_tensors((*margs, *mkwargs.values())))]
            out = func(*margs, **mkwargs)
    except Exception:           # no meta kernel, data-dependent shape, exotic tensor
        return _grouped_mm_bytes(func, args, kwargs) if func in _GROUPED_MM else \
            _ctc_loss_bytes(func, args, kwargs)
    outputs = output_tensors(out)
    if any(t.device.type != "meta" for t in outputs):
        return None
    # An op that writes an argument returns it too at times (beside a new output): the
    # meta copy given is no storage made, but what it grew by is (an `out=` argument,
    # returned or not: `_foreach_add.List_out` returns nothing).
    known = {s._cdata for s, _ in given}
    made = sum(s.nbytes() for s in storages(outputs) if s._cdata not in known)
    made += sum(max(0, s.nbytes() - before) for s, before in given)
    if func in _LOSSES_KEEPING_THEIR_BUFFER:
        pair = [t for t in args[:2] if isinstance(t, torch.Tensor)]
        if len(pair) == 2:
            made = max(made, _broadcast_bytes(pair, pair) or 0)
    return made


def _grouped_mm_bytes(func, args, kwargs) -> int | None:
    """`_grouped_mm`'s output bytes where its meta kernel refuses the dtype: torch 2.13's
    asks for bfloat16 inputs (as CUDA's kernel does), while the CPU kernel takes float32
    too (transformers 5's MoE experts call it so). Its output shape depends on the shapes
    alone: asked of bfloat16 meta copies, counted at the output's real dtype."""
    if func not in _GROUPED_MM or len(args) < 2:
        return None
    a, b = args[0], args[1]
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or not (
            a.is_floating_point() and b.is_floating_point()):
        return None
    # (self, mat2, offs, bias, out_dtype): inside a dispatch mode all may come positional.
    out_dtype = kwargs.get("out_dtype") or (args[4] if len(args) > 4 else None) or a.dtype
    args = args[:4]
    try:
        with _disable_current_modes():
            def bf16(x):
                if isinstance(x, torch.Tensor) and x.is_floating_point():
                    return torch.empty_strided(x.size(), x.stride(), dtype=torch.bfloat16,
                                               device="meta")
                return _meta_or_none(x)
            margs, mkwargs = tree_map(bf16, (args, kwargs))
            mkwargs.pop("out_dtype", None)
            out = func(*margs, **mkwargs)
    except Exception:
        return None
    return sum(t.numel() for t in output_tensors(out)) * out_dtype.itemsize


def _ctc_loss_bytes(func, args, kwargs) -> int | None:
    """`_ctc_loss.Tensor`'s output bytes: that overload (lengths as tensors, as
    `F.ctc_loss` calls it with tensor lengths: transformers' CTC heads) has no meta
    kernel, and its log_alpha is larger than its largest input where the targets are
    long (helper-212: wav2vec2's recording 16 KiB over the budget). The overload with
    lengths as lists has one: asked with the lengths' values (small CPU tensors), where
    they are in memory (this is asked before the op's inputs are made ready: one on the
    slow tier, min_move_bytes=0, has no bytes to read)."""
    if func is not _CTC_LOSS_TENSOR or len(args) < 4:
        return None
    lengths = args[2:4]
    if not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_contiguous()
               and t.untyped_storage().nbytes() >= (t.storage_offset() + t.numel())
               * t.element_size() for t in lengths):
        return None
    try:
        with _disable_current_modes():
            lengths = [t.tolist() for t in lengths]
            margs, mkwargs = tree_map(_meta_or_none, (args[:2] + args[4:], kwargs))
            out = torch.ops.aten._ctc_loss.default(*margs[:2], *lengths, *margs[2:],
                                                   **mkwargs)
    except Exception:
        return None
    return sum(t.numel() * t.element_size() for t in output_tensors(out))


_CTC_LOSS_TENSOR = getattr(torch.ops.aten._ctc_loss, "Tensor", None)
_GROUPED_MM_PACKET = getattr(torch.ops.aten, "_grouped_mm", None)      # torch 2.8 on
_GROUPED_MM = frozenset(getattr(_GROUPED_MM_PACKET, o) for o in _GROUPED_MM_PACKET.overloads()
                        ) if _GROUPED_MM_PACKET is not None else frozenset()


def _broadcast_bytes(shaped, typed) -> int | None:
    """Bytes of one dense tensor of `shaped`'s broadcast shape at the widest dtype among
    `typed`; None where the shapes do not broadcast."""
    try:                        # a strided nested tensor has no sizes: RuntimeError
        shape = broadcast_shape([t.shape for t in shaped])
    except RuntimeError:
        shape = None
    if shape is None:
        return None
    return math.prod(shape) * max(t.element_size() for t in typed)


# Losses whose kernels return the reduced loss as a 0-dim view of the elementwise losses'
# buffer (as large as the input), where the meta kernel reports the 0-dim result: seen
# with torch 2.13 on CPU (tests/run/test_budget_errors.py checks each). Without this, an
# op-by-op step met them over the budget by that buffer, the first time each shape came.
_LOSSES_KEEPING_THEIR_BUFFER = frozenset(
    getattr(torch.ops.aten, name).default
    for name in ("mse_loss", "smooth_l1_loss", "binary_cross_entropy", "soft_margin_loss"))


def read_in_part(inputs, needed: int, res: Residency | None = None):
    """The storage of `inputs` that holds at least half of `needed` bytes while the op
    reads less than half of it, through views (a batch sliced from a dataset held in one
    tensor), as (its bytes, the largest view's shape); None if there is none. Sizes are
    the residency's where it tracks the storage (one on the slow tier reads 0 bytes)."""
    spans: dict = {}
    for t in inputs:
        if t.is_nested:         # no sizes to ask ("NestedTensorImpl doesn't support sizes")
            continue
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue
        span = byte_span(t)[1] if t.numel() else 0
        key = storage._cdata
        entry = res.entry_of(storage) if res is not None else None
        old = spans.get(key)
        if old is None or span > old[1]:
            spans[key] = (entry.nbytes if entry is not None else storage.nbytes(), span,
                          tuple(t.shape))
    for nbytes, span, shape in spans.values():
        if 2 * nbytes >= needed and 2 * span < nbytes:
            return nbytes, shape
    return None


# Why storages never move (Residency NOTE 7), and what the user can do about each, in the
# order the budget error lists them.
_NEVER_MOVES = {
    "unresizable": "not resizable (from_numpy, a .numpy() taken while no OutOfCore was "
                   "open, torch.load: .clone() those, take .numpy() inside the "
                   "OutOfCore, or torch.load between iterations; a model loaded by "
                   "mapping its file, from_pretrained or "
                   "torch.load(mmap=True) with assign=True: outcore.integrations."
                   "make_movable(model, ooc) between iterations, before the first "
                   "that uses those weights (weights an iteration has used as loaded "
                   "stay so for that OutOfCore's life: it says so); "
                   "optimizer state loaded with torch.load, by load_state_dict "
                   "or accelerate's load_state: outcore.integrations.make_movable("
                   "optimizer, ooc) after loading)",
    "shared": "in shared memory (share_memory_(), model.share_memory(), tensors from "
              "DataLoader workers or torch.multiprocessing, a model passed to a spawned "
              "Process or through a Queue, which shares its parameters: .clone() those "
              "tensors, and send another process a copy, copy.deepcopy(model) or its "
              "state_dict's tensors .clone()d)",
    "exported": "with a numpy array over them alive (.numpy() inside the OutOfCore: "
                "drop the arrays, or take them of a .clone())",
    "owned": "held by {owner}",
    "read": "read by PyTorch in C++ past the dispatcher (a PackedSequence's batch_sizes, "
            "8 bytes per time step; a strided nested tensor's sizes, strides and offsets: "
            "NOTE [Read past the dispatcher] in outcore/aten.py)",
    "small": "under min_move_bytes",
    "other": "pinned for the rest of this iteration (a numpy array over them died since; "
             "they move again from the next iteration)",
}


# `Entry.owner` (Residency.disown) in the error's words.
_OWNERS = {"collective": "a collective", "resized by another library":
           "another library, which resizes them itself"}


def _never_moves(res: Residency) -> dict[str, tuple[int, int]]:
    """{reason: (storages, bytes)} of the resident storages that never move, by why
    (`_NEVER_MOVES`): what the budget error lists so that a user finds theirs. "small"
    holds those a lower min_move_bytes would let move (not shared, exported or
    unresizable too), which the error's advice weighs."""
    from ..aten import read_past
    from .mapped import in_private_file_mappings, private_file_spans
    from .sharing import exported
    out: dict[str, tuple[int, int]] = {}
    spans = None
    owners: set = set()
    for e in list(res.entries.values()):
        if not ((e.pinned or e.owner) and e.state is FAST and not e.elsewhere):
            continue
        storage = e.ref()
        if storage is None:
            continue
        # Shared before unresizable: a DataLoader worker's batch is both, and its
        # advice is the shared one's (helper-153). A private mapping of a file
        # (`UntypedStorage.from_file(shared=False)`) says is_shared() too, and is
        # unresizable's (helper-155).
        shared = storage.device.type == "cpu" and storage.is_shared()
        if shared and not storage.resizable():
            if spans is None:
                spans = private_file_spans()      # read once, where it matters
            shared = not in_private_file_mappings(storage.data_ptr(), storage.nbytes(), spans)
        reason = ("owned" if e.owner else "shared" if shared
                  else "unresizable" if not storage.resizable()
                  else "exported" if exported(storage)
                  else "read" if read_past(storage)
                  else "small" if e.nbytes < res.min_move_bytes else "other")
        if e.owner:
            owners.add(_OWNERS.get(e.owner, e.owner))
        count, nbytes = out.get(reason, (0, 0))
        out[reason] = (count + 1, nbytes + (storage.nbytes() if e.foreign else e.nbytes))
    if "owned" in out:
        out["owned"] += (" or ".join(sorted(owners)),)
    return out


def _never_moves_text(found: dict, min_move_bytes: int) -> str:
    """The budget error's words on the arrays that never move: by reason (`found`, of
    `_never_moves`) where known, else every reason."""
    if not found:
        return ("under min_move_bytes={:,}, {}, {}, {} or {}".format(
            min_move_bytes, _NEVER_MOVES["unresizable"], _NEVER_MOVES["shared"],
            _NEVER_MOVES["exported"], _NEVER_MOVES["owned"].format(owner="a collective or FSDP")))
    parts = []
    for reason, words in _NEVER_MOVES.items():
        if reason in found:
            count, nbytes, *owner = found[reason]
            if reason == "small":
                words = f"under min_move_bytes={min_move_bytes:,}"
            elif reason == "owned":
                words = words.format(owner=owner[0])
            parts.append(f"{format_bytes(nbytes)} in {count:,} "
                         f"{'storage' if count == 1 else 'storages'} {words}")
    return "; ".join(parts)


def infeasible(index: int, what: str, phase: str, movable: int, pinned: int, budget: int,
               min_move_bytes: int, *, completed: bool = False,
               deviated: bool = False, inputs=(), res: Residency | None = None,
               wrote: int = 0) -> InfeasibleBudget:
    """The error for a function that cannot fit: it needs `movable` bytes of its own
    arrays at once beside `pinned` bytes of arrays that never move. `completed`: the
    optimizer had begun, so the step was finished (over budget) before raising.
    `deviated`: found in the part of a replayed step that left its record and ran op by
    op, raised once that step had completed (over budget). Both run on to the step's end:
    their callers keep the error of the op that needed the most, which the text says.
    `inputs`: the op's tensor arguments (a view op's outputs), for a storage it reads
    only in part (`read_in_part`). `wrote`: how many tensors that existed before the
    step it had written in place before this (BatchNorm's running statistics, a weight
    average, gradients accumulated into): "nothing was trained" would not be true of
    those (helper-125: a retry of the batch updated them twice)."""
    needed = movable + pinned
    try:                # made while an error is made: never one of its own
        found = _never_moves(res) if pinned and res is not None else {}
    except Exception:
        found = {}
    held = (f" ({format_bytes(movable)} of its own arrays beside {format_bytes(pinned)} of "
            f"arrays that never move: {_never_moves_text(found, min_move_bytes)})"
            if pinned else "")
    try:                # as `found`: an error of its own would hide this one
        part = read_in_part(inputs, needed, res)
    except Exception:
        part = None
    small = found.get("small", (0, 0))[1]    # what a lower min_move_bytes would let move
    smaller = (f"lower min_move_bytes (OutOfCore(min_move_bytes=...); {min_move_bytes:,} B now): "
               f"storages smaller than it never move and hold {format_bytes(small)} of that "
               "figure here; a step of smaller tensors (shorter sequences, a smaller batch) "
               "has more of its arrays under it than a larger one and can need more"
               if 4 * small >= needed else "lower the batch" if phase != "optimizer"
               else "keep fewer tensors alive beside the optimizer step")
    what_to_do = (
        f"most of that is one tensor's storage of {format_bytes(part[0])} that the step reads "
        f"only in part, through a view (of shape {list(part[1])}): outcore counts and moves a "
        "storage whole. A batch sliced from a dataset held in one tensor is the usual case: "
        "take the batch as a copy before the iteration (xb = X[i:j].clone() outside "
        "`with ooc.iteration():`), so that the step reads only the copy; a table the model "
        "slices itself (a positional encoding registered as a buffer) moves whole too. Or "
        f"raise the budget to at least {exact_bytes(needed)}") if part else (
        f"the smallest feasible budget is at least {exact_bytes(needed)}: raise "
        f"the budget to that or more, or {smaller} (for the whole step's figure at once, "
        "record one step with outcore.record(), on the meta device if it does not fit, and "
        "pass its trace to outcore.smallest_budget())")
    error = InfeasibleBudget(
        f"function {index} ({what}, {phase}) needs {exact_bytes(needed)} resident "
        f"at once{held}, more than the budget of {exact_bytes(budget)} you passed; "
        f"no schedule can run it: {what_to_do}. "
        + ("This iteration had left its recorded step (a step that differs from the recorded "
           "one, such as one that calls optimizer.step() only every few iterations) and ran "
           "op by op; it was completed correctly, over the budget, and no later op of it "
           "needed more than this one; " + STOPPED
           if deviated else
           "The optimizer step had begun (its state or the parameters had changed) when this "
           "was found, so the step was completed correctly, over the budget, and no later op "
           "of it needed more than this one; " + STOPPED
           if completed else
           f"The optimizer has not changed any parameter in this iteration, but the step "
           f"had written {wrote} tensor{'s' if wrote > 1 else ''} that existed before it in "
           "place (BatchNorm's running statistics, a weight average or a momentum encoder "
           "the step updates, gradients zeroed or accumulated into): running this batch "
           "again from here may not match one plain step of it (statistics and averages "
           "update twice, gradients accumulated into keep this step's part). Go on with "
           "the next batch, or from your last checkpoint, once the budget is raised."
           if wrote else "Nothing was trained in this iteration: the optimizer has not "
           "changed any parameter in it, and the step wrote no tensor that existed "
           "before it.")
        + (" The gradients its backward computed are on the parameters: zero them "
           "(optimizer.zero_grad()) before running this batch again."
           if phase == "optimizer" and not (completed or deviated) else ""),
        function_index=index, op=what, phase=phase, needed_bytes=needed, budget_bytes=budget,
        min_feasible_bytes=needed)
    # The optimizer changed nothing (OutOfCore adds no half-step note); `wrote`: tensors
    # that existed before the step, written in it before the error.
    error.nothing_trained = not (completed or deviated)
    error.wrote_before = 0 if completed or deviated else wrote
    return error
