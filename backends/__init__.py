"""Backends that run logical machines: one module per engine, all behind one protocol.

Installed as ``lmrunner.backends`` (the repository keeps this folder at top level). The core
looks backends up here by name and never branches on which one it has.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from lmrunner.backends import apptainer, docker, vm
from lmrunner.backends.base import Backend
from lmrunner.backends.fake import FakeBackend
from lmrunner.model import Placement

#: Where each backend puts an LM's files inside the LM.
PLACEMENTS: Mapping[str, Placement] = {
    "docker": docker.PLACEMENT,
    "apptainer": apptainer.PLACEMENT,
    "vm": vm.PLACEMENT,
    "fake": FakeBackend.placement,
}

#: How to make each backend that exists, given the factory's state directory.
REGISTRY: Mapping[str, Callable[[Path], Backend]] = {
    "fake": lambda state_dir: FakeBackend(state_dir / "fake-engine"),
}


def make_backends(names: set[str], state_dir: Path) -> dict[str, Backend]:
    """The backends for these names that exist in this lmrunner (others are reported missing)."""
    return {name: REGISTRY[name](state_dir) for name in sorted(names) if name in REGISTRY}
