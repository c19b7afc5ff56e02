"""Smoke test of a real cgroup v2 kernel (run inside the virtme-ng guest by scripts/test-v2-guest).

The guest is a throw-away VM, so the test may enable controllers at its root; it still removes the
cgroup it creates.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmrunner import runner

pytestmark = pytest.mark.cgroup_v2

V2_ROOT = Path("/sys/fs/cgroup")
LIMIT = 32 * 1024 * 1024
HOG = "b = b'x' * (200 * 1024 * 1024); print('survived')"


@pytest.fixture
def v2_cgroup() -> Iterator[Path]:
    controllers = V2_ROOT / "cgroup.controllers"
    if not controllers.exists() or "memory" not in controllers.read_text().split():
        pytest.skip("no cgroup v2 hierarchy with the memory controller at /sys/fs/cgroup")
    enabled = (V2_ROOT / "cgroup.subtree_control").read_text().split()
    missing = [c for c in ("cpu", "memory", "pids") if c not in enabled]
    if missing:
        (V2_ROOT / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in missing))
    path = V2_ROOT / f"lmrunner-smoke-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        path.rmdir()


def test_v2_memory_max_oom_kills_and_is_counted(v2_cgroup: Path) -> None:
    (v2_cgroup / "memory.max").write_text(str(LIMIT))
    (v2_cgroup / "memory.swap.max").write_text("0")
    (v2_cgroup / "cpu.max").write_text("50000 100000")
    script = f'echo $$ > {v2_cgroup}/cgroup.procs && exec "$0" -c "$1"'
    done = runner.run(["sh", "-c", script, sys.executable, HOG], ok_codes=(-9,), timeout=300)
    assert "survived" not in done.stdout
    events = dict(line.split() for line in (v2_cgroup / "memory.events").read_text().splitlines())
    assert int(events["oom_kill"]) >= 1
    peak = v2_cgroup / "memory.peak"
    if peak.exists():  # Linux >= 5.19
        assert int(peak.read_text()) <= LIMIT
    usage = dict(line.split() for line in (v2_cgroup / "cpu.stat").read_text().splitlines())
    assert int(usage["usage_usec"]) > 0
    assert (v2_cgroup / "cgroup.procs").read_text() == ""
