"""Each LM's cgroup through its life: made and limited before the engine starts anything,
measured while it runs, killed and removed after its end is recorded, and found again when a
crash left one unrecorded. The host's controller (v1 or v2) is chosen once, in
:func:`lmrunner.cgroups.open_controller`; this module only ever sees the interface.
"""

from __future__ import annotations

import logging
from functools import partial

from lmrunner.backends.base import LmCgroup
from lmrunner.cgroups import CgroupController, CgroupRef, Usage, open_controller
from lmrunner.config import FactoryConfig
from lmrunner.errors import CgroupError, CgroupUnsupported
from lmrunner.model import Limits
from lmrunner.state import LmRecord, Store

LOG = logging.getLogger(__name__)
#: The kernel's PID_MAX_LIMIT: a pids limit of 0 ("unlimited") becomes this.
PID_MAX = 4_194_304


def host_cgroups(factory: FactoryConfig) -> CgroupController | None:
    """The host's cgroup controller for ``factory.cgroup_parent``; None (logged) when this host
    gives lmrunner no cgroups, in which case only engines with their own limits enforce any."""
    try:
        return open_controller(
            factory.cgroup_parent,
            memory_high_ratio=factory.memory_high_ratio,
            manager=factory.cgroup_manager.value,
        )
    except CgroupUnsupported as err:
        LOG.warning("no cgroups for LMs (limits only where the engine sets them): %s", err)
        return None


def describe(controller: CgroupController | None, factory: FactoryConfig) -> str:
    """One line for logs and ``check``: which cgroups the LMs get, and who makes them."""
    if controller is None:
        return "cgroups: none usable (LMs run without lmrunner's limits)"
    line = f"cgroups: v{controller.version} under {factory.cgroup_parent}"
    if controller.manager == "systemd":
        return f"{line}, each LM a transient systemd slice"
    return f"{line}, directories made by lmrunner"


def cgroup_name(uuid: str) -> str:
    """An LM's cgroup: by uuid, since LM names are reused slot by slot."""
    return f"lm-{uuid}"


class LmCgroups:
    """The cgroups of one factory's LMs (all no-ops when the host gives lmrunner none)."""

    def __init__(self, controller: CgroupController | None, store: Store) -> None:
        self.controller = controller
        self.store = store

    def ref(self, record: LmRecord) -> CgroupRef | None:
        if record.cgroup is None:
            return None
        try:
            return CgroupRef.from_json(record.cgroup)
        except CgroupError as err:
            LOG.error("lm=%s: unreadable cgroup reference: %s", record.name, err)
            return None

    def usage(self, record: LmRecord) -> Usage | None:
        """The LM's cgroup counters, None when it has no cgroup (or they cannot be read)."""
        ref = self.ref(record)
        if ref is None or self.controller is None:
            return None
        try:
            return self.controller.usage(ref)
        except CgroupError as err:
            LOG.error("lm=%s: cannot read its cgroup: %s", record.name, err)
            return None

    def make(
        self,
        record: LmRecord,
        limits: Limits,
        *,
        owner: tuple[int, int],
        overhead: int = 0,
        delegate: bool = False,
    ) -> LmCgroup | None:
        """Create and limit the LM's cgroup (recorded before anything can run in it), and
        delegate it to the LM's account when asked. ``overhead``: the engine's own memory (a
        VM's QEMU) on top of the LM's."""
        if self.controller is None:
            return None
        ref = self.controller.create(cgroup_name(record.uuid))
        self.store.update(record.uuid, cgroup=ref.to_json())
        self.controller.set_limits(
            ref,
            cpus=float(limits.processors),
            memory_bytes=limits.memory_bytes + overhead,
            swap_bytes=limits.swap_bytes,
            pids=limits.pids or PID_MAX,
        )
        if delegate and owner[0] != 0:
            self.controller.delegate(ref, *owner)
        return LmCgroup(
            ref=ref,
            procs_files=self.controller.procs_files(ref),
            engine_path=self.controller.engine_path(ref),
            engine_unit=self.controller.engine_unit(ref),
            launcher=partial(self.controller.launcher, ref)
            if self.controller.launcher(ref, None)
            else None,
        )

    def remove(self, record: LmRecord) -> bool:
        """Kill what is left in an ended LM's cgroup and remove it; False to retry later."""
        ref = self.ref(record)
        if ref is None and record.cgroup is not None:
            # An unreadable reference: forget it, and the cgroup is found by its name
            # (lm-<uuid>) as an unrecorded one by :meth:`remove_leftovers`.
            self._forget(record)
            return self.controller is None
        if ref is None or self.controller is None:
            return record.cgroup is None
        try:
            self.controller.kill(ref)
            self.controller.remove(ref)
        except CgroupError as err:
            LOG.error("lm=%s: cannot remove its cgroup yet: %s", record.name, err)
            return False
        self._forget(record)
        return True

    def _forget(self, record: LmRecord) -> None:
        if self.store.get(record.uuid) is not None:  # a pruned row has nothing to forget
            self.store.update(record.uuid, cgroup=None)

    def remove_leftovers(self) -> None:
        """Cgroups of ended LMs that could not be removed before, and those their row does not
        name (the daemon died between making one and recording it). Other factories' cgroups
        under a shared parent are never touched: only uuids this store knows count."""
        for leftover in self.store.leftover_cgroups():
            self.remove(leftover)
        if self.controller is None:
            return
        for name in self.controller.names():
            record = self.store.get(name.removeprefix("lm-")) if name.startswith("lm-") else None
            if record is None or record.active or record.cgroup is not None:
                continue
            ref = self.controller.existing(name)
            if ref is None:
                continue
            try:
                self.controller.kill(ref)
                self.controller.remove(ref)
            except CgroupError as err:
                LOG.error("lm=%s: cannot remove its unrecorded cgroup: %s", record.name, err)
            else:
                LOG.warning("lm=%s: removed a cgroup its record did not name", record.name)

    def sample_memory(self, active: list[LmRecord]) -> None:
        """Keep a sampled peak where the kernel keeps none (cgroup v2 before Linux 5.19)."""
        for record in active:
            usage = self.usage(record)
            if usage is None or usage.memory_peak_bytes is not None:
                continue
            if usage.memory_bytes > (record.memory_peak_bytes or 0):
                self.store.update(record.uuid, memory_peak_bytes=usage.memory_bytes)


def peak(record: LmRecord, usage: Usage | None) -> int | None:
    """The kernel's peak, else the highest sample taken while the LM ran."""
    if usage is None:
        return record.memory_peak_bytes
    if usage.memory_peak_bytes is not None:
        return usage.memory_peak_bytes
    return max(usage.memory_bytes, record.memory_peak_bytes or 0)
