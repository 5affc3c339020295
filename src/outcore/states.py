"""Where an array is: one set of states shared by the planner, the checker and the executor.

    ABSENT ──create──▶ FAST ──SWAP_OUT──▶ OUT ──WAIT──▶ SLOW ──SWAP_IN──▶ IN ──ready──▶ FAST
                        │  ▲                │                               (executor only;
                        │  └── cancel ──────┘                                the planner counts
                        └──FREE──▶ DEAD   (any state ──storage dies──▶ DEAD)  a swap-in FAST)

The planner and `outcore.check` walk a schedule through ABSENT, FAST, OUT, SLOW and DEAD;
the executor (`outcore.run.residency`) moves real storages through FAST, OUT, SLOW, IN
and DEAD. Fast-tier bytes are held in FAST, OUT and IN (`OCCUPIES_FAST`); only
SLOW holds bytes on the slow tier alone.
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

    def __str__(self) -> str:
        return self.value


ABSENT, FAST, OUT, SLOW, IN, DEAD = (Residence.ABSENT, Residence.FAST, Residence.OUT,
                                     Residence.SLOW, Residence.IN, Residence.DEAD)
OCCUPIES_FAST = frozenset((FAST, OUT, IN))
