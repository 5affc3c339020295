"""Planned against measured traffic of one replayed iteration, array by array.

The schedule says how many bytes each array moves; the StepLog of a replayed iteration
(run/steplog.py) says what the movers did. They differ for known reasons, and
`compare` sorts every byte into one of them:

  boundary   moved before the step's first function: state the last iteration left on
             another tier than the schedule starts with (Replayer.start)
  extra      moved in the step beyond the array's planned moves: safety evictions of
             storages the plan freed while something still held them, swap-outs of
             arrays the plan expected clean, on-demand fallbacks
  skipped    planned but not moved: arrays under min_move_bytes stay resident, and
             arrays the step had not touched yet when their action came
  unbound    storages the trace does not know: a tensor the loop keeps from one step to
             the next (a variable still holding the last step's output) that the plan
             made room by moving; none when every storage the step touches is the
             record's

planned + boundary + extra - skipped + unbound = measured, per direction.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..plan.schedule import SWAP_IN, SWAP_OUT
from ..units import format_bytes


@dataclass(frozen=True)
class Traffic:
    planned: dict        # direction -> bytes
    measured: dict
    boundary: dict
    extra: dict
    skipped: dict
    unbound: dict
    extra_by_category: dict      # (direction, category) -> bytes
    skipped_by_category: dict

    def lines(self) -> list[str]:
        out = []
        for d, word in (("in", "read"), ("out", "written")):
            out.append(f"{word}: planned {format_bytes(self.planned[d])}, measured "
                       f"{format_bytes(self.measured[d])}")
            if self.boundary[d]:
                out.append(f"  + {format_bytes(self.boundary[d])} between iterations (state the "
                           "last step left on another tier than this one starts with)")
            if self.extra[d]:
                out.append(f"  + {format_bytes(self.extra[d])} beyond the plan: safety evictions "
                           "of storages still held, arrays written again ("
                           + _by_category(self.extra_by_category, d) + ")")
            if self.skipped[d]:
                out.append(f"  - {format_bytes(self.skipped[d])} planned but not moved: arrays "
                           "under min_move_bytes stay resident, and arrays the step had not "
                           "touched yet when their move came are not moved ("
                           + _by_category(self.skipped_by_category, d) + ")")
            if self.unbound[d]:
                out.append(f"  + {format_bytes(self.unbound[d])} of storages the record does "
                           "not know")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _by_category(table: dict, direction: str) -> str:
    rows = sorted(((n, cat) for (d, cat), n in table.items() if d == direction), reverse=True)
    return ", ".join(f"{cat.replace('_', ' ')} {format_bytes(n)}" for n, cat in rows)


def compare(trace, schedule, log) -> Traffic:
    nbytes = [a.nbytes for a in trace.arrays]
    category = [a.category for a in trace.arrays]
    # 1. Planned moves per array and direction.
    planned = Counter()
    for step in schedule.begin + schedule.end:
        for act in step:
            if act.kind == SWAP_IN:
                planned[(act.array, "in")] += 1
            elif act.kind == SWAP_OUT:
                planned[(act.array, "out")] += 1
    # 2. Measured moves: those before the first function are the boundary's.
    first = log.times[0] if len(log) else log.end
    done = Counter()
    boundary = {"in": 0, "out": 0}
    unbound = {"in": 0, "out": 0}
    measured = {"in": 0, "out": 0}
    for aid, direction, n, start, _ in log.transfers:
        measured[direction] += n
        if start < first:
            boundary[direction] += n
        elif aid < 0:
            unbound[direction] += n
        else:
            done[(aid, direction)] += 1
    # 3. Per array: moves beyond the plan, and planned moves that did not happen.
    extra, skipped = {"in": 0, "out": 0}, {"in": 0, "out": 0}
    extra_cat, skipped_cat = Counter(), Counter()
    for key in set(planned) | set(done):
        aid, direction = key
        diff = (done[key] - planned[key]) * nbytes[aid]
        if diff > 0:
            extra[direction] += diff
            extra_cat[(direction, category[aid])] += diff
        elif diff < 0:
            skipped[direction] -= diff
            skipped_cat[(direction, category[aid])] -= diff
    total = {d: sum(nbytes[a] * c for (a, dd), c in planned.items() if dd == d) for d in ("in", "out")}
    return Traffic(total, measured, boundary, extra, skipped, unbound, dict(extra_cat),
                   dict(skipped_cat))
