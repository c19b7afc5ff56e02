"""Frozen value types shared by the core and every backend."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Mount:
    """A host path the backend must make visible inside the LM."""

    source: Path
    target: PurePosixPath
    read_only: bool = True


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a backend puts an LM's files inside the LM (Vac's placement, vac.md §4.5).

    Existing payloads find their files at these paths, so they must not change per backend.
    """

    user_data: PurePosixPath
    machinefeatures: PurePosixPath
    jobfeatures: PurePosixPath
    joboutputs: PurePosixPath
    cvmfs: PurePosixPath = PurePosixPath("/cvmfs")


@dataclass(frozen=True, slots=True)
class Limits:
    """An LM's resources: what its cgroup enforces and what machine/job features announce."""

    processors: int
    memory_bytes: int
    swap_bytes: int
    disk_bytes: int
    hs06: float | None  # None: the factory has no hs06_per_processor

    @property
    def memory_mib(self) -> int:
        return self.memory_bytes // MIB
