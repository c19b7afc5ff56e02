"""LM cgroups on a systemd host: each LM is a transient slice that systemd makes and limits.

On a host where systemd is PID 1 the cgroup tree has one writer per subtree (systemd.io
"Control Group APIs and Delegation"): lmrunner must not make directories in systemd's part of the
tree, and a delegated subtree under lmrunner's own service cannot hold the LMs either, because a
systemd before 254 (no ``DelegateSubgroup=``) puts the restarted daemon back into the service's
top cgroup, which the "no internal processes" rule then refuses (``status=219/CGROUP``, seen in
the test bed), so ``systemctl restart`` could never adopt running LMs. And Docker's systemd cgroup
driver, the default on such hosts, takes only a slice as ``cgroup_parent``.

So every LM is ``<prefix>-<name>.slice`` (``lmrunner-lm_<uuid>.slice`` in ``lmrunner.slice``),
made through systemd's D-Bus API (``StartTransientUnit``) and limited with unit properties
(``CPUQuota=``, ``MemoryMax=``, ``TasksMax=``...) that systemd writes to ``cpu.max``,
``memory.max`` and ``pids.max``. Engines put their processes in it the systemd way: Docker's
systemd driver makes ``docker-<id>.scope`` in the slice (:meth:`engine_unit`); process engines
(Apptainer, QEMU) are started through ``systemd-run --scope --slice=...`` (:meth:`launcher`), so
nothing they run exists outside the LM for a moment. The slices are not part of
``lmrunner.service``: stopping or restarting the daemon leaves them and their LMs alone.

lmrunner only reads the slices' interface files (usage, processes); it signals processes with
kill(2) and asks systemd for everything else. Talking to systemd goes through ``busctl`` and
``systemctl`` (argv lists through the one subprocess runner), which every systemd host has.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lmrunner.cgroups.base import (
    CgroupRef,
    Usage,
    check_name,
    cpus_to_weight,
    memory_high,
    parent_relative,
    signal_all,
    tree_pids,
    write,
)
from lmrunner.cgroups.v2 import HIERARCHY, V2Controller, kill_tree, read_usage
from lmrunner.errors import CgroupError, CommandError
from lmrunner.runner import Completed
from lmrunner.runner import run as run_command

Run = Callable[..., Completed]

DBUS_DEST = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1")
MANAGER = "org.freedesktop.systemd1.Manager"
SUFFIX = ".slice"
#: How long a new slice may take to appear in the cgroup tree (systemd realises it on its job).
APPEAR_SECONDS = 5.0


def is_systemd_booted(run_dir: Path = Path("/run/systemd/system")) -> bool:
    """Whether systemd is the init system (sd_booted(3): this directory exists)."""
    return run_dir.is_dir()


class SystemdController:
    """LM cgroups as transient systemd slices under ``<prefix>.slice``."""

    version = 2
    manager = "systemd"

    def __init__(
        self,
        root: Path,
        parent: str,
        *,
        memory_high_ratio: float = 0.95,
        run: Run = run_command,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # "/lmrunner" -> lmrunner.slice; "/a/b" -> a-b.slice inside a.slice (systemd's own
        # naming: each "-" in a slice's name is one level of the tree).
        parts = parent_relative(parent).parts
        if any("-" in p or "." in p for p in parts):
            raise CgroupError(f"cgroup parent {parent!r}: no '-' or '.' in a systemd slice name")
        self.prefix = "-".join(parts)
        self.root = root
        self.slice = self.prefix + SUFFIX
        self.parent = root / Path(*self._slice_path(self.prefix))
        self.memory_high_ratio = memory_high_ratio
        self._run = run
        self._clock = clock
        # LMs made by the cgroupfs v2 driver before this host switched to systemd's slices (an
        # upgrade with LMs running): read, killed and removed where they are, never made anew.
        self._plain = V2Controller(root, parent, memory_high_ratio=memory_high_ratio)

    def _legacy(self, ref: CgroupRef) -> bool:
        return ref.version == 2 and ref.path(HIERARCHY) == self._plain.parent / ref.name

    @staticmethod
    def _slice_path(stem: str) -> list[str]:
        """The cgroup directories of the slice ``<stem>.slice``: a-b-c -> a.slice/a-b.slice/..."""
        pieces = stem.split("-")
        return ["-".join(pieces[: i + 1]) + SUFFIX for i in range(len(pieces))]

    # -- names ------------------------------------------------------------------------------------

    def unit(self, name: str) -> str:
        """The LM's slice. Its name's "-" become "_": a "-" would nest it one slice deeper."""
        check_name(name)
        if "_" in name or "\\" in name or "." in name:
            raise CgroupError(f"invalid LM cgroup name {name!r} for a systemd slice")
        return f"{self.prefix}-{name.replace('-', '_')}{SUFFIX}"

    def _name_of(self, directory: str) -> str | None:
        head = self.prefix + "-"
        if not directory.startswith(head) or not directory.endswith(SUFFIX):
            return None
        return directory[len(head) : -len(SUFFIX)].replace("_", "-") or None

    def _ref(self, name: str) -> CgroupRef:
        return CgroupRef(2, name, ((HIERARCHY, str(self.parent / self.unit(name))),))

    def _path(self, ref: CgroupRef) -> Path:
        expected = self.parent / self.unit(ref.name)
        if ref.version != 2 or ref.path(HIERARCHY) != expected:
            raise CgroupError(f"refusing {ref.paths}: not an lmrunner slice in {self.slice}")
        return expected

    # -- talking to systemd ----------------------------------------------------------------------

    def _call(self, what: str, argv: Sequence[str], ok: Callable[[CommandError], bool]) -> None:
        try:
            self._run(list(argv), timeout=30.0)
        except CommandError as err:
            if not ok(err):
                raise CgroupError(f"{what}: {err}") from err

    def _start_slice(self, unit: str, name: str) -> None:
        argv = [
            "busctl", "call", "--quiet", *DBUS_DEST, MANAGER, "StartTransientUnit",
            "ssa(sv)a(sa(sv))", unit, "fail",
            "2", "Description", "s", f"lmrunner logical machine {name}",
            "CollectMode", "s", "inactive-or-failed",  # a failed one is not kept loaded
            "0",
        ]  # fmt: skip
        # One made before a restart of the daemon is adopted as it is (systemd 252 says "Unit
        # X was already loaded or has a fragment file."; others "... already exists").
        self._call(f"cannot make the slice {unit}", argv, lambda e: "already" in str(e))

    # -- the controller ------------------------------------------------------------------------

    def create(self, name: str) -> CgroupRef:
        unit = self.unit(name)
        self._start_slice(unit, name)
        path = self.parent / unit
        deadline = self._clock() + APPEAR_SECONDS
        while not path.is_dir():  # systemd realises the slice when it runs the job
            if self._clock() > deadline:
                raise CgroupError(f"{unit}: systemd made no cgroup {path} in {APPEAR_SECONDS:g} s")
            time.sleep(0.01)
        return self._ref(name)

    def set_limits(
        self, ref: CgroupRef, *, cpus: float, memory_bytes: int, swap_bytes: int = 0, pids: int
    ) -> None:
        """The same limits as the v2 driver writes, as systemd unit properties (runtime only:
        the slice goes with the LM). systemd has no property for ``memory.oom.group`` on a slice;
        an OOM kill still shows in the slice's ``memory.events``."""
        if memory_bytes <= 0 or pids <= 0 or swap_bytes < 0:
            raise ValueError("memory_bytes and pids must be positive, swap_bytes >= 0")
        self._path(ref)
        unit = self.unit(ref.name)
        argv = [
            "systemctl", "set-property", "--runtime", unit,
            f"CPUQuota={cpus * 100:g}%", f"CPUWeight={cpus_to_weight(cpus)}",
            f"MemoryMax={memory_bytes}",
            f"MemoryHigh={memory_high(memory_bytes, self.memory_high_ratio)}",
            f"MemorySwapMax={swap_bytes}", f"TasksMax={pids}",
        ]  # fmt: skip
        self._call(f"cannot limit {unit}", argv, lambda e: False)
        # The two files systemd never writes on a slice, so lmrunner may: an OOM kill takes
        # the whole LM, as with the v2 driver (no unit property says this for a slice).
        path = self._path(ref)
        if (path / "memory.oom.group").exists():
            write(path / "memory.oom.group", 1)

    def add_pid(self, ref: CgroupRef, pid: int) -> None:
        """Put a running process in the LM: a transient scope holding it, in the slice."""
        self._path(ref)
        unit = self.unit(ref.name)
        scope = f"{unit[: -len(SUFFIX)]}-p{pid}.scope"
        argv = [
            "busctl", "call", "--quiet", *DBUS_DEST, MANAGER, "StartTransientUnit",
            "ssa(sv)a(sa(sv))", scope, "fail",
            "2", "Slice", "s", unit, "PIDs", "au", "1", str(pid),
            "0",
        ]  # fmt: skip
        self._call(f"cannot move process {pid} into {unit}", argv, lambda e: False)

    def launcher(self, ref: CgroupRef, user: tuple[int, int] | None) -> tuple[str, ...]:
        """``systemd-run --scope`` in the LM's slice: it makes a scope holding itself, switches
        to ``user`` and executes the engine, which thus never runs outside the LM. The scope is
        delegated so an engine may make its own sub-cgroups in it."""
        self._path(ref)
        unit = self.unit(ref.name)
        scope = f"{unit[: -len(SUFFIX)]}-{secrets.token_hex(4)}.scope"
        argv = ["systemd-run", "--scope", "--quiet", "--collect", f"--unit={scope}",
                f"--slice={unit}", "--property=Delegate=yes"]  # fmt: skip
        if user is not None and user != (0, 0):
            argv += [f"--uid={user[0]}", f"--gid={user[1]}"]
        return (*argv, "--")

    def pids(self, ref: CgroupRef) -> frozenset[int]:
        if self._legacy(ref):
            return self._plain.pids(ref)
        return tree_pids([self._path(ref)])

    def usage(self, ref: CgroupRef) -> Usage:
        if self._legacy(ref):
            return self._plain.usage(ref)
        return read_usage(self._path(ref))

    def _systemctl(self, verb: str, ref: CgroupRef, *options: str) -> None:
        unit = self.unit(ref.name)
        self._path(ref)
        self._call(f"systemctl {verb} {unit}", ["systemctl", verb, *options, unit], lambda e: False)

    def freeze(self, ref: CgroupRef, *, timeout: float = 10.0) -> None:
        self._systemctl("freeze", ref)

    def thaw(self, ref: CgroupRef, *, timeout: float = 10.0) -> None:
        self._systemctl("thaw", ref)

    def kill(self, ref: CgroupRef, *, timeout: float = 10.0) -> None:
        """``cgroup.kill`` on the slice (Linux >= 5.14: the whole subtree, no fork race; systemd
        never writes it on a slice), then SIGKILL what is left until it is empty."""
        if self._legacy(ref):
            self._plain.kill(ref, timeout=timeout)
            return
        kill_tree(self._path(ref), timeout)

    def signal(self, ref: CgroupRef, signum: int) -> int:
        return signal_all(self.pids(ref), signum)

    def delegate(self, ref: CgroupRef, uid: int, gid: int) -> None:
        """Nothing to do: the engine's scope is delegated by :meth:`launcher`."""
        self._path(ref)

    def procs_files(self, ref: CgroupRef) -> tuple[Path, ...]:
        return ()  # processes enter through the launcher, never by writing systemd's files

    def names(self) -> list[str]:
        try:
            found = {self._name_of(p.name) for p in self.parent.iterdir() if p.is_dir()}
        except FileNotFoundError:
            found = set()
        return sorted({n for n in found if n is not None} | set(self._plain.names()))

    def existing(self, name: str) -> CgroupRef | None:
        ref = self._ref(name)
        return ref if self._path(ref).is_dir() else self._plain.existing(name)

    def engine_path(self, ref: CgroupRef) -> str | None:
        return "/" + self._path(ref).relative_to(self.root).as_posix()

    def engine_unit(self, ref: CgroupRef) -> str | None:
        self._path(ref)
        return self.unit(ref.name)

    def remove(self, ref: CgroupRef) -> None:
        """Stop the (empty) slice: systemd removes its cgroup. A slice gone already is fine."""
        if self._legacy(ref):
            self._plain.remove(ref)
            return
        unit = self.unit(ref.name)
        self._path(ref)
        self._call(
            f"cannot remove {unit}",
            ["systemctl", "stop", unit],
            lambda err: "not loaded" in str(err) or err.returncode == 5,
        )

    def release(self) -> None:
        """``<prefix>.slice`` is systemd's (it stays loaded); a cgroupfs parent left by LMs of
        before the switch goes once empty."""
        self._plain.release()
