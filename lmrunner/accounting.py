"""Per-LM accounting from measured usage, recorded once when an LM is finalised.

Vac sampled CPU once a minute, reported the memory *allocation* as used, measured wall time to the
last heartbeat, and dropped short runs (vac.md §9). Here every LM that ended gets one record,
short and failed ones included (flagged); CPU and peak memory come from the LM's cgroup, wall time
runs from start to the engine's end time.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Flag(enum.StrEnum):
    """Why a record may deserve a second look (kept, never dropped)."""

    SHORT = "short"  # ended within fizzle_seconds
    FAILED = "failed"  # never started (no wall time)
    UNMEASURED = "unmeasured"  # no cgroup counters: CPU and memory are unknown
    OOM = "oom"  # the kernel killed something in it for memory


@dataclass(frozen=True, slots=True)
class AccountingRecord:
    """One finished LM, as accounting and APEL see it."""

    uuid: str
    name: str
    machinetype: str
    backend: str
    fqan: str | None  # accounting_fqan of the machinetype when the LM ended
    vo: str | None  # the VO of fqan (its first component), None without fqan
    processors: int
    hs06: float | None  # HS06 per processor (None: the factory has no hs06_per_processor)
    created: float
    started: float | None
    finished: float
    wall_seconds: float  # finished - started (0 when it never started)
    cpu_seconds: float | None  # None: not measured
    memory_peak_bytes: int | None
    oom_kills: int
    outcome_code: int
    outcome_text: str
    outcome_source: str
    flags: frozenset[Flag]
    memory_limit_bytes: int | None = None  # the LM's allocation (APEL MemoryVirtual, as Vac)
    disk_peak_bytes: int | None = None  # the most its own filesystem held (None: it had none)

    @property
    def hs06_hours(self) -> float:
        """HS06-hours delivered: wall hours x processors x HS06 per processor (1.0 when unset)."""
        return self.wall_seconds / 3600 * self.processors * (self.hs06 or 1.0)


def vo_of(fqan: str | None) -> str | None:
    """The VO of a VOMS FQAN: ``/lhcb/Role=pilot`` -> ``lhcb``; None for None or ``""``."""
    if not fqan:
        return None
    first = fqan.strip("/").split("/", 1)[0]
    return first or None
