"""This factory's facts for VacQuery answers and VacMon messages, read beside the loop.

Each reader thread (the responder, the VacMon sender) has its own :class:`Snapshots`, with
its own read-only connection (SQLite WAL lets it read while the loop writes), made and closed
in that thread. The store is read again only when it changed (``data_version``) or the
configuration did, and at least every :data:`SNAPSHOT_SECONDS`, whatever the query rate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from lmrunner.config import Config
from lmrunner.state import Store, StoreError
from lmrunner.vacquery.replies import Facts

LOG = logging.getLogger(__name__)
#: A snapshot serves every query for this long.
SNAPSHOT_SECONDS = 1.0


class Snapshots:
    """The latest :class:`Facts`; use from one thread only (the one that closes it)."""

    def __init__(self, config: Callable[[], Config], clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock
        self._facts: Facts | None = None
        self._version = -1  # the store's data_version when _facts were read
        self._store: Store | None = None

    def facts(self) -> Facts | None:
        """This factory now (None: the store cannot be read; logged)."""
        now = self.clock()
        config = self.config()
        try:
            store = self._open(config)
            version = store.data_version()
            if (
                self._facts is not None
                and version == self._version
                and config is self._facts.config
                and now - self._facts.now < SNAPSHOT_SECONDS
            ):
                return self._facts  # nothing was written since: the same answers
            self._version = version
            active = store.active()
            last = store.last_finished(config.machinetypes)
        except StoreError as err:
            LOG.error("vacquery: cannot read the store: %s", err)
            self.close()
            return None
        self._facts = Facts(config, active, last, now)
        return self._facts

    def _open(self, config: Config) -> Store:
        if self._store is None:
            self._store = Store(config.factory.state_dir, readonly=True)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
