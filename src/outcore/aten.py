"""What outcore needs to know about aten ops: which arguments an op writes, and how to
split a multi-tensor `_foreach_*` op into one call of the plain op per tensor.

Splitting matters because a `_foreach_*` kernel touches every parameter (and its
optimizer state) at once; one function per tensor lets later stages keep only one
tensor's share resident. Splitting is bitwise equal to the fused call on the CPU
(tests/trace/test_foreach.py checks it); on CUDA the per-element arithmetic of the
multi-tensor kernels is the same whatever the tensors per launch, which
benchmarks/gpu_tier_check.py is to check (not yet run).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

aten = torch.ops.aten

# Foreach ops whose plain counterpart has another name.
_RENAMED = {"norm": "linalg_vector_norm"}


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


# Fused optimizer steps: one in-place kernel over lists of parameters, gradients and
# states, computing each tensor's elements from that tensor's own elements and shared
# scalars only (lr, betas, grad_scale, found_inf). They split into one call per tensor
# with one-element lists, which runs the same kernel on the same values: bitwise equal
# (tests/trace/test_foreach.py, on CPU; benchmarks/gpu_tier_check.py on CUDA).
FUSED_OPTIMIZERS = frozenset(f"aten::_fused_{name}_" for name in ("adam", "adamw", "sgd", "adagrad"))

# Other multi-tensor ops of the same kind, split the same way (`_split_fused`). A
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


@dataclass(frozen=True)
class _Plan:
    """How one foreach overload maps onto its plain op."""
    plain: Any
    # For each foreach argument: the plain argument it becomes (index into plain schema).
    targets: tuple[int, ...]
    list_positions: tuple[int, ...]           # values taken element-wise from a list
    scalar_tensor_positions: tuple[int, ...]  # 1-D tensor of scalars taken element-wise
    n_positional: int                         # plain arguments passed positionally
    defaults: tuple                           # default value of every plain argument
    out_from_self: bool = False               # in-place via the `.out` overload, out=self


def _kind(type_str: str) -> str:
    t = type_str
    if t.startswith("Optional["):
        t = t[len("Optional["):-1]
    if t == "Tensor":
        return "tensor"
    if t in ("Scalar", "float", "int", "number", "complex"):
        return "scalar"
    return "other"


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


def _match(foreach_args, elem_kinds, plain, out_from_self=False) -> _Plan | None:
    plain_args = plain._schema.arguments
    by_name = {a.name: i for i, a in enumerate(plain_args)}
    targets = []
    for j, farg in enumerate(foreach_args):
        target = by_name.get(farg.name, j)
        if target >= len(plain_args) or target in targets:
            return None
        want, have = _kind(str(plain_args[target].type)), elem_kinds[j]
        if want != have:
            return None
        targets.append(target)
    for i, arg in enumerate(plain_args):
        if i not in targets and not arg.has_default_value():
            if not (out_from_self and arg.name == "out"):
                return None
    mapped_positional = [t for t in targets if not plain_args[t].kwarg_only]
    n_positional = max(mapped_positional) + 1 if mapped_positional else 0
    defaults = tuple(a.default_value if a.has_default_value() else None for a in plain_args)
    return _Plan(plain, tuple(targets), (), (), n_positional, defaults, out_from_self)


@functools.lru_cache(maxsize=None)
def _plan(func) -> _Plan | None:
    schema = func._schema
    base = schema.name[len("aten::_foreach_"):]
    inplace = base.endswith("_")
    stem = base.rstrip("_")
    plain_name = _RENAMED.get(stem, stem) + ("_" if inplace else "")
    packet = getattr(aten, plain_name, None)
    out_from_self = False
    if packet is None and inplace:
        # No in-place plain op (e.g. maximum_): write through the `.out` overload instead.
        packet, out_from_self = getattr(aten, plain_name[:-1], None), True
    if packet is None:
        return None
    elem_kinds, lists, scalar_tensors = [], [], []
    for pos, arg in enumerate(schema.arguments):
        t = str(arg.type)
        if t.startswith("List[") and _kind(t[5:-1]) in ("tensor", "scalar"):
            lists.append(pos)
            elem_kinds.append(_kind(t[5:-1]))
        elif func._overloadname == "Tensor" and arg.name == "scalars":
            scalar_tensors.append(pos)      # a 1-D tensor holding one scalar per element
            elem_kinds.append("scalar")
        else:
            elem_kinds.append(_kind(t))
    for name in packet.overloads():
        if ("out" in name) != out_from_self:
            continue
        plan = _match(schema.arguments, elem_kinds, getattr(packet, name), out_from_self)
        if plan is not None:
            return _Plan(plan.plain, plan.targets, tuple(lists), tuple(scalar_tensors),
                         plan.n_positional, plan.defaults, out_from_self)
    return None


def _split_fused(func, args, kwargs) -> list[tuple[Callable, tuple, dict]] | None:
    """One call of the same fused op (PER_TENSOR_KERNELS) per tensor, each list argument
    cut to that tensor's element (an empty list, such as max_exp_avg_sqs without amsgrad, stays
    empty); None where the lists' lengths disagree."""
    schema = func._schema.arguments
    values = _bind(func, args, kwargs)
    lists = [i for i, a in enumerate(schema) if str(a.type).startswith("List[Tensor")]
    count = max(len(values[i]) for i in lists)
    if any(len(values[i]) not in (0, count) for i in lists):
        return None
    calls = []
    for k in range(count):
        call = [([v[k]] if v else []) if i in lists else v for i, v in enumerate(values)]
        calls.append((func, tuple(c for c, a in zip(call, schema) if not a.kwarg_only),
                      {a.name: c for c, a in zip(call, schema) if a.kwarg_only}))
    return calls


