"""What the event stream may have missed: engine objects of this factory that no active LM
holds (a finished LM's leftover, or an orphan whose record was never written), and LM folders
past their machinetype's ``machines_dir_days``. Nomad's ``reconcile_dangling`` is the model:
only objects carrying this factory's label are ever touched."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from pathlib import Path

from lmrunner import untrusted
from lmrunner.backends.base import Backend, Owned
from lmrunner.config import Config
from lmrunner.guard import guarded
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


def cleanup_directories(config: Config, store: Store, now: float) -> list[Path]:
    """Remove LM directories older than their machinetype's ``machines_dir_days`` (0: kept)."""
    removed = []
    kept = [mt.machines_dir_days for mt in config.machinetypes.values()]
    youngest = min([d for d in kept if d > 0] + [DEFAULT_DIR_DAYS])
    for record in store.ended_before(now - youngest * 86400, cleaned=False):
        if record.finished is None:
            continue
        mt = config.machinetypes.get(record.machinetype)
        days = mt.machines_dir_days if mt else DEFAULT_DIR_DAYS
        if days > 0 and now - record.finished > days * 86400:
            untrusted.remove_tree(record.directory)
            store.update(record.uuid, cleaned=True)
            removed.append(record.directory)
    return removed
