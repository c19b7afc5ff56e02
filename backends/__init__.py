"""Backends that run logical machines: one module per engine, all behind one protocol.

Installed as ``lmrunner.backends`` (the repository keeps this folder at top level). The core
looks backends up here by name and never branches on which one it has. Every backend is made
from the factory's configuration and the host's cgroup controller (None when the host gives
lmrunner no cgroups); engine modules are imported only when their backend is made.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from lmrunner.backends import apptainer, docker, vm
from lmrunner.backends.base import Backend
from lmrunner.backends.fake import FakeBackend
from lmrunner.model import Placement

if TYPE_CHECKING:
    from lmrunner.cgroups.base import CgroupController
    from lmrunner.config import FactoryConfig

#: Where each backend puts an LM's files inside the LM.
PLACEMENTS: Mapping[str, Placement] = {
    "docker": docker.PLACEMENT,
    "apptainer": apptainer.PLACEMENT,
    "vm": vm.PLACEMENT,
    "fake": FakeBackend.placement,
}

Maker = Callable[["FactoryConfig", "CgroupController | None"], Backend]

#: How to make each backend that exists, from the factory's configuration and the cgroups.
REGISTRY: Mapping[str, Maker] = {
    "fake": lambda factory, cgroups: FakeBackend(factory.state_dir / "fake-engine"),
    "docker": lambda factory, cgroups: docker.DockerBackend(
        cgroup_parent=factory.cgroup_parent,
        lm_slices=None if cgroups is None else cgroups.manager == "systemd",
    ),
    "apptainer": lambda factory, cgroups: apptainer.ApptainerBackend(factory, cgroups),
    "vm": lambda factory, cgroups: vm.VmBackend(factory),  # QEMU runs in the core's cgroup
}


def make_backends(
    names: set[str], factory: FactoryConfig, cgroups: CgroupController | None = None
) -> dict[str, Backend]:
    """The backends for these names that exist in this lmrunner (others are reported missing)."""
    return {name: REGISTRY[name](factory, cgroups) for name in sorted(names) if name in REGISTRY}
