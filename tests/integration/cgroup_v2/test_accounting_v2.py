"""Issue 6 on a real cgroup v2 kernel (the virtme-ng guest): the same scenarios as on the host.

Apptainer runs in the guest (unprivileged, as on the host); Docker and QEMU do not (no dockerd
in the guest, and a TCG guest inside a TCG guest is too slow to be a test), so their v2 path is
the same driver code proven here through Apptainer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lmrunner.cgroups import V2Controller, open_controller
from lmrunner.errors import CgroupUnsupported
from tests.integration import accounting as scenarios
from tests.integration.accounting import Rig

pytestmark = [pytest.mark.cgroup_v2, pytest.mark.apptainer, pytest.mark.slow]


@pytest.fixture
def rig(vcbusybox: Path, apptainer: str) -> Iterator[Rig]:
    try:
        controller = open_controller("/lmrunner")
    except CgroupUnsupported as err:
        pytest.skip(f"no usable cgroups: {err}")
    if not isinstance(controller, V2Controller):
        pytest.skip("not a unified cgroup v2 host")
    with scenarios.rig("apptainer") as made:
        yield made


def test_v2_cpu_burnt_by_the_payload_is_accounted_within_2_percent(rig: Rig) -> None:
    scenarios.burn_is_accounted(rig)


def test_v2_two_busy_loops_are_held_to_one_processor(rig: Rig) -> None:
    scenarios.two_loops_are_held_to_one_cpu(rig)


def test_v2_memory_hog_is_oom_killed_at_its_limit(rig: Rig) -> None:
    scenarios.hog_is_oom_killed(rig)


def test_v2_killing_an_lm_leaves_no_process_and_no_cgroup(rig: Rig) -> None:
    scenarios.kill_leaves_nothing(rig)
