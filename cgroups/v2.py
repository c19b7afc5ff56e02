"""The cgroup v2 (unified hierarchy) driver.

Interface files and their rules are in the kernel's ``Documentation/admin-guide/cgroup-v2.rst``:

- "Top-down Constraint": a controller can be enabled in a cgroup's ``cgroup.subtree_control``
  only when it is enabled in its parent's; so the parent of lmrunner's cgroups enables
  ``+cpu +memory +pids`` for its children, and its own parent does for it when lmrunner created it.
- "No Internal Process Constraint": controllers can only be enabled in a cgroup that holds no
  process (the root is exempt); the LM cgroups are leaves and the parent holds no process.
- ``cgroup.kill`` (Linux 5.14), ``memory.peak`` (5.19), ``memory.swap.max`` (with swap
  accounting) may be missing; they are used when present.
"""

from __future__ import annotations

import time
from pathlib import Path

from lmrunner.cgroups.base import (
    CgroupRef,
    Usage,
    check_name,
    check_owned,
    child_names,
    chown_for_delegation,
    cpu_max_value,
    cpus_to_weight,
    memory_high,
    mkdir_chain,
    parent_relative,
    read_int,
    read_keyed,
    read_text,
    remove_if_empty,
    rmdir_tree,
    sigkill_until_empty,
    signal_all,
    tree_pids,
    write,
)
from lmrunner.errors import CgroupError, CgroupUnsupported

#: Controllers each LM cgroup needs.
CONTROLLERS = ("cpu", "memory", "pids")
HIERARCHY = "unified"


def read_usage(path: Path) -> Usage:
    """Read cpu.stat, memory.current, memory.peak, memory.events and memory.stat of ``path``.

    ``memory.events`` counts the cgroup's whole subtree (``memory.events.local`` does not).
    """
    cpu = read_keyed(path / "cpu.stat")
    events = read_keyed(path / "memory.events")
    stat = read_keyed(path / "memory.stat")
    peak_file = path / "memory.peak"
    return Usage(
        cpu_seconds=cpu.get("usage_usec", 0) / 1e6,
        memory_bytes=read_int(path / "memory.current"),
        memory_peak_bytes=read_int(peak_file) if peak_file.exists() else None,
        oom_kills=events.get("oom_kill", 0),
        throttled_periods=cpu.get("nr_throttled", 0),
        throttled_seconds=cpu.get("throttled_usec", 0) / 1e6,
        memory_anon_bytes=stat.get("anon"),
        memory_file_bytes=stat.get("file"),
    )


def kill_tree(path: Path, timeout: float) -> None:
    """Write ``cgroup.kill`` where the kernel has it (Linux >= 5.14: the whole subtree, no fork
    race), then SIGKILL whatever is left until the subtree is empty."""
    if not path.exists():
        return
    if (path / "cgroup.kill").exists():
        write(path / "cgroup.kill", 1)
    sigkill_until_empty(lambda: tree_pids([path]), timeout, str(path))


