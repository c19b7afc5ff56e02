"""What the core and the backends need from the drivers (issue 6), on fake cgroupfs trees.

``procs_files`` and :func:`~lmrunner.cgroups.base.enter` put a new process into its LM's cgroup,
``engine_path`` tells Docker where to put its container, ``signal`` reaches every process of an
LM, ``live_usage`` feeds ``lmrunner ps``, and v1 ``remove`` also removes the directories an
engine left in the hierarchies lmrunner does not use.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmrunner.cgroups import CgroupRef, open_controller
from lmrunner.cgroups.base import enter, live_usage, mkdir_chain, signal_all
from lmrunner.cgroups.v1 import V1Controller
from lmrunner.cgroups.v2 import V2Controller
from lmrunner.errors import CgroupError

DATA = Path(__file__).resolve().parents[2] / "data" / "mountinfo"
V2_FILES = {
    "cgroup.controllers": "cpuset cpu io memory pids\n",
    "cgroup.subtree_control": "",
    "cgroup.procs": "",
}
NO_PID = 2**22 + 1  # above the kernel's PID_MAX_LIMIT: never a process


def populate(path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (path / name).write_text(text)


@pytest.fixture
def v2root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake unified root; directories the driver creates get the files the kernel would add."""
    root = tmp_path / "cg2"
    root.mkdir()
    populate(root, V2_FILES)

    def with_files(top: Path, relative: Path) -> list[Path]:
        created = mkdir_chain(top, relative)
        for path in created:
            populate(path, V2_FILES)
        return created

    monkeypatch.setattr("lmrunner.cgroups.v2.mkdir_chain", with_files)
    return root


def v1_tree(
    root: Path, own: dict[str, str] | None = None
) -> tuple[dict[str, Path], dict[str, Path]]:
    """Mount points of a v1 host under ``root`` (cpu,cpuacct joined) and the bases lmrunner
    uses: the mount point joined with this process's ``own`` cgroup in that hierarchy."""
    mounts = {
        "cpu": root / "cpu,cpuacct",
        "cpuacct": root / "cpu,cpuacct",
        "memory": root / "memory",
        "pids": root / "pids",
        "freezer": root / "freezer",
    }
    bases = {c: m / (own or {}).get(c, "") for c, m in mounts.items()}
    for path in bases.values():
        path.mkdir(parents=True, exist_ok=True)
    return mounts, bases


# --- engine_path ------------------------------------------------------------------------------


@pytest.mark.parametrize(("parent", "expected"), [("lmrunner", "/lmrunner/x"),
                                                  ("/a/b", "/a/b/x")])  # fmt: skip
def test_v2_engine_path_is_the_path_from_the_root(v2root: Path, parent: str, expected: str) -> None:
    ctl = V2Controller(v2root, parent)
    ref = ctl.create("x")
    assert ctl.engine_path(ref) == expected


def test_v1_engine_path_one_path_in_every_hierarchy(tmp_path: Path) -> None:
    mounts, bases = v1_tree(tmp_path / "cg1")
    ctl = V1Controller(bases, "/lmrunner", roots=mounts)
    ref = ctl.create("x")
    assert ctl.engine_path(ref) == "/lmrunner/x"


def test_v1_engine_path_under_the_same_own_cgroup_everywhere(tmp_path: Path) -> None:
    own = dict.fromkeys(("cpu", "cpuacct", "memory", "pids", "freezer"), "user.slice")
    mounts, bases = v1_tree(tmp_path / "cg1", own)
    ctl = V1Controller(bases, "lmrunner", roots=mounts)
    assert ctl.engine_path(ctl.create("x")) == "/user.slice/lmrunner/x"


def test_v1_engine_path_none_when_own_cgroups_differ(tmp_path: Path) -> None:
    """A relative parent under a memory cgroup of its own: no single path names the LM."""
    mounts, bases = v1_tree(tmp_path / "cg1", {"memory": "process_api/abc"})
    ctl = V1Controller(bases, "lmrunner", roots=mounts)
    ref = ctl.create("x")
    assert ref.path("memory") == mounts["memory"] / "process_api/abc/lmrunner/x"
    assert ctl.engine_path(ref) is None


