"""Where an LM's files are in its directory when it has a filesystem of its own: a module with no
imports of lmrunner's, for the VM metadata handler that runs per connection."""

from __future__ import annotations

import os
from pathlib import Path


def mount_point(directory: Path) -> Path:
    """Where an LM's filesystem is mounted: its ``mnt`` folder (Vac's place for its LVs)."""
    return directory / "mnt"


def outputs_root(directory: Path) -> Path:
    """The folder holding an LM's ``joboutputs``: on its own filesystem while that is mounted,
    else the LM directory (no disk of its own, or the copy kept after its end)."""
    mounted = mount_point(directory)
    return mounted if os.path.ismount(mounted) else directory


def root_of(directory: Path, name: str) -> Path:
    """The folder a name such as ``joboutputs/x`` or ``jobfeatures/y`` is relative to."""
    return outputs_root(directory) if name.split("/", 1)[0] == "joboutputs" else directory
