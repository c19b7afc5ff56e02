"""The v2 driver on a real cgroup v2 kernel (inside the virtme-ng guest: scripts/test-v2-guest).

One light test (Python in the guest is ~50x slower): create under a fresh parent, limit, OOM-kill a
shell memory hog, read usage and memory.peak, kill a process tree, remove, release.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from lmrunner import runner
from lmrunner.cgroups import CgroupRef, V2Controller, open_controller
from lmrunner.errors import CgroupUnsupported

pytestmark = pytest.mark.cgroup_v2

MIB = 1024 * 1024


@pytest.fixture
def controller() -> Iterator[V2Controller]:
    try:
        ctl = open_controller(f"lmrunner-test-{uuid.uuid4().hex[:8]}")
    except CgroupUnsupported as err:
        pytest.skip(f"no usable cgroups: {err}")
    if not isinstance(ctl, V2Controller):
        pytest.skip("not a unified cgroup v2 host")
    try:
        yield ctl
    finally:
        if ctl.parent.exists():
            for lm in [p for p in ctl.parent.iterdir() if p.is_dir()]:
                ref = CgroupRef(2, lm.name, (("unified", str(lm)),))
                ctl.kill(ref)
                ctl.remove(ref)
        ctl.release()
        assert not ctl.parent.exists(), "cgroups left behind"


def inside(ref: CgroupRef, script: str) -> list[str]:
    """argv for a shell that joins ``ref`` first, then runs ``script`` (all of it inside)."""
    joined = f'echo $$ > {ref.unique_paths()[0]}/cgroup.procs && exec sh -c "$1"'
    return ["sh", "-c", joined, "sh", script]


def test_v2_limits_oom_usage_kill_remove(controller: V2Controller) -> None:
    ref = controller.create("lm")
    lm = ref.unique_paths()[0]
    controller.set_limits(ref, cpus=0.5, memory_bytes=32 * MIB, swap_bytes=0, pids=20)
    assert (lm / "cpu.max").read_text().split() == ["50000", "100000"]
    assert (lm / "memory.max").read_text().strip() == str(32 * MIB)
    assert (lm / "memory.oom.group").read_text().strip() == "1"

    # tail keeps the endless "line" of /dev/zero in memory: a hog without Python's start-up
    runner.run(inside(ref, "exec tail /dev/zero"), ok_codes=(-9,), timeout=120)
    usage = controller.usage(ref)
    print(f"v2: oom_kills={usage.oom_kills} peak={usage.memory_peak_bytes} cpu={usage.cpu_seconds}")
    assert usage.oom_kills >= 1
    assert usage.memory_peak_bytes is not None and usage.memory_peak_bytes <= 32 * MIB
    assert usage.cpu_seconds > 0
    assert controller.pids(ref) == frozenset()

    controller.remove(ref)
    controller.remove(ref)  # idempotent
    assert not lm.exists()

    tree = controller.create("tree")  # a fresh LM: the OOM above leaves nothing to reason about
    controller.set_limits(tree, cpus=1, memory_bytes=128 * MIB, swap_bytes=0, pids=20)
    proc = subprocess.Popen(inside(tree, "sleep 60 & sleep 60 & wait"))
    try:
        deadline = time.monotonic() + 90
        while len(controller.pids(tree)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        members = controller.pids(tree)
        path = tree.unique_paths()[0]
        print(f"members={sorted(members)} memory.current={(path / 'memory.current').read_text()}")
        assert proc.pid in members
        controller.kill(tree, timeout=30)
        assert controller.pids(tree) == frozenset()
        assert proc.wait(timeout=30) == -9
    finally:
        proc.kill()
        proc.wait(timeout=30)
    controller.remove(tree)
    assert not tree.unique_paths()[0].exists()


def test_a_delegated_lm_cgroup_can_be_split_by_its_account(controller: V2Controller) -> None:
    import pwd

    account = pwd.getpwnam("lmrunner-sc")
    ref = controller.create("lm-delegated")
    controller.set_limits(ref, cpus=1, memory_bytes=64 * MIB, swap_bytes=0, pids=64)
    controller.delegate(ref, account.pw_uid, account.pw_gid)
    sub = ref.unique_paths()[0] / "pilot-job-1"
    runner.run(["runuser", "-u", "lmrunner-sc", "--", "mkdir", str(sub)])
    assert sub.is_dir() and sub.stat().st_uid == account.pw_uid
    runner.run(["runuser", "-u", "lmrunner-sc", "--", "rmdir", str(sub)])
    # The limits above it stay root's: the account cannot raise them.
    denied = runner.run(
        [
            "runuser",
            "-u",
            "lmrunner-sc",
            "--",
            "sh",
            "-c",
            f"echo max > {ref.unique_paths()[0]}/memory.max",
        ],
        ok_codes=(0, 1, 2),
    )
    assert denied.returncode != 0


def test_cpu_counter_matches_the_processes_own_rusage_within_2_percent(
    controller: V2Controller,
) -> None:
    from tests.integration.accounting import cpu_matches_rusage

    cpu_matches_rusage(controller, "lm-rusage")
