"""Docker puts each container below its LM's cgroup (``cgroup_parent`` = the cgroup's
``engine_path``), so the LM's limits and counters cover it; without one, below the backend's
default parent. A fake Docker client records what the container was created with."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lmrunner.backends.base import LmCgroup, MachineSpec
from lmrunner.backends.docker import DockerBackend
from lmrunner.cgroups.base import CgroupRef
from lmrunner.model import Limits

REF = CgroupRef(2, "lm-u1", (("unified", "/sys/fs/cgroup/lmrunner/lm-u1"),))


@dataclass
class FakeContainer:
    id: str = "c0ffee" * 10
    started: bool = False

    def start(self) -> None:
        self.started = True


@dataclass
class FakeImages:
    def get(self, name: str) -> object:
        return object()  # present: never pulled


@dataclass
class FakeContainers:
    created: list[dict[str, Any]] = field(default_factory=list)

    def create(self, image: str, command: list[str], **kwargs: Any) -> FakeContainer:
        self.created.append({"image": image, "command": command, **kwargs})
        return FakeContainer()


@dataclass
class FakeClient:
    images: FakeImages = field(default_factory=FakeImages)
    containers: FakeContainers = field(default_factory=FakeContainers)

    def close(self) -> None:
        pass


def spec(tmp_path: Path, cgroup: LmCgroup | None) -> MachineSpec:
    return MachineSpec(
        uuid="u1",
        name="factory-00.example.com",
        machinetype="alpha",
        image="docker://vcbusybox:latest",
        command=("/user_data",),
        limits=Limits(1, 2048 << 20, 0, 0, None, pids=100),
        mounts=(),
        env={},
        labels={},
        directory=tmp_path,
        owner=(os.getuid(), os.getgid()),
        stop_grace_seconds=30,
        cgroup=cgroup,
    )


def created_with(backend: DockerBackend, client: FakeClient, made: MachineSpec) -> dict[str, Any]:
    backend.start(made)
    [kwargs] = client.containers.created
    return kwargs


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


def test_the_container_goes_below_the_lms_cgroup(tmp_path: Path, client: FakeClient) -> None:
    backend = DockerBackend(cgroup_parent="/lmrunner", client_factory=lambda: client)
    cgroup = LmCgroup(REF, (Path(REF.paths[0][1]) / "cgroup.procs",), "/lmrunner/lm-u1")
    assert created_with(backend, client, spec(tmp_path, cgroup))["cgroup_parent"] == (
        "/lmrunner/lm-u1"
    )


@pytest.mark.parametrize("configured", ["/lmrunner", "lmrunner", "lmrunner/"])
def test_without_a_cgroup_the_default_parent(
    tmp_path: Path, client: FakeClient, configured: str
) -> None:
    backend = DockerBackend(cgroup_parent=configured, client_factory=lambda: client)
    assert created_with(backend, client, spec(tmp_path, None))["cgroup_parent"] == "/lmrunner"


def test_the_default_parent_of_the_backend(tmp_path: Path, client: FakeClient) -> None:
    backend = DockerBackend(client_factory=lambda: client)
    assert created_with(backend, client, spec(tmp_path, None))["cgroup_parent"] == "/lmrunner"


def test_a_cgroup_without_engine_path_falls_back_to_the_default(
    tmp_path: Path, client: FakeClient
) -> None:
    """v1 with differing own cgroups: no single path names the LM's cgroup."""
    backend = DockerBackend(cgroup_parent="/sites/lm", client_factory=lambda: client)
    cgroup = LmCgroup(REF, (), None)
    assert created_with(backend, client, spec(tmp_path, cgroup))["cgroup_parent"] == "/sites/lm"


def test_the_limits_are_still_set_on_the_container(tmp_path: Path, client: FakeClient) -> None:
    """Below the LM's cgroup the container keeps its own limits too (a second fence)."""
    backend = DockerBackend(client_factory=lambda: client)
    cgroup = LmCgroup(REF, (), "/lmrunner/lm-u1")
    kwargs = created_with(backend, client, spec(tmp_path, cgroup))
    assert (kwargs["nano_cpus"], kwargs["mem_limit"], kwargs["pids_limit"]) == (
        1_000_000_000,
        2048 << 20,
        100,
    )


@dataclass
class DriverClient(FakeClient):
    driver: str = "systemd"

    def info(self) -> dict[str, str]:
        return {"CgroupDriver": self.driver}


SLICE = "lmrunner-lm_u1.slice"


@pytest.mark.parametrize(
    ("driver", "expected"),
    [("systemd", SLICE), ("cgroupfs", "/lmrunner.slice/lmrunner-lm_u1.slice")],
)
def test_an_lm_slice_is_named_as_the_cgroup_driver_wants(
    tmp_path: Path, driver: str, expected: str
) -> None:
    """Docker's systemd driver takes only a slice; its cgroupfs driver takes the slice's path."""
    client = DriverClient(driver=driver)
    backend = DockerBackend(client_factory=lambda: client)
    cgroup = LmCgroup(REF, (), "/lmrunner.slice/lmrunner-lm_u1.slice", engine_unit=SLICE)
    assert created_with(backend, client, spec(tmp_path, cgroup))["cgroup_parent"] == expected


def test_without_a_cgroup_the_systemd_driver_gets_the_parent_slice(tmp_path: Path) -> None:
    client = DriverClient(driver="systemd")
    backend = DockerBackend(cgroup_parent="/sites/lms", client_factory=lambda: client)
    backend._driver = "systemd"  # as the probe found it
    assert created_with(backend, client, spec(tmp_path, None))["cgroup_parent"] == (
        "sites-lms.slice"
    )
