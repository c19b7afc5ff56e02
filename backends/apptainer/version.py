"""Which engine is installed: the program (apptainer, else singularity) and its version."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

#: Programs tried in this order, on PATH and then in the usual install folders.
BINARIES = ("apptainer", "singularity")
FALLBACK_DIRS = (Path("/usr/local/bin"), Path("/usr/bin"), Path("/opt/apptainer/bin"))
VERSION_TIMEOUT = 15.0
#: Oldest engines with ``--no-eval``, ``--env-file`` and unprivileged ``--hostname``.
MIN_VERSIONS = {"apptainer": (1, 0), "singularity-ce": (3, 10)}
VERSION = re.compile(r"^(apptainer|singularity-ce|singularity) version v?((\d+)\.(\d+)\S*)")


def find_binary(which: Callable[[str], str | None], search_dirs: Sequence[Path]) -> str | None:
    """The engine's program: the first of :data:`BINARIES` on PATH (``which``), else in one of
    ``search_dirs``; None when there is none."""
    for name in BINARIES:
        found = which(name)
        if found:
            return found
    for folder in search_dirs:
        for name in BINARIES:
            candidate = folder / name
            if os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def parse_version(text: str) -> tuple[str, str, tuple[int, int]] | None:
    """``"apptainer version 1.4.5"`` -> ``("apptainer", "1.4.5", (1, 4))``; None when not
    recognised."""
    match = VERSION.match(text.strip())
    if match is None:
        return None
    return match.group(1), match.group(2), (int(match.group(3)), int(match.group(4)))


def unmet_requirement(flavour: str, version: tuple[int, int]) -> str | None:
    """None when this engine is new enough for lmrunner, else what lmrunner needs."""
    need = MIN_VERSIONS.get(flavour)
    if need is not None and version >= need:
        return None
    return " or ".join(f"{k} >= {'.'.join(map(str, v))}" for k, v in MIN_VERSIONS.items())
