"""What outcore needs to know about aten ops: which arguments an op writes, and how to
split a multi-tensor `_foreach_*` op into one call per tensor.

Splitting matters because a `_foreach_*` kernel touches every parameter (and its
optimizer state) at once; one function per tensor lets later stages keep only one
tensor's share resident. A split call is the same op on one-element lists: the same
kernel on the same values. Not the plain op: on CUDA the multi-tensor kernels round
differently from the plain ones (`_foreach_div_` by a scalar divides, `div_` by a CPU
scalar multiplies by its reciprocal), so Adam with foreach split into plain ops was not
bitwise on an H200 (docs/gpu-check.md); on the CPU a foreach op runs the plain op per
tensor, and splitting either way is bitwise (tests/trace/test_foreach.py).
"""
from __future__ import annotations

import contextlib
import functools
import sys
import threading
import weakref
from typing import Callable, Iterator, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

aten = torch.ops.aten

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _leaves(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """A tensor, or the plain tensors inside a wrapper subclass (DTensor, FSDP2's sharded
    parameters): a wrapper has no memory of its own (its storage has no data), and the
    op on it runs on its inner tensors where no dispatch mode sees it, so outcore must
    see those instead."""
    if type(t) in _PLAIN or not is_traceable_wrapper_subclass(t):
        yield t
        return
    names, _ = t.__tensor_flatten__()
    for name in names:
        inner = getattr(t, name)
        if isinstance(inner, torch.Tensor):
            yield from _leaves(inner)


_STRIDED = torch.strided
_COMPRESSED = {torch.sparse_csr: ("crow_indices", "col_indices"),
               torch.sparse_bsr: ("crow_indices", "col_indices"),
               torch.sparse_csc: ("ccol_indices", "row_indices"),
               torch.sparse_bsc: ("ccol_indices", "row_indices")}


def _parts(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The dense tensors a sparse tensor keeps its data in (indices and values), which
    have storages where the sparse tensor has none. An op on the sparse tensor reads or
    writes them where no dispatch mode sees it, so outcore must see them there: unseen,
    they were moved out (resized to nothing) while a sparse gradient still held them,
    and the next op on it crashed the process (nn.Embedding(sparse=True))."""
    if t.layout is torch.sparse_coo:
        yield t._indices()
        yield t._values()
    elif t.layout in _COMPRESSED:
        for name in _COMPRESSED[t.layout]:
            yield getattr(t, name)()
        yield t.values()
    else:                            # mkldnn and others: no parts outcore can reach
        yield t


def iter_tensors(values) -> Iterator[torch.Tensor]:
    """Tensors in an op's args/kwargs/outputs, in order (lists and tuples flattened,
    wrapper subclasses replaced by their inner tensors, sparse tensors by their indices
    and values)."""
    for v in values:                 # every op passes here: plain tensors skip _leaves
        if isinstance(v, torch.Tensor):
            if type(v) in _PLAIN:
                if v.layout is _STRIDED:
                    yield v
                else:
                    yield from _parts(v)
            else:
                yield from _leaves(v)
        elif isinstance(v, (list, tuple)):
            for w in v:
                if isinstance(w, torch.Tensor):
                    if type(w) in _PLAIN:
                        if w.layout is _STRIDED:
                            yield w
                        else:
                            yield from _parts(w)
                    else:
                        yield from _leaves(w)


@functools.lru_cache(maxsize=None)
def written_arguments(func) -> tuple[tuple[int, str], ...]:
    """(position, name) of every argument the op mutates (schema `Tensor(a!)`)."""
    out = []
    for pos, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            out.append((pos, arg.name))
    return tuple(out)


# Whether this PyTorch can give one storage another's memory in place (`UntypedStorage.
# _swap_data_ptr_`, absent from 2.11, present in 2.13): a recompute hands its output's
# memory over without a copy, and state left on the slow tier between iterations is
# usable in place (NOTE [Mapped state] in run/mapped.py). Without it the first copies,
# and the second is read back into the fast tier (Residency.map_slow), with a warning.
SWAPS_DATA_PTR = hasattr(torch.UntypedStorage, "_swap_data_ptr_")


# Ops that mutate arguments their schema does not mark as written: batch norm updates
# running_mean / running_var (positions 3 and 4) when `training` (position 5) is true.
_UNMARKED_WRITES = {"aten::native_batch_norm": (3, 4, 5), "aten::cudnn_batch_norm": (3, 4, 5),
                    "aten::miopen_batch_norm": (3, 4, 5)}


# Ops that overwrite their `self` without reading it: a copy, a fill, a random draw.
_OVERWRITING = frozenset({
    "aten::copy_", "aten::fill_", "aten::zero_", "aten::normal_", "aten::uniform_",
    "aten::bernoulli_", "aten::random_", "aten::exponential_", "aten::geometric_",
    "aten::cauchy_", "aten::log_normal_"})
# Ops that set their `self` to a constant (a number: fill_ with a tensor copies a value):
# a reset, where it covers the storage.
_RESETTING = frozenset({("aten::fill_", "Scalar"), ("aten::zero_", "")})


def resets(func) -> bool:
    """Whether `func` sets its `self` to a constant (`_RESETTING`)."""
    schema = func._schema
    return (schema.name, schema.overload_name) in _RESETTING


# Ops that neither read nor write an argument's contents: views, and `resize_` (a factory
# with out= reaches the dispatcher as resize_ then the fill: `torch.randn(..., out=b)`).
_NO_USE = frozenset({"aten::resize_"})


def uses_contents(func) -> bool:
    """Whether `func` reads or writes its tensor arguments' contents (a view op does not)."""
    return not func.is_view and func._schema.name not in _NO_USE


@functools.lru_cache(maxsize=None)
def _overwritten_arguments(func) -> tuple[tuple[int, str], ...]:
    """(position, name) of the arguments `func` overwrites without reading them: `self`
    of `_OVERWRITING`'s ops, and every out= argument."""
    schema = func._schema
    return tuple((pos, arg.name) for pos, arg in enumerate(schema.arguments)
                 if arg.is_out or (pos == 0 and schema.name in _OVERWRITING))


class Overwrites(NamedTuple):
    """`overwritten_pieces`: per storage (`_cdata`), the byte ranges (start, end) an op
    overwrites without reading them (`pieces`), and, of those storages, the ranges its
    other arguments read (`reads`: `torch.add(t, x, out=t)` reads what it writes,
    `b[4:].copy_(b[:4])` another piece)."""
    pieces: dict
    reads: dict


NO_OVERWRITES = Overwrites({}, {})


def overwritten_pieces(func, args, kwargs) -> Overwrites:
    """What `func` overwrites without reading it: the arguments of
    `_overwritten_arguments` that are contiguous, and what its other arguments read of
    their storages (`Overwrites`)."""
    overwritten = _overwritten_arguments(func)
    if not overwritten:
        return NO_OVERWRITES
    positions = {pos for pos, _ in overwritten}
    pieces: dict[int, list] = {}
    reads: dict[int, list] = {}
    for pos, arg in enumerate(func._schema.arguments):
        value = args[pos] if pos < len(args) else kwargs.get(arg.name)
        for t in iter_tensors((value,)):
            storage = storage_of(t) if t.layout == torch.strided and not t.is_nested else None
            if storage is None:
                continue
            if pos not in positions:
                reads.setdefault(storage._cdata, []).append(byte_span(t))
            elif t.is_contiguous():
                start = t.storage_offset() * t.element_size()
                pieces.setdefault(storage._cdata, []).append(
                    (start, start + t.numel() * t.element_size()))
    return Overwrites(pieces, {key: spans for key, spans in reads.items() if key in pieces})


def covers(pieces: list[tuple[int, int]], nbytes: int, start: int = 0) -> bool:
    """Whether the byte ranges `pieces` cover [start, nbytes)."""
    reached = start
    for first, end in sorted(pieces):
        if reached >= nbytes:
            return True
        if first > reached:
            return False
        reached = max(reached, end)
    return reached >= nbytes


def byte_span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes (start, end) of its storage a tensor reaches (all of them where it is not
    strided, or has negative strides)."""
    if t.layout != torch.strided or t.is_nested:
        return 0, t.untyped_storage().nbytes()
    size = t.element_size()
    start = t.storage_offset()
    if t.numel() == 0:
        return start * size, start * size
    if any(stride < 0 for stride in t.stride()):
        return 0, t.untyped_storage().nbytes()
    last = start + sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
    return start * size, (last + 1) * size


def written_tensors(func, args, kwargs) -> list[torch.Tensor]:
    out = []
    for pos, name in written_arguments(func):
        value = args[pos] if pos < len(args) else kwargs.get(name)
        out.extend(iter_tensors((value,)))
    unmarked = _UNMARKED_WRITES.get(func._schema.name)
    if unmarked is not None:
        *positions, training = unmarked
        values = _bind(func, args, kwargs)
        if values[training]:
            out.extend(iter_tensors(values[p] for p in positions))
    return out


# Ops whose tensor argument was created just before them, outside the dispatcher
# (`torch.tensor(0.0)` builds the value, then lifts it): the storage is new, not an input.
FRESH_ARGUMENT_OPS = frozenset({"aten::lift_fresh", "aten::lift_fresh_copy"})
# Ops that bind a storage to a tensor: one made just before outside the dispatcher is
# recorded as created by them, yet it is their input (NOTE [Storages made outside the
# dispatcher], below).
BINDING_OPS = frozenset({"aten::set_"})
_BINDING = tuple(getattr(aten.set_, name) for name in aten.set_.overloads())
_BINDING_IDS = frozenset(map(id, _BINDING))     # by id: an OpOverload hashes in Python


def binds_storage(func) -> bool:
    """Whether `func` is a `set_`: its `self` lets go of what it held (not read; the
    recorder sees `self` after the op, bound to the source) and takes another storage."""
    return id(func) in _BINDING_IDS


# NOTE [Storage arguments]
#   An op may take a storage itself, not a tensor over it: `set_(source: Storage, ...)`,
#   which `t.set_(p.untyped_storage(), offset, size, stride)`, `copy.deepcopy` and
#   `torch.load` call. `iter_tensors` does not see it, so nothing made it resident
#   first: `set_` on a storage outcore had on the slow tier (resized to 0 bytes) gave it
#   fresh, uninitialised memory of the size asked for (PyTorch 2.13 grows a resizable
#   storage that is too small), and the parameter it held was garbage from there on,
#   silently. So such a storage is an input of the op everywhere outcore decides what
#   must be resident (`op_inputs`: the recorder, on demand, a replay, building), as an
#   empty tensor over it (`_over`): the tensor is only a handle, its storage is what
#   counts. Only `set_`'s Storage overloads take one, and those of its functional twin
#   `set` (which eager steps do not call): every registered schema checked with torch
#   2.13, and tests/run/test_storage_arguments.py keeps that true.
STORAGE_OPS = frozenset(
    getattr(packet, name) for packet in (aten.set_, aten.set) for name in packet.overloads()
    if any(str(a.type) == "Storage" for a in getattr(packet, name)._schema.arguments))
# By id: an OpOverload hashes in Python, and `op_inputs` asks on every op (STORAGE_OPS
# holds them, so no other object takes their ids).
_STORAGE_OP_IDS = frozenset(map(id, STORAGE_OPS))
# Where each takes its Storage arguments: [(position, name)], read once.
_STORAGE_POSITIONS = {id(op): [(pos, a.name) for pos, a in enumerate(op._schema.arguments)
                               if str(a.type) == "Storage"] for op in STORAGE_OPS}


def _over(storage, like) -> torch.Tensor:
    """An empty tensor of `like`'s dtype over `storage` (an UntypedStorage or a
    TypedStorage), made with Python dispatch off: no dispatch mode, outcore's or another,
    sees it. Empty, it neither reads the storage nor resizes it (one on the slow tier
    has 0 bytes)."""
    if isinstance(storage, torch.storage.TypedStorage):
        storage = storage._untyped_storage
    dtype = like.dtype if isinstance(like, torch.Tensor) else torch.uint8
    with torch._C._DisableTorchDispatch():
        return torch.empty(0, dtype=dtype, device=storage.device).set_(storage, 0, (0,), (1,))


def storage_arguments(func, args, kwargs) -> list[torch.Tensor]:
    """NOTE [Storage arguments]: the storages `func` takes as arguments, each as an empty
    tensor over it; none for every op but `set_`'s Storage overloads."""
    out = []
    for pos, name in _STORAGE_POSITIONS[id(func)]:
        value = args[pos] if pos < len(args) else kwargs.get(name)
        if isinstance(value, (torch.UntypedStorage, torch.storage.TypedStorage)):
            out.append(_over(value, args[0] if args else None))
            source = copied_from(value)
            if source is not None:      # NOTE [Storages made outside the dispatcher], rule 4
                out.append(_over(source, args[0] if args else None))
    return out


