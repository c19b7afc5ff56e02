"""Both drivers against a fake cgroupfs in tmp_path: the files written and read, exactly."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from lmrunner.cgroups import CgroupController, CgroupRef, Mode, base, open_controller
from lmrunner.cgroups.v1 import V1Controller
from lmrunner.cgroups.v2 import V2Controller
from lmrunner.errors import CgroupError, CgroupUnsupported

DATA = Path(__file__).resolve().parents[2] / "data" / "mountinfo"
MIB = 1024 * 1024
V2_FILES = {
    "cgroup.controllers": "cpuset cpu io memory pids\n",
    "cgroup.subtree_control": "",
    "cgroup.procs": "",
}


def populate(path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (path / name).write_text(text)


# --- v2 ---------------------------------------------------------------------------------------


@pytest.fixture
def v2root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake unified root; directories the driver creates get the files the kernel would add."""
    root = tmp_path / "cg2"
    root.mkdir()
    populate(root, V2_FILES)
    real = base.mkdir_chain

    def mkdir_chain(top: Path, relative: Path) -> list[Path]:
        created = real(top, relative)
        for path in created:
            populate(path, V2_FILES)
        return created

    monkeypatch.setattr("lmrunner.cgroups.v2.mkdir_chain", mkdir_chain)
    return root


