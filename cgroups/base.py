"""The one cgroup controller interface, its data types, unit conversions and file helpers.

Both drivers (:mod:`lmrunner.cgroups.v1`, :mod:`lmrunner.cgroups.v2`) implement
:class:`CgroupController`; :func:`lmrunner.cgroups.open_controller` is the only place choosing one.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from lmrunner.errors import CgroupError

#: The CFS period lmrunner uses (the kernel's default, 100 ms).
CFS_PERIOD_US = 100_000
#: cgroup v1 ``cpu.shares`` per processor (the kernel's default for one cgroup is 1024).
SHARES_PER_CPU = 1024
SHARES_MIN, SHARES_MAX = 2, 262_144
#: cgroup v2 ``cpu.weight`` per processor (the default weight 100 stands for one processor).
WEIGHT_PER_CPU = 100
WEIGHT_MIN, WEIGHT_MAX = 1, 10_000
#: ``memory.high`` as a fraction of ``memory.max`` (reclaim pressure starts a little below the cap).
MEMORY_HIGH_RATIO = 0.95
PAGE_SIZE = 4096


# --- unit conversions -------------------------------------------------------------------------


def cpus_to_quota(cpus: float, period_us: int = CFS_PERIOD_US) -> tuple[int, int]:
    """Processors -> CFS ``(quota_us, period_us)``: ``cpus`` processors' worth of time per period.

    This is v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` and the two fields of v2 ``cpu.max``.
    The kernel refuses quotas below 1 ms (``Documentation/scheduler/sched-bwc.rst``).
    """
    if cpus <= 0:
        raise ValueError(f"cpus must be positive, not {cpus}")
    return max(1000, round(cpus * period_us)), period_us


def cpu_max_value(cpus: float, period_us: int = CFS_PERIOD_US) -> str:
    """Processors -> the text of v2 ``cpu.max``: ``"$QUOTA $PERIOD"`` (cgroup-v2.rst, "CPU")."""
    quota, period = cpus_to_quota(cpus, period_us)
    return f"{quota} {period}"


def cpus_to_shares(cpus: float) -> int:
    """Processors -> v1 ``cpu.shares`` (1024 per processor, within the kernel's [2, 262144])."""
    return min(SHARES_MAX, max(SHARES_MIN, round(cpus * SHARES_PER_CPU)))


def cpus_to_weight(cpus: float) -> int:
    """Processors -> v2 ``cpu.weight`` (100 per processor, within [1, 10000], cgroup-v2.rst)."""
    return min(WEIGHT_MAX, max(WEIGHT_MIN, round(cpus * WEIGHT_PER_CPU)))


def shares_to_weight(shares: int) -> int:
    """v1 ``cpu.shares`` [2, 262144] -> v2 ``cpu.weight`` [1, 10000], runc's linear mapping."""
    shares = min(SHARES_MAX, max(SHARES_MIN, shares))
    return 1 + ((shares - SHARES_MIN) * (WEIGHT_MAX - 1)) // (SHARES_MAX - SHARES_MIN)


def memory_high(memory_bytes: int, ratio: float = MEMORY_HIGH_RATIO) -> int:
    """``memory.high`` for a ``memory.max``: ``ratio`` of it, rounded down to whole pages."""
    return max(PAGE_SIZE, int(memory_bytes * ratio) // PAGE_SIZE * PAGE_SIZE)


# --- data types -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CgroupRef:
    """One cgroup lmrunner created, by its path in each hierarchy (persisted in the state store).

    ``paths`` holds ``(hierarchy, absolute path)`` pairs: ``("unified", ...)`` on v2, one per
    controller on v1 (joined controllers such as ``cpu,cpuacct`` share a path).
    """

    version: int
    name: str
    paths: tuple[tuple[str, str], ...]

    def path(self, hierarchy: str) -> Path | None:
        """The cgroup's directory in ``hierarchy``, or None when it has none there."""
        for key, value in self.paths:
            if key == hierarchy:
                return Path(value)
        return None

    def unique_paths(self) -> list[Path]:
        """Every distinct directory of this cgroup, in a stable order."""
        return [Path(p) for p in dict.fromkeys(value for _, value in self.paths)]

    def to_json(self) -> str:
        """This reference as a JSON object (``from_json`` reads it back)."""
        return json.dumps({"version": self.version, "name": self.name, "paths": dict(self.paths)})

    @classmethod
    def from_json(cls, text: str) -> CgroupRef:
        """Read a reference written by :meth:`to_json`."""
        try:
            data = json.loads(text)
            paths = tuple((str(k), str(v)) for k, v in dict(data["paths"]).items())
            return cls(version=int(data["version"]), name=str(data["name"]), paths=paths)
        except (ValueError, KeyError, TypeError) as err:
            raise CgroupError(f"not a cgroup reference: {text!r}") from err


@dataclass(frozen=True, slots=True)
class Usage:
    """What a cgroup has used so far (counters are cumulative since it was created)."""

    cpu_seconds: float
    memory_bytes: int
    #: Highest memory use seen by the kernel, None when the kernel does not keep it.
    memory_peak_bytes: int | None
    oom_kills: int
    throttled_periods: int
    throttled_seconds: float
    memory_anon_bytes: int | None = None
    memory_file_bytes: int | None = None


@runtime_checkable
class CgroupController(Protocol):
    """Creates, limits, watches and removes lmrunner's cgroups (one per logical machine).

    Every cgroup lives under one configured parent; the parent is created when missing and is
    removed by :meth:`release` only when this controller created it and it is empty. Cgroups that
    lmrunner did not create are never written to (except enabling controllers in the
    ``cgroup.subtree_control`` of the parent's parent when lmrunner created the parent, v2).
    """

    version: int
    #: Who makes the cgroups: "cgroupfs" (lmrunner's own directories) or "systemd" (slices).
    manager: str

    def create(self, name: str) -> CgroupRef:
        """Create the cgroup ``name`` under the parent (an existing one is reused)."""
        ...

    def set_limits(
        self, ref: CgroupRef, *, cpus: float, memory_bytes: int, swap_bytes: int, pids: int
    ) -> None:
        """Cap CPU (processors, hard quota plus a proportional weight), memory, swap, tasks."""
        ...

    def add_pid(self, ref: CgroupRef, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the cgroup."""
        ...

    def pids(self, ref: CgroupRef) -> frozenset[int]:
        """Processes in the cgroup and its descendants (empty when it no longer exists)."""
        ...

    def usage(self, ref: CgroupRef) -> Usage:
        """Read the cgroup's accounting counters."""
        ...

    def freeze(self, ref: CgroupRef) -> None:
        """Stop every process in the cgroup until :meth:`thaw`."""
        ...

    def thaw(self, ref: CgroupRef) -> None:
        """Let the processes of a frozen cgroup run again."""
        ...

    def kill(self, ref: CgroupRef, *, timeout: float = 10.0) -> None:
        """SIGKILL every process in the cgroup and wait until it is empty (or raise)."""
        ...

    def signal(self, ref: CgroupRef, signum: int) -> int:
        """Send ``signum`` to every process in the cgroup's subtree; return how many got it."""
        ...

    def delegate(self, ref: CgroupRef, uid: int, gid: int) -> None:
        """Hand the cgroup to an account, so its processes may make and limit sub-cgroups
        (cgroup-v2.rst "Delegation": the directory and its procs/threads/subtree_control)."""
        ...

    def procs_files(self, ref: CgroupRef) -> tuple[Path, ...]:
        """The ``cgroup.procs`` files a new process writes itself into (one per hierarchy).

        :func:`enter` writes them from a forked child before it executes anything, so nothing
        the LM runs exists outside its cgroup for a moment.
        """
        ...

    def names(self) -> list[str]:
        """Names of the cgroups under the parent (in any hierarchy), sorted."""
        ...

    def existing(self, name: str) -> CgroupRef | None:
        """A reference to the cgroup ``name`` under the parent if it exists (nothing is made)."""
        ...

    def engine_path(self, ref: CgroupRef) -> str | None:
        """The cgroup's path from the hierarchy root(s) (``/lmrunner/lm-...``), for engines that
        create their own cgroup below it (Docker's ``cgroup_parent``); None when the path differs
        between v1 hierarchies and no single path names it."""
        ...

    def engine_unit(self, ref: CgroupRef) -> str | None:
        """The cgroup's systemd slice when systemd manages it (Docker's systemd cgroup driver
        takes it as ``cgroup_parent``); None when the cgroup is a plain directory."""
        ...

    def launcher(self, ref: CgroupRef, user: tuple[int, int] | None) -> tuple[str, ...]:
        """An argv prefix that starts a command inside the cgroup as ``user`` (it switches the
        account itself), for hosts where a process may not write itself into ``procs_files``
        (systemd's tree); empty where :meth:`procs_files` does the job."""
        ...

    def remove(self, ref: CgroupRef) -> None:
        """Remove the (empty) cgroup; removing one that is gone already is no error."""
        ...

    def release(self) -> None:
        """Remove the parent if this controller created it and it is empty."""
        ...


# --- helpers shared by the drivers ------------------------------------------------------------


def read_text(path: Path) -> str:
    """Read an interface file; raise CgroupError naming it."""
    try:
        return path.read_text()
    except OSError as err:
        raise CgroupError(f"cannot read {path}: {err.strerror or err}") from err


def read_int(path: Path) -> int:
    """Read an interface file holding one integer."""
    text = read_text(path).strip()
    try:
        return int(text)
    except ValueError as err:
        raise CgroupError(f"{path}: expected an integer, read {text!r}") from err


def read_keyed(path: Path) -> dict[str, int]:
    """Read a flat keyed file (``key value`` per line: cpu.stat, memory.events, memory.stat)."""
    result: dict[str, int] = {}
    for line in read_text(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            result[parts[0]] = int(parts[1])
    return result


def write(path: Path, value: str | int) -> None:
    """Write one value to an interface file in a single write(2); raise CgroupError naming it."""
    try:
        with path.open("w") as handle:
            handle.write(str(value))
    except OSError as err:
        raise CgroupError(f"cannot write {value!r} to {path}: {err.strerror or err}") from err


def read_procs(path: Path) -> set[int]:
    """PIDs in ``path``/cgroup.procs (empty when the cgroup is gone)."""
    try:
        text = (path / "cgroup.procs").read_text()
    except FileNotFoundError:
        return set()
    except OSError as err:
        raise CgroupError(f"cannot read {path / 'cgroup.procs'}: {err.strerror}") from err
    return {int(p) for p in text.split()}


def walk_cgroups(path: Path) -> Iterator[Path]:
    """``path`` and every cgroup below it, children before their parents."""
    try:
        children = sorted(p for p in path.iterdir() if p.is_dir())
    except FileNotFoundError:
        return
    for child in children:
        yield from walk_cgroups(child)
    yield path


def tree_pids(paths: Iterable[Path]) -> frozenset[int]:
    """PIDs in every cgroup at or below ``paths``."""
    found: set[int] = set()
    for top in paths:
        for cgroup in walk_cgroups(top):
            found |= read_procs(cgroup)
    return frozenset(found)


def rmdir_tree(path: Path) -> None:
    """Remove cgroup ``path`` and its sub-cgroups (they must hold no process); idempotent."""
    for cgroup in walk_cgroups(path):
        try:
            cgroup.rmdir()
        except FileNotFoundError:
            continue
        except OSError as err:
            raise CgroupError(f"cannot remove cgroup {cgroup}: {err.strerror or err}") from err


def mkdir_chain(top: Path, relative: Path) -> list[Path]:
    """Create ``top``/``relative`` directory by directory; return those this call created."""
    created: list[Path] = []
    current = top
    for part in relative.parts:
        current = current / part
        try:
            current.mkdir()
        except FileExistsError:
            continue
        except OSError as err:
            raise CgroupError(f"cannot create cgroup {current}: {err.strerror or err}") from err
        created.append(current)
    return created


def remove_if_empty(paths: Iterable[Path]) -> None:
    """rmdir each of ``paths`` (deepest first) that holds no sub-cgroup and no process."""
    for path in sorted(paths, key=lambda p: len(p.parts), reverse=True):
        try:
            path.rmdir()
        except FileNotFoundError:
            continue
        except OSError as err:
            if err.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise CgroupError(f"cannot remove cgroup {path}: {err.strerror}") from err


def check_name(name: str) -> None:
    """Refuse a cgroup name that is not one plain directory name."""
    if not name or "/" in name or name in (".", "..") or "\n" in name:
        raise CgroupError(f"invalid cgroup name {name!r}")


def check_owned(ref: CgroupRef, parent: Path) -> None:
    """Refuse a reference whose directories are not ``<...>/<parent>/<name>`` (not ours)."""
    for path in ref.unique_paths():
        if path.name != ref.name or not path.parent.as_posix().endswith("/" + parent.as_posix()):
            raise CgroupError(f"refusing to touch {path}: not an lmrunner cgroup under {parent}")


def sigkill_until_empty(
    list_pids: Callable[[], frozenset[int]],
    timeout: float,
    what: str,
    *,
    around: Callable[[Callable[[], None]], None] | None = None,
) -> None:
    """SIGKILL what ``list_pids`` returns until it returns nothing; CgroupError after ``timeout``.

    ``around``, when given, wraps each round of signals (v1 freezes the cgroup around it so no
    process can fork a child that escapes the round).
    """
    deadline = time.monotonic() + timeout

    def one_round() -> None:
        for pid in list_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except OSError as err:
                raise CgroupError(f"cannot kill {pid} in {what}: {err.strerror}") from err

    while list_pids():
        if around is None:
            one_round()
        else:
            around(one_round)
        if time.monotonic() > deadline:
            raise CgroupError(f"{what} still has processes {sorted(list_pids())} after {timeout} s")
        time.sleep(0.02)


def signal_all(pids: Iterable[int], signum: int) -> int:
    """Send ``signum`` to each of ``pids``; those that are gone already are skipped."""
    count = 0
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            continue
        except OSError as err:
            raise CgroupError(f"cannot signal {pid}: {err.strerror or err}") from err
        count += 1
    return count


#: The files a delegatee must own besides the directory (cgroup-v2.rst, "Delegation").
DELEGATED_FILES = ("cgroup.procs", "cgroup.threads", "cgroup.subtree_control", "tasks")


def chown_for_delegation(path: Path, uid: int, gid: int) -> None:
    """chown a cgroup directory and the delegated files it has (absent ones are skipped)."""
    try:
        os.chown(path, uid, gid)
        for name in DELEGATED_FILES:
            if (path / name).exists():
                os.chown(path / name, uid, gid)
    except OSError as err:
        raise CgroupError(f"cannot delegate {path} to uid {uid}: {err.strerror or err}") from err


def child_names(parents: Iterable[Path]) -> list[str]:
    """Names of the sub-directories (cgroups) of each of ``parents``, merged and sorted."""
    found: set[str] = set()
    for parent in parents:
        try:
            found.update(p.name for p in parent.iterdir() if p.is_dir())
        except FileNotFoundError:
            continue
    return sorted(found)


def enter(procs_files: Iterable[Path]) -> None:
    """Move the calling process into a cgroup by writing ``0`` (itself) to its procs files.

    Meant for a forked child before exec (``preexec_fn``): only raw ``os`` calls, no locks.
    """
    for path in procs_files:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


def live_usage(ref: CgroupRef) -> tuple[float, int] | None:
    """CPU seconds and current memory of a cgroup, read straight from its files (for ``ps``,
    which must stay light: no mountinfo, no controller); None when the cgroup is gone."""
    try:
        if ref.version == 2:
            path = ref.path("unified")
            if path is None:
                return None
            cpu = read_keyed(path / "cpu.stat").get("usage_usec", 0) / 1e6
            return cpu, read_int(path / "memory.current")
        cpuacct, memory = ref.path("cpuacct"), ref.path("memory")
        if cpuacct is None or memory is None:
            return None
        return read_int(cpuacct / "cpuacct.usage") / 1e9, read_int(memory / "memory.usage_in_bytes")
    except CgroupError:
        return None


def parent_relative(parent: str) -> Path:
    """The configured parent (``"lmrunner"``, ``"a/b"``) as a relative path, checked."""
    rel = Path(parent.strip("/"))
    if not rel.parts or any(p in (".", "..") for p in rel.parts):
        raise CgroupError(f"invalid cgroup parent {parent!r}")
    return rel


def keyed_value(values: Mapping[str, int], key: str, default: int = 0) -> int:
    """``values[key]`` or ``default``."""
    return values.get(key, default)
