"""Backends that run logical machines: one module per engine, all behind one protocol.

Installed as ``lmrunner.backends`` (the repository keeps this folder at top level). The core
looks backends up here by name and never branches on which one it has.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from lmrunner.backends import apptainer, docker, vm
from lmrunner.backends.base import Backend
from lmrunner.backends.fake import FakeBackend
from lmrunner.model import Placement

if TYPE_CHECKING:
    from lmrunner.config import FactoryConfig

#: Where each backend puts an LM's files inside the LM.
PLACEMENTS: Mapping[str, Placement] = {
    "docker": docker.PLACEMENT,
    "apptainer": apptainer.PLACEMENT,
    "vm": vm.PLACEMENT,
    "fake": FakeBackend.placement,
}

#: How to make each backend that exists, from the factory's configuration.
REGISTRY: Mapping[str, Callable[[FactoryConfig], Backend]] = {
    "fake": lambda factory: FakeBackend(factory.state_dir / "fake-engine"),
    "docker": lambda factory: docker.DockerBackend(cgroup_parent=factory.cgroup_parent),
}


def make_backends(names: set[str], factory: FactoryConfig) -> dict[str, Backend]:
    """The backends for these names that exist in this lmrunner (others are reported missing)."""
    return {name: REGISTRY[name](factory) for name in sorted(names) if name in REGISTRY}
