"""Bounded history: ended LMs and old accounting records leave the store, beside the loop.

Without it the store grows by ~600 bytes per LM for ever. A :class:`Pruner` thread, with its
own store connection, removes every :data:`PERIOD_SECONDS` what ``factory.history_days`` and
``factory.accounting_days`` let go, in transactions of :data:`BATCH` rows with a pause between,
so the loop's own writes wait milliseconds at most. SQLite reuses the freed pages: the file stops
growing (no VACUUM, which would lock the store for as long as it copies it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from lmrunner.config import Config
from lmrunner.state import Store, StoreError

LOG = logging.getLogger(__name__)
PERIOD_SECONDS = 300.0
BATCH = 500
PAUSE_SECONDS = 0.05
DAY = 86400.0


class Pruner:
    """Prunes the store of ``config().factory.state_dir`` until :meth:`close`."""

    def __init__(self, config: Callable[[], Config], clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prune", daemon=True)
        self.removed_lms = 0
        self.removed_accounting = 0

    def start(self) -> Pruner:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        store: Store | None = None
        try:
            while not self._closed.wait(0 if store is None else PERIOD_SECONDS):
                try:
                    if store is None:
                        store = Store(self.config().factory.state_dir)
                    self.round(store)
                except StoreError as err:  # the loop reports a broken store; try again later
                    LOG.warning("prune: %s", err)
                    if store is not None:
                        store.close()
                        store = None
                    self._closed.wait(PERIOD_SECONDS)
                except Exception:  # history is housekeeping: never the daemon's end
                    LOG.exception("prune: a round failed")
        finally:
            if store is not None:
                store.close()

    def round(self, store: Store) -> tuple[int, int]:
        """Prune what is due now, batch after batch; returns (LMs, accounting records)."""
        factory = self.config().factory
        now = self.clock()
        lms = accounting = 0
        if factory.history_days > 0:
            lms = self._batches(lambda: store.prune_lms(now - factory.history_days * DAY, BATCH))
        if factory.accounting_days > 0:
            before = now - factory.accounting_days * DAY  # never one whose APEL message is due
            accounting = self._batches(lambda: store.prune_accounting(before, BATCH, apel=True))
        if lms or accounting:
            LOG.info("prune: %d ended LMs and %d accounting records removed from the store",
                     lms, accounting)  # fmt: skip
        self.removed_lms += lms
        self.removed_accounting += accounting
        return lms, accounting

    def _batches(self, batch: Callable[[], int]) -> int:
        total = 0
        while not self._closed.is_set():
            removed = batch()
            total += removed
            if removed < BATCH:
                break
            time.sleep(PAUSE_SECONDS)  # let the loop write between two batches
        return total
