"""Where an array is: one set of states shared by the planner, the checker and the executor.

    ABSENT ──create──▶ FAST ──SWAP_OUT──▶ OUT ──WAIT──▶ SLOW ──SWAP_IN──▶ IN ──ready──▶ FAST
                        │  ▲                │                               (executor only;
                        │  └── cancel ──────┘                                the planner counts
                        └──FREE──▶ DEAD   (any state ──storage dies──▶ DEAD)  a swap-in FAST)

    FAST ──plan frees a recomputed array──▶ DISCARDED ──remade by its repeat──▶ FAST
                                                               (executor only; the planner
                                                               sees it freed and a new
                                                               array created by the repeat)

    SLOW ──iteration ends──▶ MAPPED ──next iteration starts──▶ SLOW, or FAST if written
                                                               (executor only)

The planner and `outcore.check` walk a schedule through ABSENT, FAST, OUT, SLOW and DEAD;
the executor (`outcore.run.residency`) moves real storages through FAST, OUT, SLOW, IN
and DEAD (DISCARDED for an array it will recompute: NOTE [Replaying a recompute] in
run/recompute.py), and between iterations keeps SLOW storages MAPPED: readable and writable in
place through a private mapping of their bytes in the swap file (`outcore.run.mapped`).
Fast-tier bytes are held in FAST, OUT and IN (`OCCUPIES_FAST`); SLOW and MAPPED hold
their bytes on the slow tier (`ON_SLOW_TIER`; a mapped storage's pages that are read
sit in the page cache, written ones in anonymous memory, until the next iteration).
"""
from __future__ import annotations

import enum


class Residence(enum.Enum):
    ABSENT = "not created yet"
    FAST = "resident"
    OUT = "being swapped out"
    SLOW = "on the slow tier"
    IN = "being swapped in"
    DEAD = "freed"
    MAPPED = "on the slow tier, mapped for use between iterations"
    DISCARDED = "dropped, to be recomputed"

    def __str__(self) -> str:
        return self.value


ABSENT, FAST, OUT, SLOW, IN, DEAD, MAPPED, DISCARDED = (
    Residence.ABSENT, Residence.FAST, Residence.OUT, Residence.SLOW, Residence.IN,
    Residence.DEAD, Residence.MAPPED, Residence.DISCARDED)
OCCUPIES_FAST = frozenset((FAST, OUT, IN))
ON_SLOW_TIER = frozenset((SLOW, MAPPED))
