"""Smoke test of the host's cgroup v1 memory controller: a hard limit OOM-kills a hog.

The test creates its own child cgroup under this process's memory cgroup (never touching any
cgroup it did not create) and removes it afterwards.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmrunner import runner

pytestmark = pytest.mark.cgroup_v1

V1_MEMORY = Path("/sys/fs/cgroup/memory")
LIMIT = 32 * 1024 * 1024
HOG = "b = b'x' * (200 * 1024 * 1024); print('survived')"


def own_cgroup(controller: str) -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    pytest.skip(f"this process is in no v1 {controller} cgroup")


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")
    if not (V1_MEMORY / "memory.limit_in_bytes").exists():
        pytest.skip(f"no cgroup v1 memory hierarchy at {V1_MEMORY}")
    path = V1_MEMORY / own_cgroup("memory").lstrip("/") / f"lmrunner-smoke-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        path.rmdir()


def test_v1_memory_limit_oom_kills_and_is_counted(memory_cgroup: Path) -> None:
    (memory_cgroup / "memory.limit_in_bytes").write_text(str(LIMIT))
    memsw = memory_cgroup / "memory.memsw.limit_in_bytes"
    if memsw.exists():  # swap accounting on: cap memory+swap too, or the hog swaps instead
        memsw.write_text(str(LIMIT))
    # The shell joins the cgroup, then becomes the hog: nothing runs outside the limit.
    script = f'echo $$ > {memory_cgroup}/cgroup.procs && exec "$0" -c "$1"'
    done = runner.run(["sh", "-c", script, sys.executable, HOG], ok_codes=(-9,), timeout=60)
    assert "survived" not in done.stdout
    oom = dict(
        line.split() for line in (memory_cgroup / "memory.oom_control").read_text().splitlines()
    )
    assert int(oom["oom_kill"]) >= 1
    assert int((memory_cgroup / "memory.max_usage_in_bytes").read_text()) <= LIMIT
    assert (memory_cgroup / "cgroup.procs").read_text() == ""
