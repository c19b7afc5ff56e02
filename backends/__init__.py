"""Backends that run logical machines: one module per engine, all behind one protocol.

Installed as ``lmrunner.backends`` (the repository keeps this folder at top level). The core
looks backends up here by name and never branches on which one it has.
"""

from __future__ import annotations

from collections.abc import Mapping

from lmrunner.backends import apptainer, docker, vm
from lmrunner.model import Placement

#: Where each backend puts an LM's files inside the LM.
PLACEMENTS: Mapping[str, Placement] = {
    "docker": docker.PLACEMENT,
    "apptainer": apptainer.PLACEMENT,
    "vm": vm.PLACEMENT,
}