def test_v1_engine_path_none_without_roots(tmp_path: Path) -> None:
    _, bases = v1_tree(tmp_path / "cg1")
    ctl = V1Controller(bases, "/lmrunner")
    assert ctl.engine_path(ctl.create("x")) is None


def test_engine_path_refuses_a_cgroup_that_is_not_ours(v2root: Path) -> None:
    ctl = V2Controller(v2root, "lmrunner")
    with pytest.raises(CgroupError):
        ctl.engine_path(CgroupRef(2, "x", (("unified", str(v2root / "system.slice/x")),)))


# --- procs_files and enter --------------------------------------------------------------------


def test_v2_procs_files(v2root: Path) -> None:
    ctl = V2Controller(v2root, "lmrunner")
    ref = ctl.create("x")
    assert ctl.procs_files(ref) == (v2root / "lmrunner/x/cgroup.procs",)


def test_v1_procs_files_one_per_directory(tmp_path: Path) -> None:
    mounts, bases = v1_tree(tmp_path / "cg1")
    ctl = V1Controller(bases, "/lmrunner", roots=mounts)
    ref = ctl.create("x")
    files = ctl.procs_files(ref)
    # tasks: the new, single-threaded process moves itself without the threadgroup lock
    assert files == tuple(p / "lmrunner/x/tasks" for p in dict.fromkeys(mounts.values()))
    assert len(files) == 4  # cpu,cpuacct joined: written once


def test_v1_procs_files_refuses_a_cgroup_that_is_not_ours(tmp_path: Path) -> None:
    _, bases = v1_tree(tmp_path / "cg1")
    ctl = V1Controller(bases, "lmrunner")
    with pytest.raises(CgroupError):
        ctl.procs_files(CgroupRef(1, "x", (("memory", str(tmp_path / "elsewhere/x")),)))


def test_enter_writes_zero_to_each_procs_file(tmp_path: Path) -> None:
    files = [tmp_path / "a.procs", tmp_path / "b.procs"]
    for path in files:
        path.write_bytes(b"")
    enter(files)
    assert [path.read_bytes() for path in files] == [b"0", b"0"]


def test_enter_fails_on_a_missing_procs_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        enter([tmp_path / "gone" / "cgroup.procs"])


# --- signal -----------------------------------------------------------------------------------


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """os.kill recording what it is asked; NO_PID is a process that is gone already."""
    calls: list[tuple[int, int]] = []

    def kill(pid: int, signum: int) -> None:
        if pid == NO_PID:
            raise ProcessLookupError(pid)
        calls.append((pid, signum))

    monkeypatch.setattr("lmrunner.cgroups.base.os.kill", kill)
    return calls


def test_signal_all_skips_gone_processes(sent: list[tuple[int, int]]) -> None:
    assert signal_all([11, NO_PID, 12], signal.SIGTERM) == 2
    assert sent == [(11, signal.SIGTERM), (12, signal.SIGTERM)]


def test_v2_signal_reaches_the_whole_subtree(v2root: Path, sent: list[tuple[int, int]]) -> None:
    ctl = V2Controller(v2root, "lmrunner")
    ref = ctl.create("x")
    lm = v2root / "lmrunner/x"
    (lm / "cgroup.procs").write_text(f"101\n{NO_PID}\n")
    (lm / "engine").mkdir()  # a sub-cgroup made by the engine
    (lm / "engine/cgroup.procs").write_text("102\n103\n")
    assert ctl.signal(ref, signal.SIGHUP) == 3
    assert sorted(sent) == [(101, signal.SIGHUP), (102, signal.SIGHUP), (103, signal.SIGHUP)]


def test_v1_signal_each_process_once(tmp_path: Path, sent: list[tuple[int, int]]) -> None:
    _, bases = v1_tree(tmp_path / "cg1")
    ctl = V1Controller(bases, "lmrunner")
    ref = ctl.create("x")
    for path in ref.unique_paths():  # the same process in every hierarchy
        (path / "cgroup.procs").write_text("201\n")
    (bases["memory"] / "lmrunner/x/cgroup.procs").write_text("201\n202\n")
    assert ctl.signal(ref, signal.SIGTERM) == 2
    assert sorted(sent) == [(201, signal.SIGTERM), (202, signal.SIGTERM)]


