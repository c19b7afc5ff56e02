"""The cgroup v1 driver (legacy hosts, and the v1 controllers of hybrid hosts).

Kernel documentation: ``Documentation/admin-guide/cgroup-v1/`` — ``cgroups.rst`` (hierarchies,
``cgroup.procs``), ``memory.rst``, ``cpuacct.rst``, ``freezer-subsystem.rst``, ``pids.rst``, and
``Documentation/scheduler/sched-bwc.rst`` (``cpu.cfs_quota_us``). Quirks handled here:

- Each controller is its own hierarchy (or a few are joined, e.g. ``cpu,cpuacct``): an LM cgroup is
  one directory per hierarchy, and a process is added to each.
- The parent lives under this process's own cgroup in each hierarchy (``/proc/self/cgroup``):
  hybrid hosts put the machine's processes in a child *memory* cgroup, and a cgroup created
  beside it would escape that cgroup's limit.
- memory.rst 2.5: ``memory.memsw.limit_in_bytes`` (memory + swap, present only with swap
  accounting) must never be below ``memory.limit_in_bytes``, so the order of the two writes
  depends on whether the limit goes up or down.
- memory.rst 10: ``memory.oom_control`` reports ``oom_kill`` (Linux >= 4.13).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from lmrunner.cgroups.base import (
    CgroupRef,
    Usage,
    check_name,
    check_owned,
    child_names,
    chown_for_delegation,
    cpus_to_quota,
    cpus_to_shares,
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
from lmrunner.errors import CgroupError

#: Hierarchies an LM cgroup must have, and those used when mounted.
REQUIRED = ("cpu", "cpuacct", "memory", "pids")
OPTIONAL = ("freezer",)


class V1Controller:
    """cgroup v1 driver: LM cgroups at ``<mount>/<own cgroup>/<parent>/<name>`` per hierarchy.

    ``bases`` maps each controller to the directory the parent goes under (the hierarchy's mount
    point joined with this process's own cgroup there); joined controllers share a directory.
    """

    version = 1
    manager = "cgroupfs"

    def __init__(
        self,
        bases: Mapping[str, Path],
        parent: str,
        *,
        roots: Mapping[str, Path] | None = None,
        others: Mapping[str, Path] | None = None,
    ) -> None:
        """``roots``: each hierarchy's mount point (for :meth:`engine_path`); ``others``: bases
        of the mounted hierarchies lmrunner does not use (cpuset, blkio, ``name=systemd``...),
        where an engine given :meth:`engine_path` as its parent creates directories too."""
        missing = [c for c in REQUIRED if c not in bases]
        if missing:
            raise CgroupError(f"cgroup v1 hierarchies {missing} are not mounted")
        self.bases = {c: bases[c] for c in (*REQUIRED, *OPTIONAL) if c in bases}
        self.roots = dict(roots or {})
        self.others = dict(others or {})
        self.parent_rel = parent_relative(parent)
        self._created: list[Path] = []

    def _parent_dirs(self) -> dict[str, Path]:
        return {c: base / self.parent_rel for c, base in self.bases.items()}

    def create(self, name: str) -> CgroupRef:
        check_name(name)
        paths: list[tuple[str, str]] = []
        for controller, base in self.bases.items():
            created = mkdir_chain(base, self.parent_rel / name)
            self._created.extend(created)
            paths.append((controller, str(base / self.parent_rel / name)))
        # The LM directories themselves are removed by remove(), not release().
        lm_dirs = {Path(p) for _, p in paths}
        self._created = [p for p in dict.fromkeys(self._created) if p not in lm_dirs]
        return CgroupRef(version=1, name=name, paths=tuple(paths))

    def _paths(self, ref: CgroupRef) -> dict[str, Path]:
        if ref.version != 1:
            raise CgroupError(f"cgroup v{ref.version} reference given to the v1 driver")
        check_owned(ref, self.parent_rel)
        return {k: Path(v) for k, v in ref.paths}

    def _one(self, ref: CgroupRef, controller: str) -> Path:
        path = self._paths(ref).get(controller)
        if path is None:
            raise CgroupError(f"{ref.name}: no {controller} hierarchy in the reference")
        return path

    def set_limits(
        self, ref: CgroupRef, *, cpus: float, memory_bytes: int, swap_bytes: int = 0, pids: int
    ) -> None:
        """Write the CFS quota and period, cpu.shares, the memory (+swap) limits and pids.max."""
        if memory_bytes <= 0 or pids <= 0 or swap_bytes < 0:
            raise ValueError("memory_bytes and pids must be positive, swap_bytes >= 0")
        cpu = self._one(ref, "cpu")
        quota, period = cpus_to_quota(cpus)
        write(cpu / "cpu.cfs_period_us", period)
        write(cpu / "cpu.cfs_quota_us", quota)
        write(cpu / "cpu.shares", cpus_to_shares(cpus))
        self._set_memory(self._one(ref, "memory"), memory_bytes, memory_bytes + swap_bytes)
        write(self._one(ref, "pids") / "pids.max", pids)

    @staticmethod
    def _set_memory(path: Path, limit: int, memsw: int) -> None:
        memsw_file = path / "memory.memsw.limit_in_bytes"
        if not memsw_file.exists():
            write(path / "memory.limit_in_bytes", limit)
            return
        # memsw >= limit at every moment (memory.rst 2.5): lower limit first, raise memsw first.
        if limit <= read_int(path / "memory.limit_in_bytes"):
            write(path / "memory.limit_in_bytes", limit)
            write(memsw_file, memsw)
        else:
            write(memsw_file, memsw)
            write(path / "memory.limit_in_bytes", limit)

    def add_pid(self, ref: CgroupRef, pid: int) -> None:
        """Write ``pid`` to cgroup.procs in every hierarchy (each joined directory once)."""
        for path in ref.unique_paths():
            self._paths(ref)
            write(path / "cgroup.procs", pid)

    def pids(self, ref: CgroupRef) -> frozenset[int]:
        """Processes in the cgroup in any of its hierarchies (a process moved out of one counts)."""
        self._paths(ref)
        return tree_pids(ref.unique_paths())

    def usage(self, ref: CgroupRef) -> Usage:
        """Read cpuacct.usage (ns), cpu.stat, memory.usage/max_usage_in_bytes, oom_control, stat.

        ``memory.stat``'s ``total_rss``/``total_cache`` include sub-cgroups (memory.rst 5.2).
        """
        cpu_stat = read_keyed(self._one(ref, "cpu") / "cpu.stat")
        memory = self._one(ref, "memory")
        oom = read_keyed(memory / "memory.oom_control")
        stat = read_keyed(memory / "memory.stat")
        return Usage(
            cpu_seconds=read_int(self._one(ref, "cpuacct") / "cpuacct.usage") / 1e9,
            memory_bytes=read_int(memory / "memory.usage_in_bytes"),
            memory_peak_bytes=read_int(memory / "memory.max_usage_in_bytes"),
            oom_kills=oom.get("oom_kill", 0),
            throttled_periods=cpu_stat.get("nr_throttled", 0),
            throttled_seconds=cpu_stat.get("throttled_time", 0) / 1e9,
            memory_anon_bytes=stat.get("total_rss", stat.get("rss")),
            memory_file_bytes=stat.get("total_cache", stat.get("cache")),
        )

    def _freezer(self, ref: CgroupRef) -> Path:
        path = self._paths(ref).get("freezer")
        if path is None:
            raise CgroupError("no freezer hierarchy is mounted: cannot freeze")
        return path

    def _set_state(self, path: Path, state: str, timeout: float) -> None:
        """Write freezer.state and wait for it (FREEZING is transient, freezer-subsystem.rst)."""
        write(path / "freezer.state", state)
        deadline = time.monotonic() + timeout
        while read_text(path / "freezer.state").strip() != state:
            if time.monotonic() > deadline:
                raise CgroupError(f"{path}: freezer.state did not reach {state}")
            time.sleep(0.01)

    def freeze(self, ref: CgroupRef, *, timeout: float = 10.0) -> None:
        self._set_state(self._freezer(ref), "FROZEN", timeout)

    def thaw(self, ref: CgroupRef, *, timeout: float = 10.0) -> None:
        self._set_state(self._freezer(ref), "THAWED", timeout)

    def kill(self, ref: CgroupRef, *, timeout: float = 10.0) -> None:
        """SIGKILL every process until the cgroup is empty.

        With a freezer hierarchy each round runs frozen (freeze, signal, thaw), so no process
        can fork a new one between listing and signalling; frozen tasks die when thawed.
        """
        paths = self._paths(ref)
        freezer = paths.get("freezer")
        around: Callable[[Callable[[], None]], None] | None = None
        if freezer is not None and (freezer / "freezer.state").exists():

            def around(signal_all: Callable[[], None]) -> None:
                self._set_state(freezer, "FROZEN", timeout)
                try:
                    signal_all()
                finally:
                    self._set_state(freezer, "THAWED", timeout)

        sigkill_until_empty(lambda: self.pids(ref), timeout, ref.name, around=around)

    def signal(self, ref: CgroupRef, signum: int) -> int:
        return signal_all(self.pids(ref), signum)

    def delegate(self, ref: CgroupRef, uid: int, gid: int) -> None:
        for path in self._paths(ref).values():
            chown_for_delegation(path, uid, gid)

    def procs_files(self, ref: CgroupRef) -> tuple[Path, ...]:
        """``tasks``, not ``cgroup.procs``: the new process writes itself in right after fork,
        when it has one thread, so moving that thread moves the process, without the global
        threadgroup lock whose RCU grace period makes a ``cgroup.procs`` write cost 10-16 ms
        on the project's hosts against 0.5 ms (``cgroup_procs_write_start``, kernel/cgroup)."""
        self._paths(ref)
        return tuple(path / "tasks" for path in ref.unique_paths())

    def names(self) -> list[str]:
        return child_names(self._parent_dirs().values())

    def existing(self, name: str) -> CgroupRef | None:
        check_name(name)
        paths = tuple((c, str(d / name)) for c, d in self._parent_dirs().items())
        if not any(Path(p).is_dir() for _, p in paths):
            return None
        return CgroupRef(version=1, name=name, paths=paths)

    def engine_unit(self, ref: CgroupRef) -> str | None:
        return None  # no systemd unit: engines take the path

    def launcher(self, ref: CgroupRef, user: tuple[int, int] | None) -> tuple[str, ...]:
        return ()  # processes enter by writing procs_files

    def engine_path(self, ref: CgroupRef) -> str | None:
        relative = set()
        for controller, path in self._paths(ref).items():
            root = self.roots.get(controller)
            if root is None or not path.is_relative_to(root):
                return None
            relative.add(path.relative_to(root).as_posix())
        return "/" + relative.pop() if len(relative) == 1 else None

    def remove(self, ref: CgroupRef) -> None:
        self._paths(ref)
        for path in ref.unique_paths():
            rmdir_tree(path)
        # An engine told engine_path() (runc) made this LM's directory in every hierarchy; the
        # empty ones it left in hierarchies lmrunner does not use go with the LM.
        for base in dict.fromkeys(self.others.values()):
            leftover = base / self.parent_rel / ref.name
            if leftover.is_dir():
                remove_if_empty([leftover])

    def release(self) -> None:
        remove_if_empty(self._created)
        self._created = [p for p in self._created if p.exists()]
