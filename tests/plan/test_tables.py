"""Per-trace tables (feasibility.per_trace): computed once per Trace, never shared
mutably, forgotten with the trace."""
import gc

from outcore.plan import feasibility
from outcore.plan.feasibility import needs, occupancy, release_points
from outcore.plan.policies.window import access_table

from .helpers import build


def _trace():
    return build({"x": (8, "input"), "w": (4, "param"), "h": 8, "y": 8},
                 ["fwd r:x r:w c:h", "act r:h c:y", "upd @optimizer w:w r:y"])


def test_tables_are_computed_once_and_a_caller_cannot_change_them():
    t = _trace()
    first = occupancy(t)
    first[0] += 10**9                  # a caller scribbling on its copy
    assert occupancy(t)[0] == first[0] - 10**9
    for table in (release_points, needs):
        got = table(t)
        got.append(-1)
        assert table(t) == got[:-1]
    assert access_table(t) is access_table(t)         # shared, and a tuple of tuples
    assert all(isinstance(part, tuple) for part in access_table(t))
    # `only` picks arrays: computed each time, never cached under the plain table.
    assert occupancy(t, only=lambda a: False) == [0, 0, 0]
    assert occupancy(t) != [0, 0, 0]


def test_the_entry_goes_with_its_trace():
    t = _trace()
    needs(t)
    key = id(t)
    assert key in feasibility._TABLES
    del t
    gc.collect()
    assert key not in feasibility._TABLES
