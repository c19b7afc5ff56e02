"""Atomic file writes: a reader (or an LM) sees the old content or the new, never a torn file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text(
    path: Path,
    text: str,
    *,
    mode: int = 0o644,
    owner: tuple[int, int] | None = None,
    durable: bool = True,
) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: :func:`write_bytes`."""
    write_bytes(path, text.encode(), mode=mode, owner=owner, durable=durable)


def write_bytes(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o644,
    owner: tuple[int, int] | None = None,
    durable: bool = True,
) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    The temporary file gets ``mode`` (and ``owner``) before any byte is written, so a secret is
    never readable by others even for a moment. ``durable=False`` skips the fsync, for files in
    a folder nobody uses yet (an LM being prepared: a crash there discards the whole folder).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
