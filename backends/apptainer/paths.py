"""Where one LM's files are (all in its LM directory), and what becomes of them when it ends."""

from __future__ import annotations

import logging
import uuid as uuid_mod
from dataclasses import dataclass
from pathlib import Path

from lmrunner import atomic, untrusted

LOG = logging.getLogger(__name__)

#: The backend's name: in its errors, its state folder and the ``LMRUNNER_BACKEND`` label.
NAME = "apptainer"


@dataclass(frozen=True, slots=True)
class LmPaths:
    """The files and folders of one LM that this backend makes (all in the LM directory)."""

    directory: Path

    @property
    def mnt(self) -> Path:
        return self.directory / "mnt"

    @property
    def workdir(self) -> Path:
        """``--workdir``: the container's /tmp, /var/tmp and $HOME (Vac: ``<dir>/mnt``)."""
        return self.mnt / "workdir"

    @property
    def tmpdir(self) -> Path:
        """``APPTAINER_TMPDIR``: where an unprivileged run unpacks a SIF into a sandbox."""
        return self.mnt / "apptainer-tmp"

    @property
    def env_file(self) -> Path:
        return self.directory / "apptainer.env"

    @property
    def env_hook(self) -> Path:
        return self.directory / "apptainer-env-hook.sh"

    @property
    def log(self) -> Path:
        """Apptainer's messages and the payload's stdout/stderr (shown by ``lmrunner logs``)."""
        return self.directory / "apptainer.log"

    @property
    def status(self) -> Path:
        return self.directory / "apptainer-exit.json"


def is_uuid(value: str) -> bool:
    """Whether ``value`` is an LM uuid in canonical form (it names files: never a path)."""
    try:
        return str(uuid_mod.UUID(value)) == value
    except ValueError:
        return False


def remove(paths: LmPaths) -> None:
    """Remove what this backend made for an LM that holds data (workdir, unpacked images).

    Raises:
        OSError, UntrustedFileError: something could not be removed.
    """
    for folder in (paths.workdir, paths.tmpdir):
        untrusted.remove_tree(folder)  # the LM's account writes there: never follow its links
    for file in (paths.env_file, paths.env_hook):
        file.unlink(missing_ok=True)


def remove_quietly(paths: LmPaths) -> None:
    """:func:`remove` after a failed start, where the start's own error must be what is told."""
    try:
        remove(paths)
    except (OSError, untrusted.UntrustedFileError) as err:
        LOG.warning("apptainer: cannot remove what was made in %s: %s", paths.directory, err)


def keep_tail(path: Path, limit: int) -> None:
    """Cut a finished LM's log to its last ``limit`` bytes (a chatty payload fills no disk)."""
    try:
        size = path.stat().st_size
        if size <= limit:
            return
        with path.open("rb") as handle:
            handle.seek(size - limit)
            tail = handle.read()
        atomic.write_text(path, tail.decode(errors="replace"), durable=False)
    except OSError as err:
        LOG.warning("apptainer: cannot shorten %s: %s", path, err)


def fatal_line(log: Path) -> str | None:
    """Apptainer's own ``FATAL:`` message at the end of the LM's log, if it printed one.

    Exit status 255 is also apptainer's own failure (image, bind source or command missing):
    this line tells the two apart.
    """
    try:
        with log.open("rb") as handle:
            handle.seek(max(log.stat().st_size - 65536, 0))
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("FATAL:"):
            return " ".join(line.removeprefix("FATAL:").split())
    return None
