"""The test bed is the host the issue describes: systemd as PID 1, pure cgroup v2, dockerd at
its default (systemd) cgroup driver."""

from __future__ import annotations

import os
from pathlib import Path

import docker
import pytest

pytestmark = pytest.mark.systemd_host


def test_systemd_is_pid_1_on_pure_cgroup_v2() -> None:
    assert Path("/proc/1/comm").read_text().strip() == "systemd"
    assert Path("/run/systemd/system").is_dir()
    assert os.statvfs("/sys/fs/cgroup") is not None
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    types = {m[1]: m[2] for m in mounts}
    assert types["/sys/fs/cgroup"] == "cgroup2"
    assert not any(m[2] == "cgroup" for m in mounts), "a v1 hierarchy is mounted"


def test_dockerd_uses_the_systemd_cgroup_driver() -> None:
    client = docker.from_env()
    try:
        info = client.info()
    finally:
        client.close()
    assert info["CgroupDriver"] == "systemd"
    assert info["CgroupVersion"] == "2"
