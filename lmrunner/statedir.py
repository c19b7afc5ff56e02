"""Whether the state directory can take more: the store, the LM folders and the APEL records
live there, and what is recorded must stay recordable."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from lmrunner.state import Store, StoreUnwritable

LOG = logging.getLogger("lmrunner.factory")

#: Below this much free space no LM starts.
MIN_FREE_BYTES = 32 * 1024 * 1024


def problem(state_dir: Path, min_free_bytes: int = MIN_FREE_BYTES) -> str | None:
    """Why no LM should start now (read-only, full, unreachable), None when all is well. One
    ``statvfs``: cheap enough for every pass."""
    try:
        info = os.statvfs(state_dir)
    except OSError as err:
        return f"cannot look at it: {err}"
    if info.f_flag & os.ST_RDONLY:
        return "its filesystem is read-only"
    if info.f_bavail * info.f_frsize < min_free_bytes:
        return f"its filesystem is full ({info.f_bavail * info.f_frsize / 2**20:.0f} MiB free)"
    return None


class Watch:
    """Whether the factory may start LMs, as far as its state directory goes: checked before
    every pass, and told when a store write failed. One log line when trouble begins, one when
    it ends."""

    def __init__(self, store: Store, min_free_bytes: int, clock: Callable[[], float]) -> None:
        self.store = store
        self.min_free_bytes = min_free_bytes
        self.clock = clock
        #: Why the state directory cannot take more now (full, read-only); None when it can.
        self.problem: str | None = None

    def check(self, state_dir: Path) -> str | None:
        found = problem(state_dir, self.min_free_bytes)
        if found is None and self.problem is not None:
            try:  # writable again? (a write failed last time)
                self.store.set_meta("writable_at", str(self.clock()))
            except StoreUnwritable as err:
                found = str(err)
        self.set(state_dir, found)
        return found

    def set(self, state_dir: Path, found: str | None) -> None:
        if found is not None and self.problem is None:
            LOG.error("state directory %s: %s; no LM starts until it can take more", state_dir,
                      found)  # fmt: skip
        elif found is None and self.problem is not None:
            LOG.warning("state directory %s: writable again; starting LMs", state_dir)
        self.problem = found
