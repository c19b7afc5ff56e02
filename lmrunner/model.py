"""Frozen value types shared by the core and every backend."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

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
    #: Base URL of an HTTP metadata service serving the same folders (Vac's VMs:
    #: http://169.254.169.253/machinefeatures, .../jobfeatures, PUT .../joboutputs/NAME).
    mjf_url: str | None = None


#: Vac's placement for Docker LMs (vac.md §4.5); VM guests (vcbusybox) mount their shares there too.
ETC_PLACEMENT = Placement(
    user_data=PurePosixPath("/user_data"),
    machinefeatures=PurePosixPath("/etc/machinefeatures"),
    jobfeatures=PurePosixPath("/etc/jobfeatures"),
    joboutputs=PurePosixPath("/var/spool/joboutputs"),
)


@dataclass(frozen=True, slots=True)
class Limits:
    """An LM's resources: what its cgroup enforces and what machine/job features announce."""

    processors: int
    memory_bytes: int
    swap_bytes: int
    disk_bytes: int
    hs06: float | None  # None: the factory has no hs06_per_processor
    pids: int = 0  # most processes/threads at once (0: unlimited)

    @property
    def memory_mib(self) -> int:
        return self.memory_bytes // MIB


@dataclass(frozen=True, slots=True)
class Handle:
    """What a backend needs to find its LM again after a daemon restart (persisted as JSON).

    ``version`` lets a newer backend read handles an older one wrote. ``data`` is the backend's
    own; ``engine`` holds facts for people (``lmrunner ps --json``: a VM's accelerator, a
    container's id), short strings by name, and is never read back by the backend.
    """

    version: int
    data: Mapping[str, Any]
    engine: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        value: dict[str, Any] = {"version": self.version, "data": dict(self.data)}
        if self.engine:
            value["engine"] = dict(self.engine)
        return value

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Handle:
        engine = {str(k): str(v) for k, v in dict(value.get("engine") or {}).items()}
        return cls(int(value["version"]), dict(value["data"]), engine)