def test_signal_of_a_removed_cgroup_reaches_nobody(
    v2root: Path, sent: list[tuple[int, int]]
) -> None:
    ctl = V2Controller(v2root, "lmrunner")
    ref = CgroupRef(2, "gone", (("unified", str(v2root / "lmrunner/gone")),))
    assert ctl.signal(ref, signal.SIGTERM) == 0
    assert sent == []


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


@pytest.mark.allow_subprocess
def test_v2_signal_real_processes(v2root: Path, sleepers: list[subprocess.Popen[bytes]]) -> None:
    ctl = V2Controller(v2root, "lmrunner")
    ref = ctl.create("x")
    sleepers.extend(subprocess.Popen(["sleep", "30"]) for _ in range(2))
    (v2root / "lmrunner/x/cgroup.procs").write_text("".join(f"{p.pid}\n" for p in sleepers))
    assert ctl.signal(ref, signal.SIGTERM) == 2
    assert [p.wait(timeout=10) for p in sleepers] == [-signal.SIGTERM, -signal.SIGTERM]


# --- open_controller: absolute and relative parents -------------------------------------------

OWN = (
    "12:memory:/process_api/abc\n4:cpu,cpuacct:/\n2:pids:/\n1:name=systemd:/user.slice\n"
    "0::/user.slice/session-1.scope\n"
)


def hybrid(tmp_path: Path, parent: str) -> V1Controller:
    own = tmp_path / "proc-self-cgroup"
    own.write_text(OWN)
    cgroup = tmp_path / "sys/fs/cgroup"
    for hierarchy in ("cpu", "cpuacct", "memory/process_api/abc", "pids", "freezer",
                      "cpuset", "devices", "blkio", "systemd/user.slice", "unified"):  # fmt: skip
        (cgroup / hierarchy).mkdir(parents=True)
    ctl = open_controller(
        parent,
        mountinfo_path=DATA / "hybrid_host.txt",
        proc_cgroup_path=own,
        root_override=tmp_path,
    )
    assert isinstance(ctl, V1Controller)
    return ctl


def test_open_controller_absolute_parent_starts_at_each_hierarchy_root(tmp_path: Path) -> None:
    ctl = hybrid(tmp_path, "/lmrunner")
    cgroup = tmp_path / "sys/fs/cgroup"
    assert ctl.bases["memory"] == cgroup / "memory"
    assert ctl.bases["cpu"] == cgroup / "cpu"
    assert ctl.roots["memory"] == cgroup / "memory"
    assert ctl.others["name=systemd"] == cgroup / "systemd"
    # Hybrid: runc makes the container's cgroup in the cgroup2 mount too.
    assert set(ctl.others) == {"cpuset", "devices", "blkio", "name=systemd", "unified"}
    assert ctl.others["unified"] == cgroup / "unified"
    ref = ctl.create("x")
    assert ref.path("memory") == cgroup / "memory/lmrunner/x"
    assert ctl.engine_path(ref) == "/lmrunner/x"


def test_open_controller_relative_parent_goes_under_the_own_cgroup(tmp_path: Path) -> None:
    ctl = hybrid(tmp_path, "lmrunner")
    cgroup = tmp_path / "sys/fs/cgroup"
    assert ctl.bases["memory"] == cgroup / "memory/process_api/abc"
    assert ctl.bases["cpu"] == cgroup / "cpu"  # its own cpu cgroup is the root
    assert ctl.roots["memory"] == cgroup / "memory"  # roots stay the mount points
    assert ctl.others["name=systemd"] == cgroup / "systemd/user.slice"
    assert ctl.others["unified"] == cgroup / "unified/user.slice/session-1.scope"
    ref = ctl.create("x")
    assert ref.path("memory") == cgroup / "memory/process_api/abc/lmrunner/x"
    assert ctl.engine_path(ref) is None  # memory differs from the others


def test_open_controller_v2_engine_path(tmp_path: Path, v2root: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"30 25 0:26 / {v2root} rw - cgroup2 cgroup2 rw,nsdelegate\n")
    ctl = open_controller("/lmrunner", mountinfo_path=mountinfo, proc_cgroup_path=tmp_path / "no")
    assert isinstance(ctl, V2Controller)
    assert ctl.engine_path(ctl.create("x")) == "/lmrunner/x"


# --- v1 remove and the engine's leftovers -----------------------------------------------------


