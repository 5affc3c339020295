"""`on_demand._signature`, the key under which `created_bytes` remembers what an op's
meta kernel said: two argument lists get the same key exactly when a meta kernel sees
the same of them (tensor type, layout, dtype, sizes and strides; plain values by type
and value; the nesting of lists and tuples). A collision would give one op the room
another needed (over the budget); a key that differs for equal arguments only costs a
meta call."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from outcore.run.on_demand import _signature

DTYPES = [torch.float32, torch.float64]


def _describe(x):
    """What a meta kernel sees of `x`, spelt out as nested, tagged tuples (the reference
    the key is compared with)."""
    if isinstance(x, torch.Tensor):
        return ("tensor", type(x).__name__, str(x.dtype), tuple(x.shape), tuple(x.stride()))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_describe(y) for y in x))
    if isinstance(x, dict):
        return ("dict", tuple((k, _describe(v)) for k, v in x.items()))
    return ("value", type(x).__name__, x)


@st.composite
def tensors(draw):
    # A small pool, so that two drawn lists often agree but for one thing: (3, 2) made so
    # or as the transpose of a (2, 3) (other strides), one of two dtypes, a 0-dim one.
    shape = draw(st.sampled_from([(3, 2), (2, 3), (), (2,)]))
    t = torch.zeros(shape, dtype=draw(st.sampled_from(DTYPES)))
    if len(shape) == 2 and draw(st.booleans()):
        t = torch.zeros(shape[::-1], dtype=t.dtype).t()
    return t


plain = st.one_of(st.integers(0, 1), st.sampled_from([0.0, 1.0]), st.booleans(), st.none(),
                  st.sampled_from(DTYPES))
arguments = st.recursive(st.one_of(plain, tensors()),
                         lambda inner: st.one_of(st.lists(inner, max_size=2),
                                                 st.lists(inner, max_size=2).map(tuple)),
                         max_leaves=4)


@st.composite
def pairs(draw):
    """Two argument lists: the second a copy of the first (new tensors of the same sizes
    and strides) where, one time in four each, a leaf is drawn again, a list becomes a
    tuple (or a tuple a list), a 2-D tensor takes the other layout: most pairs differ in
    a thing or two, or in none."""
    first = tuple(draw(st.lists(arguments, max_size=2)))

    def copy(x):
        change = draw(st.integers(0, 3))
        if isinstance(x, (list, tuple)):
            kind = (tuple if type(x) is list else list) if change == 0 else type(x)
            return kind(copy(y) for y in x)
        if change == 0:
            return draw(st.one_of(plain, tensors()))
        if isinstance(x, torch.Tensor):
            strides = x.stride()
            if change == 1 and x.dim() == 2:        # the same sizes, the other layout
                strides = (1, x.shape[0]) if x.is_contiguous() else (x.shape[1], 1)
            return torch.empty_strided(x.shape, strides, dtype=x.dtype)
        return x
    return first, copy(first)


@settings(max_examples=400, deadline=None)
@given(pairs(), st.dictionaries(st.sampled_from(["alpha", "dim"]), plain, max_size=2))
def test_two_argument_lists_share_a_key_exactly_when_a_meta_kernel_sees_the_same(pair, kw):
    a, b = pair
    assert (_signature(a) == _signature(b)) == (_describe(a) == _describe(b))
    assert (_signature((a, kw)) == _signature((b, kw))) == (_describe(a) == _describe(b))
    hash(_signature(a))


def test_values_equal_in_python_but_of_other_types_get_other_keys():
    """`full((2,), 1)` makes int64, `full((2,), 1.0)` float32 and `full((2,), True)` bool;
    1 == 1.0 == True in Python, and so are their hashes."""
    keys = {_signature(((2,), v)) for v in (1, 1.0, True)}
    assert len(keys) == 3
    assert _signature(([torch.zeros(2)], torch.zeros(2))) != _signature(
        ([torch.zeros(2), torch.zeros(2)],))
