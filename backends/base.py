"""The one contract every backend implements, and the values that cross it.

The core calls backends only through :class:`Backend` and never branches on which one it has.
Graceful stop is kept apart from cleanup (Nomad's StopTask/DestroyTask): ``stop`` asks, ``stop``
with ``force`` kills, ``destroy`` removes what is left and is idempotent. Exits are pushed to the
core through the ``notify`` callback given to ``watch`` (event-driven, no polling by the core);
``inspect`` tells what happened.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import ClassVar, Protocol

from lmrunner.cgroups.base import CgroupRef
from lmrunner.config import MachinetypeConfig
from lmrunner.model import Handle, Limits, Mount, Placement

__all__ = ["Handle"]  # defined with the other shared value types; part of this contract

#: Labels on every engine object an LM creates, so nothing is ever found by guessing names.
LABEL_FACTORY = "org.lmrunner.factory"
LABEL_NAME = "org.lmrunner.lm.name"
LABEL_UUID = "org.lmrunner.lm.uuid"


class Health(StrEnum):
    OK = "ok"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class Probe:
    """Whether a backend's engine can be used here, and why not. ``probe()`` never raises."""

    health: Health
    version: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class MachineSpec:
    """Everything a backend needs to start one LM; built by the core."""

    uuid: str
    name: str  # also the LM's hostname
    machinetype: str
    image: str
    command: tuple[str, ...]
    limits: Limits
    mounts: tuple[Mount, ...]
    env: Mapping[str, str]
    labels: Mapping[str, str]
    directory: Path  # the LM directory (logs the backend keeps go here too)
    owner: tuple[int, int]  # uid, gid the LM runs as
    stop_grace_seconds: int
    #: the backend's own options (its ``options_type``), made by the core from the machinetype
    options: object = field(default_factory=lambda: NoOptions())
    cgroup: LmCgroup | None = None  # None: this host gives lmrunner no cgroups
    #: The LM's own filesystem, mounted here (its ``mnt`` folder), of ``limits.disk_bytes``: the
    #: backend puts every place the payload writes on it (work folders, a container's writable
    #: paths, a VM's disk images). None: the LM has none and its writes are not bounded.
    disk: Path | None = None


class OptionsType(Protocol):
    """What a backend declares as ``options_type``: a frozen dataclass of its own options, made
    from the machinetype the configuration schema built and checked (one validation; the
    backend never checks them again). ``files_dir``: where relative file names resolve."""

    def from_machinetype(self, mt: MachinetypeConfig, files_dir: Path) -> object: ...


@dataclass(frozen=True, slots=True)
class NoOptions:
    """The options of a backend that has none of its own."""

    @classmethod
    def from_machinetype(cls, mt: MachinetypeConfig, files_dir: Path) -> NoOptions:
        return cls()


@dataclass(frozen=True, slots=True)
class LmCgroup:
    """The LM's cgroup, created and limited by the core before ``start``.

    Process backends start their engine inside it (``procs_files``, or through ``launcher``
    where systemd owns the tree: see :mod:`lmrunner.process`); engines that make their own
    cgroup (Docker) put it below ``engine_path``, or in the systemd slice ``engine_unit`` with
    Docker's systemd cgroup driver. Usage, OOM kills and the final kill/removal are the core's
    business.
    """

    ref: CgroupRef
    procs_files: tuple[Path, ...]
    engine_path: str | None
    engine_unit: str | None = None
    #: Given the account to run as, the argv prefix that runs an engine inside the LM under
    #: that account (it switches the user itself); None where ``procs_files`` do the job.
    launcher: Callable[[tuple[int, int] | None], tuple[str, ...]] | None = None


class EngineState(StrEnum):
    RUNNING = "running"
    EXITED = "exited"
    MISSING = "missing"  # the engine has no object for this LM (any more)


@dataclass(frozen=True, slots=True)
class Status:
    """What the engine says about an LM: facts only. Which outcome they make is
    :func:`lmrunner.lifecycle.decide_outcome`'s business alone.

    ``exit_code`` follows one convention for every backend: the LM's (its init's, its engine
    process's) exit status, 128 + N when a signal N ended it; None when unknown.
    """

    state: EngineState
    exit_code: int | None = None
    #: the engine saw the kernel's OOM killer end the LM (the core also counts its cgroup's)
    oom_killed: bool = False
    ended_at: float | None = None
    detail: str = ""
    #: the engine itself failed or lost the LM, in its own words (its daemon restarted, it could
    #: not run the image, QEMU stopped on a host error); None when the LM ended by itself
    engine_fault: str | None = None


@dataclass(frozen=True, slots=True)
class Owned:
    """An engine object carrying lmrunner's labels (for adoption and orphan reconciliation)."""

    uuid: str
    name: str
    factory: str
    handle: Handle  # enough to destroy it, even without a record


class Backend(Protocol):
    """A kind of logical machine: Docker container, Apptainer container, QEMU VM, or the fake."""

    name: ClassVar[str]
    placement: ClassVar[Placement]
    #: its options, built by the core for each LM (:class:`OptionsType`)
    options_type: ClassVar[OptionsType]
    #: True when LMs run as the factory's unprivileged sc_user (their joboutputs belong to it).
    runs_as_sc_user: ClassVar[bool]

    def probe(self) -> Probe:
        """Can this engine be used now? Never raises."""

    def memory_overhead(self) -> int:
        """Bytes the engine itself needs in an LM's cgroup beyond the LM's memory (a VM's
        QEMU); the core adds them to the cgroup's memory limit. 0 for containers."""

    def disk_overhead(self, disk_bytes: int) -> int:
        """Bytes the engine's own files need on an LM's filesystem beyond ``disk_bytes`` (a VM's
        disk image metadata, and room for joboutputs beside a full scratch disk); the core
        makes the filesystem this much larger. 0 for containers."""

    def validate(self, spec: MachineSpec) -> None:
        """Raise :class:`~lmrunner.errors.SpecError`, before any side effect, if it cannot run."""

    def start(self, spec: MachineSpec) -> Handle:
        """Create and start the LM; return once the engine has it.

        Raises:
            StartError: it could not be started (nothing is left behind).
        """

    def recover(self, uuid: str, handle: Handle) -> None:
        """Reattach to a running LM after a daemon restart (resume exit notifications).

        Raises:
            MachineNotFound: the engine no longer has it.
        """

    def inspect(self, uuid: str, handle: Handle) -> Status:
        """The LM's state as the engine sees it; MISSING when the object is gone."""

    def stop(self, uuid: str, handle: Handle, *, force: bool = False) -> None:
        """Ask the LM to stop (SIGTERM, ACPI power button), or kill it at once with ``force``.

        Returns without waiting; the exit arrives through ``watch``.
        """

    def destroy(self, uuid: str, handle: Handle) -> None:
        """Remove whatever the engine still holds for the LM. Idempotent: gone is success."""

    def list_owned(self) -> list[Owned]:
        """Engine objects carrying lmrunner's labels, of any factory."""

    def watch(self, notify: Callable[[str], None]) -> None:
        """Start calling ``notify(uuid)`` (from any thread) whenever an LM may have ended."""

    def close(self) -> None:
        """Stop watching and release connections."""
