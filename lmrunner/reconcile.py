"""What the event stream may have missed: engine objects of this factory that no active LM
holds (a finished LM's leftover, or an orphan whose record was never written), and LM folders
past their machinetype's ``machines_dir_days``. Nomad's ``reconcile_dangling`` is the model:
only objects carrying this factory's label are ever touched."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from lmrunner import untrusted
from lmrunner.backends.base import Backend, Health, Owned
from lmrunner.config import Config
from lmrunner.errors import BackendError
from lmrunner.guard import guarded
from lmrunner.lmcgroups import LmCgroups
from lmrunner.lmdisks import LmDisks
from lmrunner.state import Store

LOG = logging.getLogger("lmrunner.factory")
#: Vac's default ``machines_dir_days``, for LMs of machinetypes no longer configured.
DEFAULT_DIR_DAYS = 3.0


class Reaper:
    """Removes a factory's engine objects that no active LM holds."""

    def __init__(self, store: Store, clock: Callable[[], float], grace_seconds: float) -> None:
        self.store = store
        self.clock = clock
        self.grace_seconds = grace_seconds
        self._seen: dict[str, float] = {}  # orphan uuid -> when it was first seen

    def reap(self, owned: dict[str, tuple[Backend, list[Owned]]], active: Collection[str]) -> None:
        """``owned``: per backend, its labelled objects (of any factory)."""
        now = self.clock()
        seen: set[str] = set()
        for backend, objects in owned.values():
            for item in objects:
                if item.factory != self.store.factory_id or item.uuid in active:
                    continue
                seen.add(item.uuid)
                with guarded(item.name):
                    self._reap(backend, item, now)
        # Forget orphans that are gone (removed, or finished LMs' leftovers destroyed above).
        self._seen = {uuid: t for uuid, t in self._seen.items() if uuid in seen}

    def _reap(self, backend: Backend, owned: Owned, now: float) -> None:
        known = self.store.get(owned.uuid)
        first = self._seen.setdefault(owned.uuid, now)
        if known is not None and not known.active:  # its destroy failed, or the daemon died
            backend.destroy(owned.uuid, owned.handle)
            self._seen.pop(owned.uuid, None)
            LOG.info("lm=%s: engine object of the ended LM removed", owned.name)
        elif now - first >= self.grace_seconds:
            LOG.warning("orphan %s (%s) of %s: no record; removing", owned.name, owned.uuid,
                        backend.name)  # fmt: skip
            backend.destroy(owned.uuid, owned.handle)
            self._seen.pop(owned.uuid, None)
        else:
            LOG.warning("orphan %s (%s) of %s: no record; removal after grace", owned.name,
                        owned.uuid, backend.name)  # fmt: skip


def engine_objects(
    backends: Mapping[str, Backend],
    unavailable: Callable[[Backend, object], None],
    down: dict[str, str],
) -> dict[str, tuple[Backend, list[Owned]]]:
    """Each working backend's labelled objects. A backend whose probe or listing fails is
    reported to ``unavailable`` (its machinetypes wait); one that works again leaves ``down``
    (backend name -> why), with a line in the log."""
    owned: dict[str, tuple[Backend, list[Owned]]] = {}
    for backend in backends.values():
        probe = backend.probe()
        if probe.health is not Health.OK:
            unavailable(backend, probe.detail)
            continue
        if down.pop(backend.name, None) is not None:
            LOG.info("backend=%s: available again (%s)", backend.name, probe.detail)
        try:
            owned[backend.name] = (backend, backend.list_owned())
        except BackendError as err:
            unavailable(backend, err)
    return owned


def remove_all(
    backends: Mapping[str, Backend], store: Store, cgroups: LmCgroups, disks: LmDisks
) -> int:
    """Kill and remove every engine object, cgroup and disk of this store's factory (tests and
    the demo clean up with it); returns how many engine objects."""
    count = 0
    for backend in backends.values():
        try:
            for owned in backend.list_owned():
                if owned.factory == store.factory_id:
                    backend.stop(owned.uuid, owned.handle, force=True)
                    backend.destroy(owned.uuid, owned.handle)
                    count += 1
        except BackendError as err:
            LOG.error("backend=%s: cannot remove this factory's objects: %s", backend.name, err)
    for record in store.active():
        cgroups.remove(record)
        disks.release(record)
    return count


def cleanup_directories(config: Config, store: Store, now: float) -> list[Path]:
    """Remove LM directories older than their machinetype's ``machines_dir_days`` (0: kept)."""
    removed = []
    kept = [mt.machines_dir_days for mt in config.machinetypes.values()]
    youngest = min([d for d in kept if d > 0] + [DEFAULT_DIR_DAYS])
    for record in store.ended_before(now - youngest * 86400, cleaned=False):
        if record.finished is None or record.disk is not None:
            continue  # its filesystem is still mounted there: removed first, by a reconcile
        mt = config.machinetypes.get(record.machinetype)
        days = mt.machines_dir_days if mt else DEFAULT_DIR_DAYS
        if days > 0 and now - record.finished > days * 86400:
            untrusted.remove_tree(record.directory)
            store.update(record.uuid, cleaned=True)
            removed.append(record.directory)
    return removed
