"""The v1 driver against this host's real cgroup v1 hierarchies (hybrid host, root).

Every cgroup lives under a parent with a unique name (inside this process's own memory cgroup
there), and the fixture kills, removes and releases everything even when a test fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmrunner import runner
from lmrunner.cgroups import CgroupController, CgroupRef, V1Controller, open_controller
from lmrunner.errors import CgroupUnsupported

pytestmark = pytest.mark.cgroup_v1

MIB = 1024 * 1024
HOG = "b = b'x' * (200 * 1024 * 1024); print('survived')"


@pytest.fixture
def controller() -> Iterator[V1Controller]:
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")
    try:
        ctl = open_controller(f"lmrunner-test-{uuid.uuid4().hex[:8]}")
    except CgroupUnsupported as err:
        pytest.skip(f"no usable cgroups: {err}")
    if not isinstance(ctl, V1Controller):
        pytest.skip("this host is not a cgroup v1 (hybrid/legacy) host")
    parents = [base / ctl.parent_rel for base in ctl.bases.values()]
    try:
        yield ctl
    finally:
        for parent in parents:  # whatever a failed test left: kill, remove
            for lm in parent.iterdir() if parent.exists() else []:
                if lm.is_dir():
                    ref = CgroupRef(1, lm.name, tuple((c, str(lm)) for c in ctl.bases))
                    ctl.kill(ref)
                    ctl.remove(ref)
        ctl.release()
        assert not any(p.exists() for p in parents), "cgroups left behind"


def gone_or_zombie(pid: int) -> bool:
    """True when ``pid`` no longer runs (an orphan may stay a zombie until init reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def inside(ref: CgroupRef, *argv: str) -> list[str]:
    """argv for a shell that joins every hierarchy of ``ref`` and then execs ``argv``."""
    joins = " && ".join(f"echo $$ > {p}/cgroup.procs" for p in ref.unique_paths())
    return ["sh", "-c", f'{joins} && exec "$@"', "sh", *argv]


def test_oom_kill_is_counted(controller: CgroupController) -> None:
    ref = controller.create("oom")
    controller.set_limits(ref, cpus=1, memory_bytes=32 * MIB, swap_bytes=0, pids=50)
    done = runner.run(inside(ref, sys.executable, "-c", HOG), ok_codes=(-9,), timeout=60)
    assert "survived" not in done.stdout
    usage = controller.usage(ref)
    print(f"oom_kills={usage.oom_kills} peak={usage.memory_peak_bytes}")
    assert usage.oom_kills >= 1
    assert usage.memory_peak_bytes is not None
    assert 16 * MIB < usage.memory_peak_bytes <= 32 * MIB
    assert controller.pids(ref) == frozenset()
    controller.remove(ref)
    assert all(not p.exists() for p in ref.unique_paths())


def test_cpu_quota_holds_two_busy_loops_to_one_cpu(controller: CgroupController) -> None:
    ref = controller.create("cpu")
    controller.set_limits(ref, cpus=1, memory_bytes=64 * MIB, swap_bytes=0, pids=50)
    loops = "while :; do :; done & while :; do :; done"
    proc = subprocess.Popen(inside(ref, "sh", "-c", loops))
    try:
        deadline = time.monotonic() + 5
        while len(controller.pids(ref)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        before, started = controller.usage(ref), time.monotonic()
        time.sleep(3)
        after, wall = controller.usage(ref), time.monotonic() - started
        used = (after.cpu_seconds - before.cpu_seconds) / wall
        print(f"two busy loops in a 1-CPU cgroup: {used:.3f} CPU over {wall:.2f} s")
        assert 0.8 <= used <= 1.15
        # Throttling shows only when the host had CPU to spare beyond the quota; on a busy
        # shared host the loops may get just one CPU without ever hitting it.
        assert after.throttled_periods >= before.throttled_periods
        controller.kill(ref)
        assert controller.pids(ref) == frozenset()
    finally:
        proc.kill()
        proc.wait(timeout=10)
    controller.remove(ref)


def test_pids_limit_is_enforced(controller: CgroupController) -> None:
    ref = controller.create("pids")
    controller.set_limits(ref, cpus=1, memory_bytes=64 * MIB, swap_bytes=0, pids=5)
    script = "for i in 1 2 3 4 5 6 7 8; do sleep 2 & done; wait"
    done = runner.run(inside(ref, "sh", "-c", script), ok_codes=range(256), timeout=30)
    assert "fork" in done.stderr.lower()
    pids_dir = ref.path("pids")
    assert pids_dir is not None
    events = dict(line.split() for line in (pids_dir / "pids.events").read_text().splitlines())
    assert int(events["max"]) >= 1
    controller.kill(ref)
    controller.remove(ref)


def test_kill_freeze_and_remove(controller: CgroupController) -> None:
    ref = controller.create("kill")
    controller.set_limits(ref, cpus=0.5, memory_bytes=64 * MIB, swap_bytes=0, pids=20)
    script = "sleep 60 & sleep 60 & (sleep 60 &) ; wait"
    proc = subprocess.Popen(inside(ref, "sh", "-c", script))
    try:
        deadline = time.monotonic() + 5
        while len(controller.pids(ref)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        members = controller.pids(ref)
        assert proc.pid in members and len(members) >= 4
        controller.freeze(ref)
        controller.thaw(ref)
        restored = CgroupRef.from_json(ref.to_json())  # as after a daemon restart
        controller.kill(restored)
        assert controller.pids(ref) == frozenset()
        assert proc.wait(timeout=10) == -9
        assert all(gone_or_zombie(pid) for pid in members)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    controller.remove(ref)
    controller.remove(ref)
    assert all(not p.exists() for p in ref.unique_paths())


def test_cpu_counter_matches_the_processes_own_rusage_within_2_percent(
    controller: V1Controller,
) -> None:
    from tests.integration.accounting import cpu_matches_rusage

    cpu_matches_rusage(controller, "lm-rusage")
