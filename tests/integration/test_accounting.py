"""Issue 6 on the host's cgroup v1 hierarchies: accounting and hard limits, per backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import accounting as scenarios
from tests.integration.accounting import Rig

pytestmark = [pytest.mark.cgroup_v1, pytest.mark.slow]

BACKENDS = [
    pytest.param("docker", marks=pytest.mark.docker, id="docker"),
    pytest.param("apptainer", marks=pytest.mark.apptainer, id="apptainer"),
    pytest.param("vm", marks=pytest.mark.qemu, id="vm"),
]
CONTAINERS = BACKENDS[:2]  # scenarios.PAYLOAD_IN_CGROUP


@pytest.fixture(params=BACKENDS)
def rig(request: pytest.FixtureRequest, vcbusybox: Path) -> Iterator[Rig]:
    backend: str = request.param
    if backend == "docker":
        request.getfixturevalue("docker_client")
    elif backend == "vm":
        request.getfixturevalue("qemu")
        request.getfixturevalue("vm_artefacts")
    else:
        request.getfixturevalue(backend)
    with scenarios.rig(backend) as made:
        yield made


@pytest.mark.parametrize("rig", CONTAINERS, indirect=True)
def test_cpu_burnt_by_the_payload_is_accounted_within_2_percent(rig: Rig) -> None:
    scenarios.burn_is_accounted(rig)


@pytest.mark.parametrize("rig", BACKENDS[2:], indirect=True)
def test_the_cpu_a_vm_costs_the_host_is_accounted_within_2_percent(rig: Rig) -> None:
    scenarios.engine_cpu_is_accounted(rig)


@pytest.mark.parametrize("rig", CONTAINERS, indirect=True)  # a 1-vCPU guest cannot use 2 CPUs
def test_two_busy_loops_are_held_to_one_processor(rig: Rig) -> None:
    scenarios.two_loops_are_held_to_one_cpu(rig)


@pytest.mark.parametrize("rig", CONTAINERS, indirect=True)  # a VM's hog meets the guest's OOM
def test_memory_hog_is_oom_killed_at_its_limit(rig: Rig) -> None:
    scenarios.hog_is_oom_killed(rig)


def test_killing_an_lm_leaves_no_process_and_no_cgroup(rig: Rig) -> None:
    scenarios.kill_leaves_nothing(rig)
