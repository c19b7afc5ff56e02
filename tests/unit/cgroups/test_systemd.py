"""The systemd cgroup driver against a fake systemd (its commands recorded, its cgroup tree a
folder). The real one: tests/integration/systemd_host/test_lms_on_systemd.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmrunner.cgroups import CgroupController, CgroupRef, SystemdController, open_controller
from lmrunner.cgroups.base import memory_high
from lmrunner.errors import CgroupError, CommandError
from lmrunner.runner import Completed

DATA = Path(__file__).parents[2] / "data" / "mountinfo"
SLICES = "lmrunner.slice"


class FakeSystemd:
    """Records argv; StartTransientUnit of a slice makes its folder, stop removes it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[list[str]] = []
        self.fail: dict[str, CommandError] = {}

    def __call__(self, argv: list[str], **options: Any) -> Completed:
        self.calls.append(argv)
        verb = argv[6] if argv[0] == "busctl" else argv[1]
        if verb in self.fail:
            raise self.fail[verb]
        if verb == "StartTransientUnit" and argv[8].endswith(".slice"):
            (self.root / SLICES / argv[8]).mkdir(parents=True, exist_ok=True)
        if verb == "stop":
            (self.root / SLICES / argv[2]).rmdir()
        return Completed(tuple(argv), 0, "", "", 0.0)


@pytest.fixture
def systemd(tmp_path: Path) -> FakeSystemd:
    return FakeSystemd(tmp_path)


@pytest.fixture
def ctl(tmp_path: Path, systemd: FakeSystemd) -> Iterator[SystemdController]:
    yield SystemdController(tmp_path, "/lmrunner", run=systemd)


def test_an_lm_is_a_slice_named_without_dashes(ctl: SystemdController, tmp_path: Path) -> None:
    assert isinstance(ctl, CgroupController)
    ref = ctl.create("lm-1234-abcd")
    path = tmp_path / SLICES / "lmrunner-lm_1234_abcd.slice"
    assert ref == CgroupRef(2, "lm-1234-abcd", (("unified", str(path)),))
    assert ctl.names() == ["lm-1234-abcd"]
    assert ctl.existing("lm-1234-abcd") == ref
    assert ctl.existing("lm-other") is None
    assert ctl.engine_unit(ref) == "lmrunner-lm_1234_abcd.slice"
    assert ctl.engine_path(ref) == "/lmrunner.slice/lmrunner-lm_1234_abcd.slice"
    assert ctl.procs_files(ref) == ()


def test_a_nested_parent_is_a_nested_slice(tmp_path: Path, systemd: FakeSystemd) -> None:
    ctl = SystemdController(tmp_path, "/site/lms", run=systemd)
    assert ctl.parent == tmp_path / "site.slice" / "site-lms.slice"
    assert ctl.unit("lm-x") == "site-lms-lm_x.slice"
    with pytest.raises(CgroupError, match="no '-'"):
        SystemdController(tmp_path, "/my-site", run=systemd)


def test_the_slice_is_made_through_dbus_and_limited_with_unit_properties(
    ctl: SystemdController, systemd: FakeSystemd
) -> None:
    ref = ctl.create("lm-a")
    ctl.set_limits(ref, cpus=2, memory_bytes=1 << 30, swap_bytes=0, pids=50)
    start, limit = systemd.calls
    assert start[:8] == [
        "busctl", "call", "--quiet", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
    ]  # fmt: skip
    assert start[8:10] == ["lmrunner-lm_a.slice", "fail"]
    assert limit == [
        "systemctl", "set-property", "--runtime", "lmrunner-lm_a.slice",
        "CPUQuota=200%", "CPUWeight=200", f"MemoryMax={1 << 30}",
        f"MemoryHigh={memory_high(1 << 30, 0.95)}",
        "MemorySwapMax=0", "TasksMax=50",
    ]  # fmt: skip


def test_a_slice_made_before_a_restart_is_adopted(
    ctl: SystemdController, systemd: FakeSystemd, tmp_path: Path
) -> None:
    (tmp_path / SLICES / "lmrunner-lm_a.slice").mkdir(parents=True)
    systemd.fail["StartTransientUnit"] = CommandError(
        ["busctl"],
        1,
        "",
        "Call failed: Unit lmrunner-lm_a.slice was already loaded or has a fragment file.",
    )
    assert ctl.create("lm-a").name == "lm-a"


def test_a_slice_systemd_refuses_is_a_cgroup_error(
    ctl: SystemdController, systemd: FakeSystemd
) -> None:
    systemd.fail["StartTransientUnit"] = CommandError(["busctl"], 1, "", "Access denied")
    with pytest.raises(CgroupError, match=r"cannot make the slice lmrunner-lm_a\.slice"):
        ctl.create("lm-a")


