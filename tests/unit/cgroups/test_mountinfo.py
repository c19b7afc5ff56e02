"""Detection of the cgroup layout from literal mountinfo samples (table tests, pure functions)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from lmrunner.cgroups.mountinfo import Mode, detect, own_cgroups, parse

DATA = Path(__file__).resolve().parents[2] / "data" / "mountinfo"


def sample(name: str) -> str:
    return (DATA / name).read_text()


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("hybrid_host.txt", Mode.HYBRID),
        ("unified_v2.txt", Mode.UNIFIED),
        ("legacy_v1.txt", Mode.LEGACY),
        ("none.txt", Mode.NONE),
    ],
)
def test_detect_samples(name: str, mode: Mode) -> None:
    assert detect(sample(name)) is mode


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("", Mode.NONE),
        ("garbage line\n", Mode.NONE),
        # a named v1 hierarchy alone controls nothing: cgroup2 holds the controllers
        (
            "26 24 0:24 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
            "27 26 0:25 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n",
            Mode.UNIFIED,
        ),
        ("30 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n", Mode.LEGACY),
        # optional fields (shared:N master:M) before the separator
        (
            "30 25 0:27 / /c/m rw shared:8 master:2 - cgroup cgroup rw,memory\n"
            "41 31 0:38 / /c/u rw,relatime shared:9 - cgroup2 cgroup2 rw\n",
            Mode.HYBRID,
        ),
    ],
)
def test_detect_table(text: str, mode: Mode) -> None:
    assert detect(text) is mode


def test_hybrid_host_mount_points() -> None:
    mounts = parse(sample("hybrid_host.txt"))
    assert mounts.v2 == PurePosixPath("/sys/fs/cgroup/unified")
    assert mounts.v1["memory"].mount_point == PurePosixPath("/sys/fs/cgroup/memory")
    assert mounts.v1["cpu"].mount_point == PurePosixPath("/sys/fs/cgroup/cpu")
    assert mounts.v1["cpuacct"].mount_point == PurePosixPath("/sys/fs/cgroup/cpuacct")
    assert mounts.v1["name=systemd"].mount_point == PurePosixPath("/sys/fs/cgroup/systemd")


def test_joined_controllers_share_one_mount() -> None:
    mounts = parse(sample("legacy_v1.txt"))
    assert mounts.v2 is None
    joined = PurePosixPath("/sys/fs/cgroup/cpu,cpuacct")
    assert mounts.v1["cpu"].mount_point == joined
    assert mounts.v1["cpuacct"] is mounts.v1["cpu"]
    assert mounts.v1["cpu"].controllers == {"cpu", "cpuacct"}
    assert mounts.v1["net_prio"].mount_point == PurePosixPath("/sys/fs/cgroup/net_cls,net_prio")
    assert "xattr" not in mounts.v1 and "rw" not in mounts.v1
    assert mounts.v1["name=systemd"].controllers == {"name=systemd"}


def test_unified_mount_point_and_no_v1() -> None:
    mounts = parse(sample("unified_v2.txt"))
    assert mounts.v2 == PurePosixPath("/sys/fs/cgroup")
    assert mounts.v1 == {}


def test_escaped_paths_and_namespace_root() -> None:
    text = "30 25 0:27 /lxc/c1 /mnt/my\\040cg rw - cgroup cgroup rw,memory\n"
    mount = parse(text).v1["memory"]
    assert mount.mount_point == PurePosixPath("/mnt/my cg")
    assert mount.root == PurePosixPath("/lxc/c1")


def test_first_mount_of_a_hierarchy_wins() -> None:
    text = (
        "30 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "90 80 0:27 / /var/lib/other/memory rw - cgroup cgroup rw,memory\n"
    )
    assert parse(text).v1["memory"].mount_point == PurePosixPath("/sys/fs/cgroup/memory")


def test_own_cgroups() -> None:
    text = (
        "9:name=systemd:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/user.slice\n0::/init.scope\n"
    )
    own = own_cgroups(text)
    assert own["memory"] == "/process_api/abc"
    assert own["cpu"] == own["cpuacct"] == "/user.slice"
    assert own["name=systemd"] == "/"
    assert own[""] == "/init.scope"
