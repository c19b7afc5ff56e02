"""Live Vacuum Pipes: each pipe is fetched again when its ``cache_seconds`` ran out, in a thread
beside the factory's loop, never inside a pass.

A fetched document that differs from the copy in use asks for a reload (the same path as
SIGHUP), so changed machinetypes are applied between two passes and the reload logs what
changed. A failed fetch keeps the last good copy (:class:`lmrunner.pipes.PipeStore`) and is
tried again after :data:`RETRY_SECONDS` (or ``cache_seconds`` when that is shorter). A new
install has no copy yet: its pipes are fetched at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from lmrunner.config import PipeConfig
from lmrunner.pipes import PipeStore

LOG = logging.getLogger(__name__)
#: After a failed fetch (Vac tried again every 60 s cycle).
RETRY_SECONDS = 60.0
#: Never sooner than this between two rounds (a pipe with cache_seconds 1 must not spin).
MIN_WAIT_SECONDS = 1.0


class PipeWatch:
    """Keeps every configured pipe's copy fresh; calls ``changed()`` when a document changed."""

    def __init__(
        self,
        store: PipeStore,
        pipes: Callable[[], Mapping[str, PipeConfig]],
        changed: Callable[[], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``pipes`` is asked each round (a reload may change them); ``changed`` must only mark
        a reload (it runs in this thread)."""
        self.store = store
        self.pipes = pipes
        self.changed = changed
        self.clock = clock
        #: pipe -> (URL, document) of the copy the running configuration was loaded with
        self._known: dict[str, tuple[str, Mapping[str, Any] | None]] = {}
        #: pipe -> when its copy was fetched, and failed refreshes (metrics; read elsewhere)
        self.fetched: dict[str, float] = {}
        self.failures: dict[str, int] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def round(self) -> float:
        """Fetch every pipe that is due; return the seconds until the next one is due."""
        now = self.clock()
        due = now + RETRY_SECONDS * 60
        news = []
        for name, pipe in sorted(self.pipes().items()):
            if name not in self._known:  # the daemon loaded its configuration from this copy
                cached = self.store.load(name)
                self._known[name] = (pipe.url, cached.document if cached else None)
            result = self.store.refresh(pipe, at=now)
            if result.cached is not None:
                self.fetched[name] = result.cached.fetched_at
            if result.status == "failed":
                self.failures[name] = self.failures.get(name, 0) + 1
                retry = RETRY_SECONDS
                if result.cached is not None:
                    retry = min(retry, result.cached.cache_seconds)
                due = min(due, now + retry)
                continue
            if result.cached is None:  # not expected: fresh or fetched always has a copy
                continue
            due = min(due, result.cached.fetched_at + result.cached.cache_seconds)
            # A copy other than the one in use: fetched now, fetched by another process
            # (check --refresh-pipes), or the same document from a new URL after a reload.
            seen = (pipe.url, result.cached.document)
            if seen != self._known[name]:
                count = len(result.cached.document.get("machinetypes") or [])
                LOG.info("pipe %s: a new document (%d entries): reloading", name, count)
                news.append(name)
            self._known[name] = seen
        if news:
            self.changed()
        return max(due - self.clock(), MIN_WAIT_SECONDS)

    def status(self, now: float) -> dict[str, tuple[float | None, int]]:
        """pipe -> (seconds since its copy was fetched, failed refreshes), for metrics."""
        return {
            name: (
                None if name not in self.fetched else max(now - self.fetched[name], 0.0),
                self.failures.get(name, 0),
            )
            for name in self.pipes()
        }

    def start(self) -> None:
        """Run rounds in a daemon thread until :meth:`close`."""
        self._thread = threading.Thread(target=self._run, name="pipes", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look at the pipes now (after a reload: a pipe's URL may have changed)."""
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.round()
            except Exception:  # a bug here must not end the live pipes for good
                LOG.exception("pipes: refresh round failed; trying again in %g s", RETRY_SECONDS)
                wait = RETRY_SECONDS
            self._wake.wait(wait)
            self._wake.clear()
