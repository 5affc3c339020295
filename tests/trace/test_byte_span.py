"""aten.byte_span and aten.covers, which the recorder uses to tell a storage's first uses
overwrote it (`_ArrayLog.overwritten`, NOTE [Durable state] rule 17), against brute force
on random views."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from outcore.aten import byte_span, covers


@st.composite
def _views(draw):
    """A random strided view of a 4x6 float64 storage: a slice per dimension (a step
    in the second; empty ones too), maybe transposed."""
    base = torch.zeros(4, 6, dtype=torch.float64)
    rows = sorted(draw(st.lists(st.integers(0, 4), min_size=2, max_size=2)))
    cols = sorted(draw(st.lists(st.integers(0, 6), min_size=2, max_size=2)))
    step = draw(st.integers(1, 3))
    view = base[rows[0]:rows[1], cols[0]:cols[1]:step]
    return view.t() if draw(st.booleans()) else view


@settings(max_examples=200, deadline=None)
@given(_views())
def test_byte_span_holds_every_byte_a_view_reaches_and_no_more(view):
    reached = sorted(view.storage_offset() + sum(i * s for i, s in zip(index, view.stride()))
                     for index in torch.cartesian_prod(*[torch.arange(n) for n in view.shape])
                     .reshape(-1, view.dim()).tolist()) if view.numel() else []
    start, end = byte_span(view)
    size = view.element_size()
    if reached:
        assert (start, end) == (reached[0] * size, (reached[-1] + 1) * size)
    else:
        assert start == end


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=6),
       st.integers(0, 40), st.integers(0, 40))
def test_covers_says_whether_the_pieces_leave_no_byte_of_the_range_out(pieces, start, end):
    pieces = [(min(a, b), max(a, b)) for a, b in pieces]
    held = {byte for first, last in pieces for byte in range(first, last)}
    assert covers(pieces, end, start) == all(b in held for b in range(start, end))
