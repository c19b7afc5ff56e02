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


def test_a_slices_cpu_counter_matches_the_kernels_per_process_figure() -> None:
    """The accounting counter itself, without an engine's start-up (seconds under TCG): a
    process tree burning for 5 s behind the launcher reports its own and its children's CPU
    (/proc/self/stat, which counts systemd-run's part too: the same process before exec); the
    slice's cpu.stat must agree within 2 %."""
    controller = open_controller("/lmrunner")
    assert isinstance(controller, SystemdController)
    ref = controller.create("lm-systemd-rusage")
    try:
        controller.set_limits(ref, cpus=1, memory_bytes=64 << 20, swap_bytes=0, pids=64)
        script = "( while :; do :; done ) & p=$!; sleep 5; kill $p; wait $p; cat /proc/$$/stat"
        out = subprocess.run(
            [*controller.launcher(ref, None), "sh", "-c", script],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
        own = scenarios.cpu_seconds(out, children=True)
        used = controller.usage(ref).cpu_seconds
        error = abs(used - own) / own
        print(f"slice: process tree {own:.3f} s, slice {used:.3f} s, error {100 * error:.2f} %")
        assert own > 2.0
        assert error <= 0.02
    finally:
        controller.kill(ref)
        controller.remove(ref)