def test_a_slice_that_never_appears_is_a_cgroup_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(argv: list[str], **options: Any) -> Completed:
        return Completed(tuple(argv), 0, "", "", 0.0)  # accepted, but no cgroup ever

    ticks = iter(range(100))
    ctl = SystemdController(tmp_path, "/lmrunner", run=run, clock=lambda: float(next(ticks)))
    monkeypatch.setattr("lmrunner.cgroups.systemd.time.sleep", lambda s: None)
    with pytest.raises(CgroupError, match="made no cgroup"):
        ctl.create("lm-a")


def test_the_launcher_makes_a_delegated_scope_in_the_slice_and_switches_user(
    ctl: SystemdController,
) -> None:
    ref = ctl.create("lm-a")
    argv = ctl.launcher(ref, (1000, 1001))
    assert argv[:4] == ("systemd-run", "--scope", "--quiet", "--collect")
    assert argv[4].startswith("--unit=lmrunner-lm_a-") and argv[4].endswith(".scope")
    assert argv[5:] == ("--slice=lmrunner-lm_a.slice", "--property=Delegate=yes",
                        "--uid=1000", "--gid=1001", "--")  # fmt: skip
    assert "--uid=0" not in ctl.launcher(ref, (0, 0))
    assert ctl.launcher(ref, None)[-1] == "--"


def test_foreign_references_are_refused(ctl: SystemdController, tmp_path: Path) -> None:
    foreign = CgroupRef(2, "lm-a", (("unified", str(tmp_path / "system.slice" / "x")),))
    for act in (ctl.pids, ctl.usage, ctl.remove, ctl.engine_unit):
        with pytest.raises(CgroupError, match="not an lmrunner slice"):
            act(foreign)
    with pytest.raises(CgroupError):
        ctl.unit("lm_a")  # "_" would not map back


def test_remove_stops_the_slice_and_a_gone_one_is_fine(
    ctl: SystemdController, systemd: FakeSystemd, tmp_path: Path
) -> None:
    ref = ctl.create("lm-a")
    ctl.kill(ref)  # nothing runs in it
    ctl.remove(ref)
    assert systemd.calls[-1] == ["systemctl", "stop", "lmrunner-lm_a.slice"]
    assert ctl.names() == []
    systemd.fail["stop"] = CommandError(
        ["systemctl"], 5, "", "Unit lmrunner-lm_a.slice not loaded."
    )
    ctl.remove(ref)


def test_open_controller_chooses_systemd_where_it_is_pid_1(tmp_path: Path) -> None:
    booted = tmp_path / "run-systemd-system"
    booted.mkdir()
    own = tmp_path / "cgroup"
    own.write_text("0::/system.slice/lmrunner.service\n")
    options: dict[str, Any] = {
        "mountinfo_path": DATA / "unified_v2.txt",
        "proc_cgroup_path": own,
        "root_override": tmp_path,
    }
    ctl = open_controller("/lmrunner", systemd_dir=booted, **options)
    assert isinstance(ctl, SystemdController)
    assert ctl.parent == tmp_path / "sys/fs/cgroup/lmrunner.slice"
    plain = open_controller("/lmrunner", systemd_dir=booted, manager="cgroupfs", **options)
    assert not isinstance(plain, SystemdController)
    forced = open_controller("/lmrunner", systemd_dir=tmp_path / "no", manager="systemd", **options)
    assert isinstance(forced, SystemdController)


def test_the_whole_lm_is_the_oom_killers_and_cgroup_kill_ends_it(
    ctl: SystemdController, tmp_path: Path
) -> None:
    ref = ctl.create("lm-a")
    path = tmp_path / SLICES / "lmrunner-lm_a.slice"
    for name in ("memory.oom.group", "cgroup.kill"):
        (path / name).write_text("0\n")
    ctl.set_limits(ref, cpus=1, memory_bytes=1 << 30, swap_bytes=0, pids=10)
    assert (path / "memory.oom.group").read_text() == "1"
    ctl.kill(ref)
    assert (path / "cgroup.kill").read_text() == "1"


def test_lms_of_the_cgroupfs_driver_from_before_the_switch_are_still_read_and_removed(
    ctl: SystemdController, systemd: FakeSystemd, tmp_path: Path
) -> None:
    """An upgrade with LMs running: their cgroups are directories under /lmrunner."""
    old = tmp_path / "lmrunner" / "lm-old"
    old.mkdir(parents=True)
    (old / "cgroup.procs").write_text("")
    for name, text in {
        "cpu.stat": "usage_usec 2000000\n",
        "memory.current": "10\n",
        "memory.events": "oom_kill 0\n",
        "memory.stat": "anon 1\n",
    }.items():
        (old / name).write_text(text)  # fmt: skip
    ref = CgroupRef(2, "lm-old", (("unified", str(old)),))
    assert ctl.names() == ["lm-old"]
    assert ctl.existing("lm-old") == ref
    assert ctl.usage(ref).cpu_seconds == 2.0
    assert ctl.pids(ref) == frozenset()
    ctl.kill(ref)
    for file in old.iterdir():  # a real cgroup's interface files go with its rmdir
        file.unlink()
    ctl.remove(ref)
    assert not old.exists()
    assert systemd.calls == []  # systemd is not asked about what it never made
