"""Every backend on the systemd host: LMs are transient slices systemd makes and limits (v2
``cpu.max``, ``memory.max``, ``pids.max``), Docker's containers land in them through its systemd
cgroup driver, process engines through ``systemd-run --scope``; the accounting scenarios of the
other hosts hold unchanged (tests/integration/accounting.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lmrunner.cgroups import SystemdController, open_controller
from tests.integration import accounting as scenarios
from tests.integration.accounting import Rig

pytestmark = [pytest.mark.systemd_host, pytest.mark.slow]

SCENARIOS: dict[str, Callable[[Rig], dict[str, float]]] = {
    "burn": scenarios.burn_is_accounted,
    "two_loops": scenarios.two_loops_are_held_to_one_cpu,
    "hog": scenarios.hog_is_oom_killed,
    "kill": scenarios.kill_leaves_nothing,
}


def test_the_controller_is_systemds_and_a_slice_carries_the_limits() -> None:
    controller = open_controller("/lmrunner")
    assert isinstance(controller, SystemdController)
    ref = controller.create("lm-systemd-probe")
    try:
        controller.set_limits(ref, cpus=1.5, memory_bytes=64 << 20, swap_bytes=0, pids=77)
        path = Path("/sys/fs/cgroup/lmrunner.slice/lmrunner-lm_systemd_probe.slice")
        assert ref.unique_paths() == [path]
        assert (path / "cpu.max").read_text().split() == ["150000", "100000"]
        assert int((path / "memory.max").read_text()) == 64 << 20
        assert (path / "pids.max").read_text().strip() == "77"
        show = subprocess.run(
            ["systemctl", "show", "-p", "ActiveState,MemoryMax,TasksMax", path.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "ActiveState=active" in show and "TasksMax=77" in show, show
        # A process started behind the launcher is in the LM from its first instruction.
        launcher = controller.launcher(ref, (65534, 65534))
        out = subprocess.run(
            [*launcher, "sh", "-c", "id -u; cat /proc/self/cgroup"],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        assert out[0] == "65534"
        assert out[1].startswith(f"0::/lmrunner.slice/{path.name}/"), out
        assert controller.names() == ["lm-systemd-probe"]
    finally:
        controller.kill(ref)
        controller.remove(ref)
    assert not path.exists()
    assert controller.names() == []


@pytest.fixture
def docker_rig(vcbusybox: Path, docker_client: object) -> Iterator[Rig]:
    with scenarios.rig("docker") as made:
        yield made


@pytest.fixture
def apptainer_rig(vcbusybox: Path, apptainer: str) -> Iterator[Rig]:
    with scenarios.rig("apptainer") as made:
        yield made


@pytest.mark.docker
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_docker_lms_with_the_systemd_driver(docker_rig: Rig, scenario: str) -> None:
    SCENARIOS[scenario](docker_rig)


@pytest.mark.apptainer
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_apptainer_lms(apptainer_rig: Rig, scenario: str) -> None:
    SCENARIOS[scenario](apptainer_rig)


@pytest.fixture
def vm_rig(vm_artefacts: tuple[Path, Path], qemu: str) -> Iterator[Rig]:
    with scenarios.rig("vm") as made:
        yield made


@pytest.mark.qemu
@pytest.mark.parametrize(
    "scenario",
    [scenarios.kill_leaves_nothing, scenarios.engine_cpu_is_accounted],
    ids=["kill", "engine_cpu"],
)
def test_vm_lms(vm_rig: Rig, scenario: Callable[[Rig], dict[str, float]]) -> None:
    """QEMU under TCG inside the TCG test bed: slow, but QEMU starts behind systemd-run in
    the LM's slice and is accounted there like any engine."""
    scenario(vm_rig)
