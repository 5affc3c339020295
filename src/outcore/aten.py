"""What outcore needs to know about aten ops: which arguments an op writes, and how to
split a multi-tensor `_foreach_*` op into one call of the plain op per tensor.

Splitting matters because a `_foreach_*` kernel touches every parameter (and its
optimizer state) at once; one function per tensor lets later stages keep only one
tensor's share resident. Splitting is bitwise equal to the fused call on the devices
outcore runs on (tests/trace/test_foreach.py checks it).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

aten = torch.ops.aten

# Foreach ops whose plain counterpart has another name.
_RENAMED = {"norm": "linalg_vector_norm"}


def iter_tensors(values) -> Iterator[torch.Tensor]:
    """Tensors in an op's args/kwargs/outputs, in order (lists and tuples flattened)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            for w in v:
                if isinstance(w, torch.Tensor):
                    yield w


@functools.lru_cache(maxsize=None)
def written_arguments(func) -> tuple[tuple[int, str], ...]:
    """(position, name) of every argument the op mutates (schema `Tensor(a!)`)."""
    out = []
    for pos, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            out.append((pos, arg.name))
    return tuple(out)


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


def is_foreach(func) -> bool:
    return func._schema.name.startswith("aten::_foreach_")


@dataclass(frozen=True)
class _Plan:
    """How one foreach overload maps onto its plain op."""
    plain: Any
    positional: int                      # how many element values go positionally
    keyword_names: tuple[str, ...]       # names for the remaining values
    list_positions: tuple[int, ...]      # values taken element-wise from a list
    scalar_tensor_positions: tuple[int, ...]  # 1-D tensor of scalars taken element-wise


def _kind(type_str: str) -> str:
    t = type_str.replace("?", "")
    if t in ("Tensor",):
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


@functools.lru_cache(maxsize=None)
def _plan(func) -> _Plan | None:
    schema = func._schema
    base = schema.name[len("aten::_foreach_"):]
    inplace = base.endswith("_")
    stem = base.rstrip("_")
    plain_name = _RENAMED.get(stem, stem) + ("_" if inplace else "")
    packet = getattr(aten, plain_name, None)
    if packet is None:
        return None
    # The element type of each foreach argument.
    elem_kinds, lists, scalar_tensors = [], [], []
    overload = func._overloadname
    for pos, arg in enumerate(schema.arguments):
        t = str(arg.type)
        if t.endswith("[]") and t.rstrip("?").startswith(("Tensor", "Scalar", "float", "int")):
            lists.append(pos)
            elem_kinds.append(_kind(t[:-2]))
        elif overload == "Tensor" and arg.name == "scalars":
            scalar_tensors.append(pos)
            elem_kinds.append("scalar")
        else:
            elem_kinds.append(_kind(t))
    for name in packet.overloads():
        if "out" in name:
            continue
        cand = getattr(packet, name)
        plain_args = cand._schema.arguments
        if len(plain_args) < len(elem_kinds):
            continue
        if any(_kind(str(p.type)) != k and not (k == "other" and _kind(str(p.type)) == "other")
               for p, k in zip(plain_args, elem_kinds)):
            continue
        if any(not p.has_default_value() for p in plain_args[len(elem_kinds):]):
            continue
        positional = sum(1 for p in plain_args[:len(elem_kinds)] if not p.kwarg_only)
        keywords = tuple(p.name for p in plain_args[positional:len(elem_kinds)])
        return _Plan(cand, positional, keywords, tuple(lists), tuple(scalar_tensors))
    return None


def split_foreach(func, args, kwargs) -> list[tuple[Callable, tuple, dict]] | None:
    """One (plain op, args, kwargs) per tensor of a `_foreach_*` call, or None when the op
    cannot be split (it then runs whole)."""
    plan = _plan(func)
    if plan is None:
        return None
    values = _bind(func, args, kwargs)
    count = len(values[plan.list_positions[0]]) if plan.list_positions else 0
    scalar_lists = {pos: values[pos].tolist() for pos in plan.scalar_tensor_positions}
    calls = []
    for i in range(count):
        elem = list(values)
        for pos in plan.list_positions:
            elem[pos] = values[pos][i]
        for pos, scalars in scalar_lists.items():
            elem[pos] = scalars[i]
        pos_args = tuple(elem[:plan.positional])
        kw = dict(zip(plan.keyword_names, elem[plan.positional:]))
        calls.append((plan.plain, pos_args, kw))
    return calls


def returns_nothing(func) -> bool:
    return len(func._schema.returns) == 0