def test_v2_create_enables_controllers_top_down(v2root: Path) -> None:
    ctl = V2Controller(v2root, "lmrunner.slice/factory")
    ref = ctl.create("lm1")
    assert ref == CgroupRef(2, "lm1", (("unified", str(v2root / "lmrunner.slice/factory/lm1")),))
    assert (v2root / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    parent = v2root / "lmrunner.slice/factory"
    assert (parent.parent / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (parent / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (parent / "lm1").is_dir()


def test_v2_existing_parent_is_not_reconfigured_above(v2root: Path) -> None:
    parent = v2root / "lmrunner"
    parent.mkdir()
    populate(parent, V2_FILES | {"cgroup.subtree_control": "cpu memory pids\n"})
    V2Controller(v2root, "lmrunner").create("lm1")
    assert (v2root / "cgroup.subtree_control").read_text() == ""  # not ours: untouched
    assert (parent / "cgroup.subtree_control").read_text() == "cpu memory pids\n"


def test_v2_missing_controller_is_unsupported(v2root: Path) -> None:
    (v2root / "cgroup.controllers").write_text("cpu pids\n")
    with pytest.raises(CgroupUnsupported, match="memory"):
        V2Controller(v2root, "lmrunner").create("lm1")


def test_v2_set_limits_writes_exact_values(v2root: Path) -> None:
    ctl = V2Controller(v2root, "lmrunner")
    ref = ctl.create("lm1")
    lm = Path(ref.paths[0][1])
    (lm / "memory.swap.max").write_text("max\n")
    ctl.set_limits(ref, cpus=1.5, memory_bytes=100 * MIB, swap_bytes=0, pids=64)
    written = {p.name: p.read_text() for p in lm.iterdir() if p.name not in V2_FILES}
    assert written == {
        "cpu.max": "150000 100000",
        "cpu.weight": "150",
        "memory.max": str(100 * MIB),
        "memory.high": "99614720",
        "memory.swap.max": "0",
        "memory.oom.group": "1",
        "pids.max": "64",
    }


def test_v2_no_swap_file_no_swap_write(v2root: Path) -> None:
    ctl = V2Controller(v2root, "lmrunner")
    ref = ctl.create("lm1")
    ctl.set_limits(ref, cpus=1, memory_bytes=MIB, swap_bytes=0, pids=1)
    assert not (v2root / "lmrunner/lm1/memory.swap.max").exists()


def test_v2_usage(v2root: Path) -> None:
    ctl = V2Controller(v2root, "lmrunner")
    ref = ctl.create("lm1")
    populate(
        v2root / "lmrunner/lm1",
        {
            "cpu.stat": "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n"
            "nr_periods 40\nnr_throttled 7\nthrottled_usec 350000\n",
            "memory.current": "1048576\n",
            "memory.peak": "33554432\n",
            "memory.events": "low 0\nhigh 3\nmax 12\noom 2\noom_kill 1\noom_group_kill 1\n",
            "memory.stat": "anon 786432\nfile 262144\nkernel 4096\n",
        },
    )
    usage = ctl.usage(ref)
    assert usage.cpu_seconds == 2.5
    assert usage.memory_bytes == MIB
    assert usage.memory_peak_bytes == 32 * MIB
    assert usage.oom_kills == 1
    assert (usage.throttled_periods, usage.throttled_seconds) == (7, 0.35)
    assert (usage.memory_anon_bytes, usage.memory_file_bytes) == (786432, 262144)
    (v2root / "lmrunner/lm1/memory.peak").unlink()  # kernels before 5.19
    assert ctl.usage(ref).memory_peak_bytes is None


def test_v2_add_pid_pids_and_subtree(v2root: Path) -> None:
    ctl = V2Controller(v2root, "lmrunner")
    ref = ctl.create("lm1")
    ctl.add_pid(ref, 1234)
    assert (v2root / "lmrunner/lm1/cgroup.procs").read_text() == "1234"
    sub = v2root / "lmrunner/lm1/payload"
    sub.mkdir()
    (sub / "cgroup.procs").write_text("55\n56\n")
    assert ctl.pids(ref) == {1234, 55, 56}


def test_v2_freeze_thaw(v2root: Path) -> None:
    ctl = V2Controller(v2root, "lmrunner")
    ref = ctl.create("lm1")
    events = v2root / "lmrunner/lm1/cgroup.events"
    events.write_text("populated 1\nfrozen 1\n")
    ctl.freeze(ref, timeout=0.1)
    assert (v2root / "lmrunner/lm1/cgroup.freeze").read_text() == "1"
    with pytest.raises(CgroupError, match="frozen 0"):
        ctl.thaw(ref, timeout=0.05)  # the fake kernel never thaws
    events.write_text("populated 1\nfrozen 0\n")
    ctl.thaw(ref, timeout=0.1)
    assert (v2root / "lmrunner/lm1/cgroup.freeze").read_text() == "0"


def fake_kill(monkeypatch: pytest.MonkeyPatch, procs: list[Path]) -> list[tuple[int, int]]:
    """os.kill that records the signal and empties the cgroup (as the kernel would)."""
    sent: list[tuple[int, int]] = []

    def kill(pid: int, sig: int) -> None:
        sent.append((pid, sig))
        for path in procs:
            path.write_text("")

    monkeypatch.setattr("lmrunner.cgroups.base.os.kill", kill)
    return sent


def test_v2_kill_writes_cgroup_kill(v2root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctl = V2Controller(v2root, "lmrunner")
    ref = ctl.create("lm1")
    lm = v2root / "lmrunner/lm1"
    (lm / "cgroup.kill").write_text("")
    (lm / "cgroup.procs").write_text("4242\n")
    sent = fake_kill(monkeypatch, [lm / "cgroup.procs"])
    ctl.kill(ref, timeout=0.05)  # fake kernel ignores cgroup.kill: falls back to signals
    assert (lm / "cgroup.kill").read_text() == "1"
    assert sent == [(4242, signal.SIGKILL)]


def test_v2_kill_times_out(v2root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctl = V2Controller(v2root, "lmrunner")
    ref = ctl.create("lm1")
    (v2root / "lmrunner/lm1/cgroup.procs").write_text("4242\n")
    fake_kill(monkeypatch, [])  # the process never dies
    with pytest.raises(CgroupError, match="still has processes"):
        ctl.kill(ref, timeout=0.05)


def test_v2_remove_and_release(v2root: Path) -> None:
    ctl = V2Controller(v2root, "lmrunner")
    ref = ctl.create("lm1")
    lm = v2root / "lmrunner/lm1"
    for name in V2_FILES:  # a real cgroupfs rmdir ignores interface files; the fake cannot
        (lm / name).unlink(missing_ok=True)
    ctl.release()  # not empty: kept
    assert (v2root / "lmrunner").exists()
    ctl.remove(ref)
    ctl.remove(ref)  # idempotent
    assert not lm.exists()
    for name in V2_FILES:
        (v2root / "lmrunner" / name).unlink()
    ctl.release()
    assert not (v2root / "lmrunner").exists()


def test_v2_release_keeps_a_parent_it_did_not_create(v2root: Path) -> None:
    (v2root / "lmrunner").mkdir()
    populate(v2root / "lmrunner", V2_FILES)
    ctl = V2Controller(v2root, "lmrunner")
    ctl.create("lm1")
    (v2root / "lmrunner/lm1").rename(v2root / "elsewhere")
    for name in V2_FILES:
        (v2root / "lmrunner" / name).unlink()
    ctl.release()
    assert (v2root / "lmrunner").is_dir()


@pytest.mark.parametrize(
    "ref",
    [
        CgroupRef(2, "lm1", (("unified", "/sys/fs/cgroup/system.slice/lm1"),)),
        CgroupRef(2, "lm1", (("unified", "/sys/fs/cgroup/lmrunner/other"),)),
        CgroupRef(1, "lm1", (("memory", "/sys/fs/cgroup/lmrunner/lm1"),)),
    ],
)
def test_v2_refuses_cgroups_it_does_not_own(v2root: Path, ref: CgroupRef) -> None:
    ctl = V2Controller(v2root, "lmrunner")
    with pytest.raises(CgroupError):
        ctl.remove(ref)
    with pytest.raises(CgroupError):
        ctl.kill(ref)


@pytest.mark.parametrize("name", ["", "a/b", "..", "."])
def test_invalid_names(v2root: Path, name: str) -> None:
    with pytest.raises(CgroupError):
        V2Controller(v2root, "lmrunner").create(name)


# --- v1 ---------------------------------------------------------------------------------------


def v1_fake(tmp_path: Path, joined: bool) -> dict[str, Path]:
    root = tmp_path / "cg1"
    cpu = root / ("cpu,cpuacct" if joined else "cpu")
    bases = {
        "cpu": cpu,
        "cpuacct": cpu if joined else root / "cpuacct",
        "memory": root / "memory/process_api/own",
        "pids": root / "pids",
        "freezer": root / "freezer",
    }
    for path in bases.values():
        path.mkdir(parents=True, exist_ok=True)
    return bases


def test_v1_create_paths_and_limits(tmp_path: Path) -> None:
    bases = v1_fake(tmp_path, joined=True)
    ctl = V1Controller(bases, "lmrunner")
    ref = ctl.create("lm1")
    assert ref.paths == tuple((c, str(b / "lmrunner/lm1")) for c, b in bases.items())
    assert len(ref.unique_paths()) == 4  # cpu,cpuacct joined: one directory
    memory = bases["memory"] / "lmrunner/lm1"
    (memory / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    ctl.set_limits(ref, cpus=0.5, memory_bytes=64 * MIB, swap_bytes=0, pids=30)
    cpu = bases["cpu"] / "lmrunner/lm1"
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "50000"
    assert (cpu / "cpu.shares").read_text() == "512"
    assert (memory / "memory.limit_in_bytes").read_text() == str(64 * MIB)
    assert not (memory / "memory.memsw.limit_in_bytes").exists()
    assert (bases["pids"] / "lmrunner/lm1/pids.max").read_text() == "30"


@pytest.mark.parametrize(
    ("current", "limit", "order"),
    [
        (128 * MIB, 64 * MIB, ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]),
        (32 * MIB, 64 * MIB, ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"]),
    ],
)
def test_v1_memsw_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, current: int, limit: int, order: list[str]
) -> None:
    bases = v1_fake(tmp_path, joined=False)
    ctl = V1Controller(bases, "lmrunner")
    ref = ctl.create("lm1")
    memory = bases["memory"] / "lmrunner/lm1"
    (memory / "memory.limit_in_bytes").write_text(f"{current}\n")
    (memory / "memory.memsw.limit_in_bytes").write_text(f"{current}\n")
    writes: list[str] = []
    real = base.write

    def recording(path: Path, value: str | int) -> None:
        writes.append(path.name)
        real(path, value)

    monkeypatch.setattr("lmrunner.cgroups.v1.write", recording)
    ctl.set_limits(ref, cpus=1, memory_bytes=limit, swap_bytes=MIB, pids=10)
    assert [w for w in writes if w.startswith("memory.")] == order
    assert (memory / "memory.memsw.limit_in_bytes").read_text() == str(limit + MIB)


def test_v1_usage(tmp_path: Path) -> None:
    bases = v1_fake(tmp_path, joined=False)
    ctl = V1Controller(bases, "lmrunner")
    ref = ctl.create("lm1")
    populate(
        bases["cpu"] / "lmrunner/lm1",
        {"cpu.stat": "nr_periods 30\nnr_throttled 17\nthrottled_time 1500000000\n"},
    )
    populate(bases["cpuacct"] / "lmrunner/lm1", {"cpuacct.usage": "1582000000\n"})
    populate(
        bases["memory"] / "lmrunner/lm1",
        {
            "memory.usage_in_bytes": "4096\n",
            "memory.max_usage_in_bytes": "67108864\n",
            "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
            "memory.stat": "cache 10\nrss 20\ntotal_cache 100\ntotal_rss 200\n",
        },
    )
    usage = ctl.usage(ref)
    assert usage.cpu_seconds == 1.582
    assert (usage.memory_bytes, usage.memory_peak_bytes, usage.oom_kills) == (4096, 64 * MIB, 1)
    assert (usage.throttled_periods, usage.throttled_seconds) == (17, 1.5)
    assert (usage.memory_anon_bytes, usage.memory_file_bytes) == (200, 100)


def test_v1_add_pid_each_hierarchy_once(tmp_path: Path) -> None:
    bases = v1_fake(tmp_path, joined=True)
    ctl = V1Controller(bases, "lmrunner")
    ref = ctl.create("lm1")
    ctl.add_pid(ref, 77)
    for path in ref.unique_paths():
        assert (path / "cgroup.procs").read_text() == "77"
    assert ctl.pids(ref) == {77}


def test_v1_kill_freezes_around_signals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bases = v1_fake(tmp_path, joined=False)
    ctl = V1Controller(bases, "lmrunner")
    ref = ctl.create("lm1")
    procs = [p / "cgroup.procs" for p in ref.unique_paths()]
    for path in procs:
        path.write_text("99\n")
    freezer = bases["freezer"] / "lmrunner/lm1/freezer.state"
    freezer.write_text("THAWED\n")
    states: list[str] = []
    real_kill = fake_kill(monkeypatch, procs)

    def set_state(self: V1Controller, path: Path, state: str, timeout: float) -> None:
        states.append(state)
        (path / "freezer.state").write_text(state)

    monkeypatch.setattr(V1Controller, "_set_state", set_state)
    ctl.kill(ref, timeout=1)
    assert real_kill == [(99, signal.SIGKILL)]
    assert states == ["FROZEN", "THAWED"]
    assert ctl.pids(ref) == frozenset()


def test_v1_remove_release(tmp_path: Path) -> None:
    bases = v1_fake(tmp_path, joined=True)
    ctl = V1Controller(bases, "lmrunner")
    ref = ctl.create("lm1")
    ctl.remove(ref)
    ctl.remove(ref)
    assert all(not p.exists() for p in ref.unique_paths())
    ctl.release()
    assert all(not (b / "lmrunner").exists() for b in bases.values())
    assert all(b.exists() for b in bases.values())  # the machine's own cgroups stay


def test_v1_needs_its_hierarchies(tmp_path: Path) -> None:
    bases = v1_fake(tmp_path, joined=False)
    del bases["pids"]
    with pytest.raises(CgroupError, match="pids"):
        V1Controller(bases, "lmrunner")


# --- the one place choosing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sample", "kind"),
    [
        ("hybrid_host.txt", V1Controller),
        ("legacy_v1.txt", V1Controller),
        ("unified_v2.txt", V2Controller),
    ],
)
def test_open_controller_chooses(tmp_path: Path, sample: str, kind: type) -> None:
    own = tmp_path / "cgroup"
    own.write_text("4:memory:/process_api/abc\n2:cpu,cpuacct:/\n0::/\n")
    ctl = open_controller(
        "lmrunner",
        mountinfo_path=DATA / sample,
        proc_cgroup_path=own,
        root_override=tmp_path,
        systemd_dir=tmp_path / "no-systemd",  # whatever runs the tests
    )
    assert isinstance(ctl, kind)
    assert isinstance(ctl, CgroupController)
    if isinstance(ctl, V1Controller):
        assert ctl.bases["memory"] == tmp_path / "sys/fs/cgroup/memory/process_api/abc"
        if sample == "legacy_v1.txt":
            assert (
                ctl.bases["cpu"] == ctl.bases["cpuacct"] == tmp_path / "sys/fs/cgroup/cpu,cpuacct"
            )
    else:
        assert isinstance(ctl, V2Controller)
        assert ctl.root == tmp_path / "sys/fs/cgroup"


def test_open_controller_none_is_unsupported(tmp_path: Path) -> None:
    with pytest.raises(CgroupUnsupported):
        open_controller("lmrunner", mountinfo_path=DATA / "none.txt", root_override=tmp_path)


def test_open_controller_v1_without_pids_is_unsupported(tmp_path: Path) -> None:
    text = "30 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    (tmp_path / "mi").write_text(text)
    with pytest.raises(CgroupUnsupported):
        open_controller("lmrunner", mountinfo_path=tmp_path / "mi", root_override=tmp_path)


def test_open_controller_namespace_root(tmp_path: Path) -> None:
    """Inside a cgroup namespace the mount shows a subtree: the own path is made relative."""
    (tmp_path / "mi").write_text(
        "".join(
            f"3{i} 25 0:2{i} /lxc/c1 /sys/fs/cgroup/{c} rw - cgroup cgroup rw,{c}\n"
            for i, c in enumerate(["cpu", "cpuacct", "memory", "pids"])
        )
    )
    (tmp_path / "cg").write_text("4:memory:/lxc/c1/inner\n")
    ctl = open_controller(
        "lmrunner",
        mountinfo_path=tmp_path / "mi",
        proc_cgroup_path=tmp_path / "cg",
        root_override=tmp_path,
    )
    assert isinstance(ctl, V1Controller)
    assert ctl.bases["memory"] == tmp_path / "sys/fs/cgroup/memory/inner"
    assert ctl.bases["cpu"] == tmp_path / "sys/fs/cgroup/cpu"


def test_mode_reexported() -> None:
    assert Mode.HYBRID.value == "hybrid"