def test_v1_remove_takes_empty_leftovers_in_unused_hierarchies(tmp_path: Path) -> None:
    root = tmp_path / "cg1"
    mounts, bases = v1_tree(root)
    others = {"cpuset": root / "cpuset", "blkio": root / "blkio", "net_cls": root / "net_cls",
              "net_prio": root / "net_cls"}  # fmt: skip
    ctl = V1Controller(bases, "/lmrunner", roots=mounts, others=others)
    ref = ctl.create("x")
    # runc, given engine_path, made the LM's directory in every hierarchy it knows.
    (root / "cpuset/lmrunner/x").mkdir(parents=True)
    (root / "net_cls/lmrunner/x").mkdir(parents=True)
    (root / "blkio/lmrunner/x/container").mkdir(parents=True)  # not empty: a live sub-cgroup
    ctl.remove(ref)
    assert all(not p.exists() for p in ref.unique_paths())
    assert not (root / "cpuset/lmrunner/x").exists()
    assert not (root / "net_cls/lmrunner/x").exists()
    assert (root / "blkio/lmrunner/x/container").is_dir()  # left for a later attempt
    assert (root / "cpuset/lmrunner").is_dir()  # the parent is not the LM's to remove
    ctl.remove(ref)  # idempotent, with or without leftovers


def test_v1_remove_without_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "cg1"
    mounts, bases = v1_tree(root)
    (root / "cpuset").mkdir()
    ctl = V1Controller(bases, "/lmrunner", roots=mounts, others={"cpuset": root / "cpuset"})
    ref = ctl.create("other")
    ctl.remove(ref)
    assert all(not p.exists() for p in ref.unique_paths())
    assert list((root / "cpuset").iterdir()) == []


def test_v1_remove_leaves_a_leftover_of_another_name(tmp_path: Path) -> None:
    root = tmp_path / "cg1"
    mounts, bases = v1_tree(root)
    ctl = V1Controller(bases, "/lmrunner", roots=mounts, others={"cpuset": root / "cpuset"})
    ref = ctl.create("x")
    (root / "cpuset/lmrunner/y").mkdir(parents=True)  # another LM's
    ctl.remove(ref)
    assert (root / "cpuset/lmrunner/y").is_dir()


# --- live_usage (ps) --------------------------------------------------------------------------


def test_live_usage_v2(v2root: Path) -> None:
    ref = V2Controller(v2root, "lmrunner").create("x")
    populate(
        v2root / "lmrunner/x",
        {"cpu.stat": "usage_usec 2500000\nuser_usec 2000000\n", "memory.current": "1048576\n"},
    )
    assert live_usage(ref) == (2.5, 1048576)


def test_live_usage_v1(tmp_path: Path) -> None:
    _, bases = v1_tree(tmp_path / "cg1", {"memory": "process_api/abc"})
    ref = V1Controller(bases, "lmrunner").create("x")
    populate(bases["cpuacct"] / "lmrunner/x", {"cpuacct.usage": "1582000000\n"})
    populate(bases["memory"] / "lmrunner/x", {"memory.usage_in_bytes": "4096\n"})
    assert live_usage(ref) == (1.582, 4096)


def test_live_usage_of_a_removed_cgroup_is_none(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    assert live_usage(CgroupRef(2, "x", (("unified", str(gone)),))) is None
    v1 = CgroupRef(1, "x", (("cpuacct", str(gone)), ("memory", str(gone))))
    assert live_usage(v1) is None


def test_live_usage_of_an_incomplete_reference_is_none(tmp_path: Path) -> None:
    assert live_usage(CgroupRef(2, "x", ())) is None
    assert live_usage(CgroupRef(1, "x", (("cpuacct", str(tmp_path)),))) is None


def test_live_usage_of_an_unreadable_counter_is_none(v2root: Path) -> None:
    ref = V2Controller(v2root, "lmrunner").create("x")
    populate(v2root / "lmrunner/x", {"cpu.stat": "usage_usec 1\n", "memory.current": "max\n"})
    assert live_usage(ref) is None


def test_live_usage_without_usage_usec_counts_zero_cpu(v2root: Path) -> None:
    ref = V2Controller(v2root, "lmrunner").create("x")
    populate(v2root / "lmrunner/x", {"cpu.stat": "", "memory.current": "10\n"})
    assert live_usage(ref) == (0.0, 10)