def split_foreach(func, args, kwargs) -> list[tuple[Callable, tuple, dict]] | None:
    """One (plain op, args, kwargs) per tensor of a `_foreach_*` call (or of a fused
    op of PER_TENSOR_KERNELS, `_split_fused`), or None when the op cannot be split (it
    then runs whole)."""
    if func._schema.name in PER_TENSOR_KERNELS:
        return _split_fused(func, args, kwargs)
    plan = _plan(func)
    if plan is None or not plan.list_positions:
        return None
    values = _bind(func, args, kwargs)
    count = len(values[plan.list_positions[0]])
    scalar_lists = {pos: values[pos].tolist() for pos in plan.scalar_tensor_positions}
    plain_args = plan.plain._schema.arguments
    calls = []
    for i in range(count):
        call = list(plan.defaults)
        for j, target in enumerate(plan.targets):
            if j in plan.list_positions:
                call[target] = values[j][i]
            elif j in scalar_lists:
                call[target] = scalar_lists[j][i]
            else:
                call[target] = values[j]
        kw = {plain_args[t].name: call[t] for t in plan.targets if plain_args[t].kwarg_only}
        if plan.out_from_self:
            kw["out"] = values[0][i]
        calls.append((plan.plain, tuple(call[:plan.n_positional]), kw))
    return calls


def returns_nothing(func) -> bool:
    return len(func._schema.returns) == 0


def call_split(func, args, kwargs, one):
    """Run `func` as `one(op, args, kwargs, split)`; a multi-tensor `_foreach_*` op runs as
    one call per tensor, with split = (element, count)."""
    if is_foreach(func):
        calls = split_foreach(func, args, kwargs)
        if calls is not None:
            results = [one(op, a, k, (i, len(calls))) for i, (op, a, k) in enumerate(calls)]
            return None if returns_nothing(func) else results
    return one(func, args, kwargs, None)


def output_tensors(out) -> list[torch.Tensor]:
    """The tensors an op returned, in order."""
    return list(iter_tensors(out if isinstance(out, (list, tuple)) else (out,)))


def storage_of(t: torch.Tensor):
    """The tensor's storage, or None for tensors without one (sparse, wrapper subclasses)."""
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def distinct_storages(tensors) -> list:
    """Distinct storages of `tensors` in order of first appearance."""
    seen, out = set(), []
    for t in tensors:
        s = storage_of(t)
        if s is not None and s._cdata not in seen:
            seen.add(s._cdata)
            out.append(s)
    return out