def op_inputs(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an op reads: its tensor arguments (`iter_tensors`), then the storages
    it takes as arguments, as tensors (NOTE [Storage arguments])."""
    inputs = list(iter_tensors(args))
    if kwargs:
        inputs += iter_tensors(kwargs.values())
    if id(func) in _STORAGE_OP_IDS:
        inputs += storage_arguments(func, args, kwargs)
    return inputs


# NOTE [Storages made outside the dispatcher]
#   1. `copy.deepcopy` of a tensor copies its storage with `UntypedStorage.clone()`, run
#      with the dispatch modes set aside (NOTE [Sharing a storage outcore moves], rule
#      14), and `torch.load` makes its storages in C++ (`get_storage_from_record`: not
#      resizable); both then bind them to a tensor with `aten::set_`, the first op that
#      shows them. Taken there as arrays that existed before the step, they were
#      recorded as persistent state ("buffer"), carried from one step to the next: a
#      replay kept the previous step's copy tracked (pinned, for torch.load's) beside
#      the new one, which the plan had not counted (`torch.load` of a state_dict inside
#      a step: 2.17 MiB over an 8 MiB budget, every replay), or took the new copy for
#      another array than recorded and left the plan (`copy.deepcopy`).
#   2. So the storages `UntypedStorage.clone` makes inside a block are noted
#      (`note_made`), and every storage first seen while `torch.load` runs on the
#      block's thread is made by it (`loading`): the recorder takes such a storage,
#      first seen, as created by that op (like `lift_fresh`'s argument), and a replay
#      counts `set_`'s source among what the function reads (FRESH_ARGUMENT_OPS).
#   3. Only within the block that made them: at its end they are forgotten
#      (`forget_made`), as a copy kept into the next step is state that step starts from.
#   4. The storage a clone copied is read by the op that binds the copy too (`set_`,
#      `op_inputs`: `copied_from`), where the recorder sees the read: the clone reads it
#      past the dispatcher just before. Recorded read only by the op before it, a plan
#      moved it out after that op, the clone read it back unplanned, and the replay
#      passed its budget (adaptive-belady: 52 KiB over 1.5 MiB with deepcopies of the
#      state in the step, helper-116).
# storage key -> (the storage, made outside the dispatcher; what it copies, or None)
_made: dict[int, tuple] = {}
_loading = threading.local()


def note_made(storage, source=None) -> None:
    """NOTE [Storages made outside the dispatcher]: `storage` was just made in the step
    by no aten op (a copy of `source`, where given); the op that first shows it made it."""
    key = storage._cdata

    def gone(ref, key=key):
        if _made.get(key, (None,))[0] is ref:
            del _made[key]
    _made[key] = (weakref.ref(storage, gone),
                  weakref.ref(source) if source is not None else None)


def copied_from(storage):
    """The storage `storage` was copied from by no aten op in this block (rule 4), or
    None."""
    if isinstance(storage, torch.storage.TypedStorage):
        storage = storage._untyped_storage
    refs = _made.get(storage._cdata)
    if refs is None or refs[0]() is not storage or refs[1] is None:
        return None
    return refs[1]()


def forget_made() -> None:
    """The block has ended: what it noted is no longer new. A copy kept into the next
    step is state that step starts from, first shown by whatever op reads it (helper-113:
    noted for as long as it lived, a kept deepcopy was taken as made by its reader in
    every later recording, and each replay of those read more arrays than recorded)."""
    _made.clear()


def made_outside(storage) -> bool:
    """Whether `storage`, first seen by the step now, was made in it by no aten op."""
    if getattr(_loading, "depth", 0):
        return True
    refs = _made.get(storage._cdata)
    return refs is not None and refs[0]() is storage


@contextlib.contextmanager
def loading():
    """While `torch.load` runs on this thread: what it shows first, it made."""
    _loading.depth = getattr(_loading, "depth", 0) + 1
    try:
        yield
    finally:
        _loading.depth -= 1


# NOTE [Fast paths under autocast]
#   1. nn.TransformerEncoderLayer in eval without gradients takes PyTorch's fast path:
#      one op (`_transformer_encoder_layer_fwd`) whose CPU kernel runs the layer's
#      linears inside it, unseen. Autocast has no kernel of its own for that op: plain
#      PyTorch runs it with CPU autocast on, and the inner linears cast to the autocast
#      dtype. But PyTorch runs a dispatch mode's handler with every key above Python set
#      aside, autocast's with it, so under any mode (a bare one too) the kernel ran them
#      in float32: other numbers, float32 features where plain PyTorch gives bfloat16
#      (helper-153: a frozen encoder, and the head trained on its features).
#      (`_native_multi_head_attention`, nn.MultiheadAttention's fast path, has an
#      autocast kernel: its inputs reach the mode cast, and it needs nothing.)
#   2. Inside the handler autocast reads as off whatever the caller set; the state the
#      op entered the dispatcher with is PyTorch's TLS snapshot
#      (`torch._C._RestorePythonTLSSnapshot`). `autocast_as_entered` puts CPU autocast
#      back as it was there around the op's whole handling, and as it is after:
#      outcore's own bookkeeping calls no op autocast changes (copies, resizes), and the
#      inner linears cast as without the mode (tests/run/test_bitwise.py).
#   3. Only where outcore's mode is the first Python handler the op reached: a mode of
#      the user's pushed inside the iteration (FlopCounterMode), or a tensor subclass's
#      `__torch_dispatch__`, ran it before with autocast set aside, as plain PyTorch
#      with that mode does, and the snapshot predates that (helper-155). Such a handler
#      is a `__torch_dispatch__` frame above outcore's on the stack (`_handled_above`).
#   4. Other ops with a backend kernel that runs ops autocast would cast are not known
#      in torch 2.13: autocast casts its listed ops before any mode sees them, and
#      composite ones decompose above the modes. One op, so every op dispatched is
#      compared by identity (an OpOverload's hash is Python code).
FAST_PATH_OP = torch.ops.aten._transformer_encoder_layer_fwd.default


# NOTE [Dynamo kept out]
# TorchDynamo must never compile outcore's own Python: compiled, its handler took 21 s
# and was not bitwise (helper-163), and tracing `ooc.iteration()`'s entry failed inside
# Dynamo ("forbidden callable set_stance"). Dynamo compiles a frame where its callback
# is set on the thread: in a torch.compile'd function, and in a dispatch mode's
# handler run from one (PyTorch runs the handler with the mode off the stack, so
# Dynamo's "nothing under a dispatch mode" does not hold there).
#   1. PyTorch wraps every mode's `__torch_dispatch__` in `torch._disable_dynamo`,
#      which clears and puts back the callback at every op (~2.5 us of the executor's
#      ~38 us per op by a monkeypatch A/B, CHANGELOG 2026-12-06 seventh). outcore's
#      modes (`OutcoreMode`) have no wrapper; their handler's code is marked for
#      Dynamo's frame evaluation as skipped with every frame it calls
#      (`outside_dynamo`, the code strategy `torch._dynamo.disable` stands for), at no
#      cost per op.
#   2. `_Iteration.__enter__`/`__exit__` are marked so too, not wrapped: a wrapper's
#      bytecodes before the first of `__exit__` would let a signal land outside its
#      held section (NOTE [Interrupts] rule 3). With rule 4 (a call into outcore from
#      traced code is a graph break) a loop compiled around `with ooc.iteration():`
#      then runs the block eagerly, exactly, as a compiled module inside it does.
#   3. Without the code-strategy API (a torch other than the 2.13 this is built for)
#      the modes keep PyTorch's wrapper and the block's entry and exit are not marked.
#   4. The rest of outcore's Python runs in the block too, with the mode off the stack
#      (the recording's bookkeeping under `_disable_current_modes`), or outside any
#      block (the hook that catches an optimizer step outside one, weakref callbacks):
#      under a compiled loop Dynamo traced the recording's `_update_bytes` and
#      `storage_of` till its recompile limit, and once failed a guard inside them
#      (helper-171). Dynamo's trace rules skip outcore's files as they skip Python's
#      own (`dynamo_skips_outcore`, `torch._dynamo.trace_rules.add`): each frame runs as
#      it is, and a compiled function that calls into outcore breaks its graph there.
#      Done once per process, by the first OutOfCore or mode made (it imports
#      torch._dynamo, as the first mode's op and the first optimizer did anyway).
try:
    from torch._C._dynamo.eval_frame import (_FrameAction, _FrameExecStrategy,
                                              set_code_exec_strategy)
    _SKIPPED_WITH_CALLEES = _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP)
except (ImportError, AttributeError, TypeError):          # rule 3
    set_code_exec_strategy = _SKIPPED_WITH_CALLEES = None


def outside_dynamo(function):
    """`function`, never compiled nor traced by Dynamo, nor anything it calls, with
    nothing run before its first bytecode (NOTE [Dynamo kept out] rules 1-2)."""
    if _SKIPPED_WITH_CALLEES is not None:
        set_code_exec_strategy(function.__code__, _SKIPPED_WITH_CALLEES)
    return function


def eager_stance():
    """torch.compile's "force_eager" stance, entered: its context, to `__exit__` when the
    block or recording ends; None where nothing needs it or it cannot be set. Dynamo
    compiles nothing under a dispatch mode, but code it compiled before runs its kernels
    past the mode, on storages a plan moved out (a segmentation fault), and met under a
    recording it marks that code skipped for good (helper-181); the stance runs the
    original Python instead. Without torch._dynamo imported nothing was compiled (and
    importing it costs seconds); a PyTorch without the stance, or a region Dynamo
    compiles (RuntimeError), goes on without it."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if "torch._dynamo" not in sys.modules or set_stance is None:
        return None
    try:
        return set_stance("force_eager")
    except RuntimeError:
        return None


_SKIPS_OUTCORE = []


def dynamo_skips_outcore() -> None:
    """Rule 4 of NOTE [Dynamo kept out]: Dynamo's trace rules skip outcore's files. Once
    per process; imports torch._dynamo."""
    if _SKIPS_OUTCORE:
        return
    import torch._dynamo.trace_rules as rules
    rules.add(PACKAGE.rstrip("."))
    _SKIPS_OUTCORE.append(True)


class OutcoreMode(TorchDispatchMode):
    """Base of outcore's dispatch modes: the handler without PyTorch's per-op Dynamo
    wrapper, marked by `outside_dynamo` instead (NOTE [Dynamo kept out] rule 1)."""

    def __init__(self, *args, **kwargs):
        dynamo_skips_outcore()                                      # rule 4
        super().__init__(*args, **kwargs)

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return _SKIPPED_WITH_CALLEES is None                       # rule 3

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        handler = cls.__dict__.get("__torch_dispatch__")
        if handler is not None and not cls._should_skip_dynamo():
            outside_dynamo(handler)


@contextlib.contextmanager
def autocast_as_entered(mode):
    """Inside dispatch mode `mode`'s handler: CPU autocast as the op's caller had it
    (NOTE [Fast paths under autocast] rules 2 and 3), and as it is here again after."""
    with torch._C._RestorePythonTLSSnapshot():
        wanted, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    here, here_dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    if (wanted == here and dtype == here_dtype) or _handled_above(mode):
        yield
        return
    torch.set_autocast_dtype("cpu", dtype)
    torch.set_autocast_enabled("cpu", wanted)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cpu", here)
        torch.set_autocast_dtype("cpu", here_dtype)


def _handled_above(mode) -> bool:
    """Whether another Python handler (a mode's or a tensor subclass's
    `__torch_dispatch__`) than outcore's own runs above `mode`'s on this thread's stack
    (rule 3). outcore's own (`outcore.record()` inside an iteration) put autocast back
    as the caller had it: they count as `mode` (helper-158)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "__torch_dispatch__":
            handler = frame.f_locals.get("self", frame.f_locals.get("cls"))
            if handler is not mode and not type(handler).__module__.startswith(PACKAGE):
                return True
        frame = frame.f_back
    return False


PACKAGE = __name__.removesuffix("aten")          # "outcore.", however it was imported


# NOTE [Read past the dispatcher]
#   1. Some PyTorch functions read a tensor's memory in C++ through `data_ptr()`, with no
#      aten op that a dispatch mode sees: they are CompositeImplicitAutograd (decomposed
#      above the Python dispatch key, so outcore's mode sees only the ops they call), or
#      autograd formulas that call such a function. A storage outcore had moved out
#      (`resize_(0)`) was read as 0 bytes ("The tensor has a non-zero number of elements,
#      but its data is not allocated yet"), and one moved out while the function ran (it
#      takes the pointer once, then runs ops that make room) was read after it was
#      freed: garbage ("start (8322) + length (94580716746736) exceeds dimension size").
#   2. Found in torch 2.13 (helper-117 tried some 60 functions against a dispatch mode
#      that sees every op, forward and backward): the indices tensor of `tensor_split`,
#      read before any op runs, so read back first and not pinned (run/sharing.py, NOTE
#      [Sharing a storage outcore moves] rule 17); a strided nested tensor's sizes,
#      strides and offsets (`torch.nested.nested_tensor` without layout=torch.jagged),
#      which `_nested_tensor_size` and its two siblings return as they are; and a
#      PackedSequence's `batch_sizes` (checked with GRU, LSTM,
#      RNN, pad_packed_sequence, enforce_sorted=False, PackedSequence.to()): read in C++ by
#      `aten::gru.data`, `lstm.data`, `rnn_tanh.data`, `rnn_relu.data` (`_VF.gru(data,
#      batch_sizes, ...)`, nn.GRU/LSTM/RNN on a PackedSequence), `_pad_packed_sequence`
#      (pad_packed_sequence) and `_pack_padded_sequence_backward` (the backward of
#      pack_padded_sequence, which saves it). `sorted_indices`/`unsorted_indices` and the
#      data are read by ops the mode sees (index_select, narrow, copy_), and
#      PackedSequence.to() keeps `batch_sizes` as it is (always on the CPU).
#   3. So such a storage never moves (Residency NOTE 7, `movable`: counted as pinned, in
#      the budget error as "read by PyTorch past the dispatcher"): from the op that makes
#      it (`READ_PAST_OUTPUTS`: every mode marks an op's outputs right after it ran,
#      before tracking them, `note_read_past`), so the recording sees it unmovable from
#      its first op and the plan counts it held for its whole life, as for shared
#      memory; and where a function of `READ_PAST_ARGUMENTS` gets one made otherwise (a
#      PackedSequence built by hand in the step), it is made resident and marked before
#      the call (run/sharing.py, NOTE [Sharing a storage outcore moves] rule 16).
#   4. The mark is the storage's (`_read_past`, by key while it lives), not its entry's:
#      an entry let go of between steps (Residency NOTE 8) and tracked again is pinned
#      again. batch_sizes holds 8 bytes per time step: under min_move_bytes (64 KiB by
#      default) below 8192 steps, and pinned for that reason anyway.
NESTED_METADATA = "nested metadata"    # READ_PAST_OUTPUTS: the nested outputs' metadata
READ_PAST_OUTPUTS = {
    "aten::_pack_padded_sequence": ((1,), "a PackedSequence's batch_sizes"),
    # A strided nested tensor's metadata: each returns the tensor its NestedTensorImpl
    # holds (the same storage at every call), which its kernels read in C++.
    "aten::_nested_tensor_size": ((0,), "a nested tensor's sizes"),
    "aten::_nested_tensor_strides": ((0,), "a nested tensor's strides"),
    "aten::_nested_tensor_storage_offsets": ((0,), "a nested tensor's offsets"),
    # A strided nested tensor built from those three tensors made by ops of the step
    # (`torch.nested.as_nested_tensor(t)`; `torch.load` of a nested tensor): its impl
    # keeps them, so they are marked through its getters. They are the op's inputs,
    # tracked already: `evict` finds them unmovable from then on (Residency NOTE 7).
    "aten::_nested_view_from_buffer": (NESTED_METADATA, "a nested tensor's metadata"),
    "aten::_nested_view_from_buffer_copy": (NESTED_METADATA, "a nested tensor's metadata"),
}
# Functions of `torch._VF` (CompositeImplicitAutograd: no dispatch mode sees them) and
# the arguments they read in C++: {name: (positions, what)}. An RNN's `_VF.<name>` takes
# batch_sizes second only on a PackedSequence (`read_past_arguments` checks the dtype).
READ_PAST_ARGUMENTS = {
    "gru": ((1,), "batch_sizes"), "lstm": ((1,), "batch_sizes"),
    "rnn_tanh": ((1,), "batch_sizes"), "rnn_relu": ((1,), "batch_sizes"),
    "_pad_packed_sequence": ((1,), "batch_sizes"),
}
_READ_PAST_OPS = frozenset(
    getattr(packet, name) for schema, _ in READ_PAST_OUTPUTS.items()
    if (packet := getattr(aten, schema.split("::")[1], None)) is not None
    for name in packet.overloads())
_READ_PAST_OP_IDS = frozenset(map(id, _READ_PAST_OPS))      # _READ_PAST_OPS holds them
_read_past: dict[int, weakref.ref] = {}     # storage key -> the storage (NOTE 4)


def mark_read_past(storage) -> None:
    """NOTE [Read past the dispatcher]: PyTorch reads `storage` in C++, unseen: it never
    moves from now on."""
    key = storage._cdata
    ref = _read_past.get(key)
    if ref is not None and ref() is storage:
        return

    def gone(ref, key=key):
        if _read_past.get(key) is ref:
            del _read_past[key]
    _read_past[key] = weakref.ref(storage, gone)


def read_past(storage) -> bool:
    """Whether `storage` is one PyTorch reads past the dispatcher (NOTE [Read past the
    dispatcher]): never moved."""
    ref = _read_past.get(storage._cdata)
    return ref is not None and ref() is storage


def note_read_past(func, out) -> None:
    """Mark the outputs of `func` that PyTorch reads past the dispatcher (NOTE [Read past
    the dispatcher], rule 3); called by every mode right after an op ran, before its
    outputs are tracked."""
    if id(func) not in _READ_PAST_OP_IDS:        # by id: an OpOverload hashes in Python
        return
    positions, _ = READ_PAST_OUTPUTS[func._schema.name]
    outputs = out if isinstance(out, (list, tuple)) else (out,)
    if positions is NESTED_METADATA:
        for t in outputs:
            if isinstance(t, torch.Tensor) and t.is_nested and t.layout is torch.strided:
                _mark_nested_metadata(t)
        return
    for pos in positions:
        if pos < len(outputs) and isinstance(outputs[pos], torch.Tensor):
            storage = storage_of(outputs[pos])
            if storage is not None:
                mark_read_past(storage)


def _mark_nested_metadata(t: torch.Tensor) -> None:
    """Mark the sizes, strides and offsets a strided nested tensor's impl holds: its
    getters return them as they are (the same storage at every call), asked with the
    dispatch modes set aside so that no mode sees the getters."""
    from torch.utils._python_dispatch import _disable_current_modes
    with _disable_current_modes():
        held = (t._nested_tensor_size(), t._nested_tensor_strides(),
                t._nested_tensor_storage_offsets())
    for tensor in held:
        storage = storage_of(tensor)
        if storage is not None:
            mark_read_past(storage)


def read_past_arguments(name: str, args) -> list:
    """The tensors among `args` that `torch._VF.<name>` reads past the dispatcher
    (READ_PAST_ARGUMENTS): int64 CPU tensors at its positions (an RNN's hidden state,
    there when the input is no PackedSequence, is floating-point)."""
    positions, _ = READ_PAST_ARGUMENTS[name]
    return [args[p] for p in positions if p < len(args) and isinstance(args[p], torch.Tensor)
            and args[p].dtype == torch.int64 and args[p].device.type == "cpu"]


# Fused optimizer steps: one in-place kernel over lists of parameters, gradients and
# states, computing each tensor's elements from that tensor's own elements and shared
# scalars only (lr, betas, grad_scale, found_inf). They split into one call per tensor
# with one-element lists, which runs the same kernel on the same values: bitwise equal
# (tests/trace/test_foreach.py, on CPU; benchmarks/gpu_tier_check.py on CUDA: fused AdamW
# bitwise on an H200).
FUSED_OPTIMIZERS = frozenset(f"aten::_fused_{name}_" for name in ("adam", "adamw", "sgd", "adagrad"))

# Other multi-tensor ops of the same kind, split the same way (`split_foreach`). A
# GradScaler's unscale: each gradient is multiplied by inv_scale in place, and found_inf
# is set to 1.0 where one holds an inf or a NaN, never cleared: one call per gradient
# leaves the same gradients and the same found_inf. Run whole, it needed every gradient
# resident at once (InfeasibleBudget below that, where the step needs one at a time).
PER_TENSOR_KERNELS = FUSED_OPTIMIZERS | {"aten::_amp_foreach_non_finite_check_and_unscale_"}


def is_foreach(func) -> bool:
    """A multi-tensor op outcore runs as one call per tensor: `_foreach_*`, and the fused
    optimizer steps and the others of PER_TENSOR_KERNELS."""
    name = func._schema.name
    return name.startswith("aten::_foreach_") or name in PER_TENSOR_KERNELS


def _bind(func, args, kwargs) -> list:
    """All schema arguments of `func` in order, with defaults filled in."""
    values = []
    for pos, arg in enumerate(func._schema.arguments):
        if pos < len(args):
            values.append(args[pos])
        elif arg.name in kwargs:
            values.append(kwargs[arg.name])
        elif arg.has_default_value():
            values.append(arg.default_value)
        else:
            raise TypeError(f"{func} missing argument {arg.name}")
    return values


@functools.lru_cache(maxsize=None)
def _list_arguments(func) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Positions of `func`'s list arguments, of those that are lists of tensors, and of a
    `.Tensor` overload's `scalars` tensor (one scalar per element when 1-D)."""
    schema = func._schema.arguments
    lists = tuple(i for i, a in enumerate(schema) if str(a.type).startswith("List["))
    tensor_lists = tuple(i for i in lists if str(schema[i].type) == "List[Tensor]")
    scalars = tuple(i for i, a in enumerate(schema)
                    if a.name == "scalars" and str(a.type) == "Tensor")
    return lists, tensor_lists, scalars


def split_foreach(func, args, kwargs) -> list[tuple[Callable, tuple, dict]] | None:
    """One call of `func` per tensor of a `_foreach_*` call or of a fused op of
    PER_TENSOR_KERNELS: every list argument (of tensors or of scalars) cut to that
    tensor's element, and a `.Tensor` overload's 1-D `scalars` to its one scalar; an
    empty list (max_exp_avg_sqs without amsgrad) stays empty. None where the lists'
    lengths disagree or there is nothing to split: the op then runs whole."""
    schema = func._schema.arguments
    lists, tensor_lists, scalars = _list_arguments(func)
    if not tensor_lists:
        return None
    values = _bind(func, args, kwargs)
    count = max(len(values[i]) for i in tensor_lists)
    if count == 0 or any(len(values[i]) not in (0, count) for i in lists):
        return None
    sliced = [i for i in scalars if values[i].dim() == 1]
    if any(len(values[i]) != count for i in sliced):
        return None
    if _route_differs(func, [values[i] for i in tensor_lists if values[i]], count):
        return None
    calls = []
    for k in range(count):
        call = [([v[k]] if v else []) if i in lists else v[k:k + 1] if i in sliced else v
                for i, v in enumerate(values)]
        calls.append((func, tuple(c for c, a in zip(call, schema) if not a.kwarg_only),
                      {a.name: c for c, a in zip(call, schema) if a.kwarg_only}))
    return calls


# Devices whose `_foreach_*` ops are the plain op per tensor, whole or split: the CPU's
# kernels, and the meta device's (a meta trace stands for a CPU step: InfeasibleBudget
# advises recording one for smallest_budget when a step does not fit).
_PLAIN_FOREACH_DEVICES = ("cpu", "meta")


def _dense(t: torch.Tensor) -> bool:
    """Strided, its elements neither overlapping nor leaving gaps (any order of dims)."""
    if t.layout != torch.strided:
        return False
    expected = 1
    for size, stride in sorted((p for p in zip(t.shape, t.stride()) if p[0] != 1),
                               key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _route_differs(func, tensor_lists, count: int) -> bool:
    """Would a one-element call take the multi-tensor kernel where the whole call takes
    the plain op per tensor? A `_foreach_*` op off the CPU takes its fast route only
    where every tensor of its lists has one dtype and device and every element passes
    (its tensors dense and strided, of the same sizes and strides across the lists:
    PyTorch's ForeachUtils.h); one element that does not, or a list that mixes dtypes,
    sends the whole call to the plain ops, while a one-element call of an element that
    passes takes the kernel, and the two round differently on CUDA (`div_` by a scalar:
    the reciprocal). Such a call is not split, which is always what plain PyTorch runs
    (helper-72 found the per-element half). The route's conditions on the scalars'
    types are the same for the whole call and each element. On the CPU a foreach op is
    the plain op per tensor either way; the fused optimizers group their tensors by
    dtype and device themselves."""
    if not func._schema.name.startswith("aten::_foreach_"):
        return False
    # On every foreach op of a CPU step: `is_cpu` and `is_meta` are read at C speed,
    # where `device.type` makes a device object per tensor (doubling the split's cost).
    meta = "meta" in _PLAIN_FOREACH_DEVICES
    if all(not isinstance(t, torch.Tensor) or t.is_cpu or (meta and t.is_meta)
           for values in tensor_lists for t in values):
        return False
    tensors = [t for values in tensor_lists for t in values if isinstance(t, torch.Tensor)]
    # The usual call (an optimizer's: one dtype and device, contiguous tensors of the same
    # shapes across the lists) takes the fast route whole, found at C speed per tensor.
    dtype, device = tensors[0].dtype, tensors[0].device
    if (all(t.dtype == dtype and t.device == device and t.is_contiguous() for t in tensors)
            and all(len(values) == count for values in tensor_lists)
            and all(a.shape == b.shape for other in tensor_lists[1:]
                    for a, b in zip(tensor_lists[0], other))):
        return False
    passes = []
    for k in range(count):
        at_k = [values[k] for values in tensor_lists if isinstance(values[k], torch.Tensor)]
        passes.append(bool(at_k)
                      and len({(t.dtype, t.device) for t in at_k}) == 1
                      and len({(tuple(t.shape), t.stride()) for t in at_k}) == 1
                      and all(_dense(t) for t in at_k))
    whole = all(passes) and len({(t.dtype, t.device) for t in tensors}) == 1
    return not whole and any(passes)


def returns_nothing(func) -> bool:
    return len(func._schema.returns) == 0


def count_foreach_writes(func, args, kwargs) -> None:
    """Move the version counter of every tensor a `_foreach_*` op wrote, once, as the op
    does without a dispatch mode: under one (any: a mode that only calls the op shows
    it), split or not, no version moves, and a tensor an optimizer's foreach step or an
    EMA's `_foreach_lerp_` changed looked unchanged (to autograd's check of tensors
    saved for backward, and to NOTE [Durable state] rule 17, which follows versions;
    helper-219). Inference tensors have no counter."""
    for pos, name in written_arguments(func):
        value = args[pos] if pos < len(args) else kwargs.get(name)
        tensors = list(iter_tensors((value,)))
        try:
            torch._C._increment_version(tensors)
        except RuntimeError:                    # an inference tensor among them
            torch._C._increment_version([t for t in tensors if not t.is_inference()])


def call_split(func, args, kwargs, one):
    """Run `func` as `one(op, args, kwargs, split)`; a multi-tensor `_foreach_*` op runs as
    one call per tensor, with split = (element, count)."""
    if is_foreach(func):
        calls = split_foreach(func, args, kwargs)
        if calls is not None:
            results = [one(op, a, k, (i, len(calls))) for i, (op, a, k) in enumerate(calls)]
            count_foreach_writes(func, args, kwargs)
            if returns_nothing(func):
                return None
            return [t for listed in results for t in listed]     # one-element lists
        out = one(func, args, kwargs, None)
        count_foreach_writes(func, args, kwargs)
        return out
    return one(func, args, kwargs, None)


def output_tensors(out) -> list[torch.Tensor]:
    """The tensors an op returned, in order."""
    return list(iter_tensors(out if isinstance(out, (list, tuple)) else (out,)))


def storage_of(t: torch.Tensor):
    """The tensor's storage, or None for tensors without one (sparse, wrapper subclasses,
    efficient ZeroTensors: forward-mode AD's tangents of parameters, whose storage has a
    size but no memory, and can neither be read nor moved)."""
    if t._is_zerotensor():
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


@functools.lru_cache(maxsize=None)
def makes_nothing_new(func) -> bool:
    """Whether `func` creates no storage: a view, or an op that writes arguments and
    returns only those (or nothing): `add_`, the `out=` variants, `_foreach_add_` (an
    `out=` tensor smaller than the result grows: `on_demand.room` asks how much). An op
    that writes an argument and returns a new tensor too creates storages like any
    other: `rrelu_with_noise` writes its noise, QAT's `_fused_moving_avg_obs_fq_helper`
    its observer's statistics, and both return fresh outputs (counted as making nothing,
    their recordings went over the budget by the outputs' bytes)."""
    if func.is_view:
        return True
    schema = func._schema
    return schema.is_mutable and all(r.alias_info is not None for r in schema.returns)


@functools.lru_cache(maxsize=None)
def out_arguments(func) -> frozenset:
    """Names of `func`'s `out=` arguments, as its schema has them (the keyword-only ones
    it writes): `out`, and `values`/`indices` of `sort.values`, `max`/`max_values` of
    `max.dim_max`, `out0`/`out1` of `var_mean.correction_out`."""
    return frozenset(a.name for a in func._schema.arguments
                     if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write)


def broadcast_shape(shapes) -> tuple | None:
    """`torch.broadcast_shapes(*shapes)`, or None where they do not broadcast: the same
    answer in plain Python, at every small pointwise op a replay passes (torch's took
    ~14 us a call through its reference implementation, more than a small op costs)."""
    shapes = list(shapes)
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for shape in shapes:
        offset = ndim - len(shape)
        for k, size in enumerate(shape):
            have = out[offset + k]
            if size == have or size == 1:
                continue
            if have != 1:
                return None
            out[offset + k] = size
    return tuple(out)


def distinct_storages(tensors) -> list:
    """Distinct storages of `tensors` in order of first appearance."""
    seen, out = set(), []
    for t in tensors:
        s = storage_of(t)
        if s is not None and s._cdata not in seen:
            seen.add(s._cdata)
            out.append(s)
    return out