class V2Controller:
    """cgroup v2 driver: LM cgroups at ``root``/``parent``/``name``."""

    version = 2
    manager = "cgroupfs"

    def __init__(self, root: Path, parent: str, *, memory_high_ratio: float = 0.95) -> None:
        self.root = root
        self.parent_rel = parent_relative(parent)
        self.parent = root / self.parent_rel
        self.memory_high_ratio = memory_high_ratio
        self._created: list[Path] = []

    # -- layout --------------------------------------------------------------------------------

    def _enable(self, cgroup: Path) -> None:
        """Enable the needed controllers in ``cgroup``'s subtree_control (only missing ones)."""
        available = read_text(cgroup / "cgroup.controllers").split()
        missing = [c for c in CONTROLLERS if c not in available]
        if missing:
            raise CgroupUnsupported(
                f"cgroup v2 controllers {missing} are not available in {cgroup} "
                "(not enabled by its parent, or not delegated to lmrunner)"
            )
        enabled = read_text(cgroup / "cgroup.subtree_control").split()
        todo = [c for c in CONTROLLERS if c not in enabled]
        if todo:
            write(cgroup / "cgroup.subtree_control", " ".join(f"+{c}" for c in todo))

    def _ensure_parent(self) -> None:
        created = mkdir_chain(self.root, self.parent_rel)
        self._created.extend(created)
        # Top-down: each created directory's parent must hand the controllers down to it.
        for path in [c.parent for c in created] + [self.parent]:
            self._enable(path)

    def create(self, name: str) -> CgroupRef:
        check_name(name)
        self._ensure_parent()
        path = self.parent / name
        try:
            path.mkdir(exist_ok=True)
        except OSError as err:
            raise CgroupError(f"cannot create cgroup {path}: {err.strerror or err}") from err
        return CgroupRef(version=2, name=name, paths=((HIERARCHY, str(path)),))

    def _path(self, ref: CgroupRef) -> Path:
        if ref.version != 2:
            raise CgroupError(f"cgroup v{ref.version} reference given to the v2 driver")
        check_owned(ref, self.parent_rel)
        path = ref.path(HIERARCHY)
        if path is None:
            raise CgroupError(f"{ref.name}: reference has no unified path")
        return path

    # -- limits --------------------------------------------------------------------------------

    def set_limits(
        self, ref: CgroupRef, *, cpus: float, memory_bytes: int, swap_bytes: int = 0, pids: int
    ) -> None:
        """Write cpu.max, cpu.weight, memory.max/high/swap.max, memory.oom.group and pids.max.

        ``memory.high`` is set a little below ``memory.max`` so the kernel reclaims and throttles
        before the OOM killer fires; ``memory.oom.group`` = 1 makes the OOM killer take the whole
        LM rather than one of its processes (cgroup-v2.rst, "Memory Interface Files").
        """
        if memory_bytes <= 0 or pids <= 0 or swap_bytes < 0:
            raise ValueError("memory_bytes and pids must be positive, swap_bytes >= 0")
        path = self._path(ref)
        write(path / "cpu.max", cpu_max_value(cpus))
        write(path / "cpu.weight", cpus_to_weight(cpus))
        # Raise max before high (high above max is allowed; the other order may reclaim twice).
        write(path / "memory.max", memory_bytes)
        write(path / "memory.high", memory_high(memory_bytes, self.memory_high_ratio))
        if (path / "memory.swap.max").exists():
            write(path / "memory.swap.max", swap_bytes)
        write(path / "memory.oom.group", 1)
        write(path / "pids.max", pids)

    # -- processes -----------------------------------------------------------------------------

    def add_pid(self, ref: CgroupRef, pid: int) -> None:
        write(self._path(ref) / "cgroup.procs", pid)

    def pids(self, ref: CgroupRef) -> frozenset[int]:
        return tree_pids([self._path(ref)])

    def usage(self, ref: CgroupRef) -> Usage:
        return read_usage(self._path(ref))

    def _set_frozen(self, ref: CgroupRef, frozen: bool, timeout: float) -> None:
        path = self._path(ref)
        write(path / "cgroup.freeze", int(frozen))
        deadline = time.monotonic() + timeout
        while read_keyed(path / "cgroup.events").get("frozen", int(frozen)) != int(frozen):
            if time.monotonic() > deadline:
                raise CgroupError(f"{path}: cgroup.events never showed frozen {int(frozen)}")
            time.sleep(0.01)

    def freeze(self, ref: CgroupRef, *, timeout: float = 10.0) -> None:
        """Write cgroup.freeze = 1 and wait until cgroup.events says ``frozen 1``."""
        self._set_frozen(ref, True, timeout)

    def thaw(self, ref: CgroupRef, *, timeout: float = 10.0) -> None:
        """Write cgroup.freeze = 0 and wait until cgroup.events says ``frozen 0``."""
        self._set_frozen(ref, False, timeout)

    def kill(self, ref: CgroupRef, *, timeout: float = 10.0) -> None:
        """Write ``cgroup.kill`` (Linux >= 5.14: kills the subtree, no fork race); else SIGKILL.

        Either way, wait until no process is left in the subtree.
        """
        kill_tree(self._path(ref), timeout)

    def signal(self, ref: CgroupRef, signum: int) -> int:
        return signal_all(self.pids(ref), signum)

    def delegate(self, ref: CgroupRef, uid: int, gid: int) -> None:
        chown_for_delegation(self._path(ref), uid, gid)

    def procs_files(self, ref: CgroupRef) -> tuple[Path, ...]:
        return (self._path(ref) / "cgroup.procs",)

    def names(self) -> list[str]:
        return child_names([self.parent])

    def existing(self, name: str) -> CgroupRef | None:
        check_name(name)
        path = self.parent / name
        return CgroupRef(2, name, ((HIERARCHY, str(path)),)) if path.is_dir() else None

    def engine_path(self, ref: CgroupRef) -> str | None:
        return "/" + self._path(ref).relative_to(self.root).as_posix()

    def engine_unit(self, ref: CgroupRef) -> str | None:
        return None  # no systemd unit: engines take the path

    def launcher(self, ref: CgroupRef, user: tuple[int, int] | None) -> tuple[str, ...]:
        return ()  # processes enter by writing procs_files

    def remove(self, ref: CgroupRef) -> None:
        rmdir_tree(self._path(ref))

    def release(self) -> None:
        remove_if_empty(self._created)
        self._created = [p for p in self._created if p.exists()]
