"""A backend whose engine is down holds back only its own machinetypes; the factory goes on."""

from __future__ import annotations

from pathlib import Path

import docker.errors
import pytest
import yaml

from lmrunner.backends.base import Health, Probe
from lmrunner.backends.docker import DockerBackend
from lmrunner.backends.fake import FakeBackend
from lmrunner.factory import Factory, Tuning
from lmrunner.loader import load_config
from lmrunner.state import Store


class DownBackend(FakeBackend):
    """A fake engine that reports itself unavailable (like dockerd not answering)."""

    name = "docker"  # stands in for the docker backend's machinetypes
    healthy = False

    def probe(self) -> Probe:
        if self.healthy:
            return super().probe()
        return Probe(Health.UNAVAILABLE, None, "unavailable: no socket")


def test_unavailable_backend_holds_back_only_its_machinetypes(tmp_path: Path) -> None:
    path = tmp_path / "lmrunner.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "factory": {
                    "space": "x.example.com",
                    "hostname": "f.example.com",
                    "state_dir": str(tmp_path / "state"),
                    "total_processors": 2,
                },
                "machinetypes": {
                    "dc": {"backend": "docker", "image": "fake:seconds=600", "target_share": 10},
                    "other": {"backend": "fake", "image": "fake:seconds=600", "target_share": 1},
                },
            }
        )
    )
    config = load_config(path, cpus=2)
    down = DownBackend(tmp_path / "down-engine")
    factory = Factory(
        config,
        Store(config.factory.state_dir),
        {"docker": down, "fake": FakeBackend(tmp_path / "engine")},
        tuning=Tuning(reconcile_seconds=0),
        load_average=lambda: (0.0, 0.0, 0.0),
    )
    report = factory.run_pass()
    assert [r.machinetype for r in factory.store.active()] == ["other", "other"]
    assert factory.unavailable == {"docker": "unavailable: no socket"}
    assert report.started
    down.healthy = True  # the engine comes back: the next reconcile notices
    factory.run_pass()
    assert factory.unavailable == {}


def test_docker_probe_says_why_it_is_unavailable() -> None:
    def no_socket() -> object:
        raise docker.errors.DockerException("Error while fetching server API version: no socket")

    probe = DockerBackend(client_factory=no_socket).probe()
    assert probe.health is Health.UNAVAILABLE
    assert probe.detail.startswith("unavailable: docker: cannot connect to Docker:")
    assert "no socket" in probe.detail


@pytest.mark.parametrize(("api", "ok"), [("1.39", False), ("1.41", True)])
def test_docker_probe_checks_the_api_version(api: str, ok: bool) -> None:
    class Client:
        def version(self) -> dict[str, str]:
            return {"ApiVersion": api, "Version": "20.10.24"}

        def info(self) -> dict[str, str]:
            return {"CgroupDriver": "cgroupfs"}

    probe = DockerBackend(client_factory=Client).probe()
    assert (probe.health is Health.OK) is ok


class SystemdDriverClient:
    """dockerd 20.10 with its systemd cgroup driver (the default on systemd + cgroup v2)."""

    def version(self) -> dict[str, str]:
        return {"ApiVersion": "1.41", "Version": "20.10.24"}

    def info(self) -> dict[str, str]:
        return {"CgroupDriver": "systemd"}


def test_docker_probe_takes_the_systemd_cgroup_driver_and_says_so() -> None:
    probe = DockerBackend(client_factory=SystemdDriverClient).probe()
    assert probe.health is Health.OK
    assert "cgroup driver systemd (containers in each LM's slice)" in probe.detail


def test_docker_probe_refuses_the_systemd_driver_when_lm_cgroups_are_directories() -> None:
    probe = DockerBackend(client_factory=SystemdDriverClient, lm_slices=False).probe()
    assert probe.health is Health.UNAVAILABLE
    assert "cgroup_manager" in probe.detail and "native.cgroupdriver=cgroupfs" in probe.detail
    assert (
        DockerBackend(client_factory=SystemdDriverClient, lm_slices=True).probe().health
        is Health.OK
    )
