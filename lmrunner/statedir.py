"""Whether the state directory can take more: the store, the LM folders and the APEL records
live there, and what is recorded must stay recordable."""

from __future__ import annotations

import os
from pathlib import Path

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
