"""lmrunner.diskmethods without root, mkfs or mount: DiskRef, image_bytes, LoopDisks on a faked
lmrunner.runner.run and os.path.ismount, open_disk_method, loop_missing and describe."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from lmrunner import diskmethods, runner
from lmrunner.config import DiskMethodName, FactoryConfig
from lmrunner.diskmethods import (
    MKFS_OPTIONS,
    MOUNT_OPTIONS,
    DiskError,
    DiskRef,
    DiskUnsupported,
    DiskUsage,
    LoopDisks,
    describe,
    image_bytes,
    loop_missing,
    open_disk_method,
)
from lmrunner.errors import CommandError, CommandTimeout
from tests.unit.test_factory import Env

MIB = 1 << 20
GB = 10**9


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = Env(tmp_path)
    yield made
    made.close()


def factory_of(env: Env, method: DiskMethodName) -> FactoryConfig:
    return replace(env.config().factory, disk_method=method)


class FakeRun:
    """lmrunner.runner.run that runs nothing: records argvs, fails the commands it is told to."""

    def __init__(self) -> None:
        self.argvs: list[list[str]] = []
        self.failing: dict[str, CommandError] = {}  # by argv[0] (or "umount --lazy")

    def __call__(
        self,
        argv: Sequence[str | Path],
        *,
        timeout: float | None = 60.0,
        ok_codes: Collection[int] = (0,),
        input_text: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> runner.Completed:
        args = [str(a) for a in argv]
        self.argvs.append(args)
        key = "umount --lazy" if args[:2] == ["umount", "--lazy"] else args[0]
        if key in self.failing:
            raise self.failing[key]
        return runner.Completed(tuple(args), 0, "", "", 0.0)

    def fail(self, key: str, stderr: str) -> None:
        self.failing[key] = CommandError([key], 1, "", stderr)

    def programs(self) -> list[str]:
        return [" ".join(argv[:2]) if argv[1] == "--lazy" else argv[0] for argv in self.argvs]


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch) -> FakeRun:
    fake = FakeRun()
    monkeypatch.setattr(runner, "run", fake)
    return fake


def mounted_at(monkeypatch: pytest.MonkeyPatch, *mounts: Path) -> None:
    real = os.path.ismount

    def ismount(path: Any) -> bool:
        return Path(path) in mounts or real(path)

    monkeypatch.setattr("os.path.ismount", ismount)


@pytest.fixture
def loop(tmp_path: Path) -> LoopDisks:
    (tmp_path / "state").mkdir()
    return LoopDisks(tmp_path / "state" / "disks")


def planned(loop: LoopDisks, tmp_path: Path, size: int = GB) -> DiskRef:
    return loop.plan("aaaaaaaa-uuid", tmp_path / "lm" / "mnt", size)


# --- DiskRef and image_bytes ---------------------------------------------------------------------


def test_a_disk_ref_survives_its_json() -> None:
    ref = DiskRef("loop", Path("/var/lib/lmrunner/disks/u.img"), Path("/lm/mnt"), 40 * GB)
    assert DiskRef.from_json(ref.to_json()) == ref


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "",
        "null",
        "[]",
        '"loop"',
        '{"method": "loop", "image": "/i", "mount": "/m"}',
        '{"method": "loop", "image": null, "mount": "/m", "size_bytes": 1}',
        '{"method": "loop", "image": "/i", "mount": "/m", "size_bytes": "big"}',
    ],
)
def test_an_unreadable_disk_ref_is_a_disk_error(text: str) -> None:
    with pytest.raises(DiskError, match="unreadable disk reference"):
        DiskRef.from_json(text)


def test_loop_plans_an_image_per_uuid(loop: LoopDisks, tmp_path: Path) -> None:
    ref = planned(loop, tmp_path)
    assert ref == DiskRef("loop", loop.root / "aaaaaaaa-uuid.img", tmp_path / "lm" / "mnt", GB)


@pytest.mark.parametrize("size", [0, 100 * MIB, GB, 100 * GB])
def test_the_image_has_room_for_inodes_and_a_slack(size: int) -> None:
    extra = image_bytes(size) - size - MIB
    assert extra == size // 128  # 256-byte inodes, one per 32 KiB: 0.78 %
    assert 0.0078 * size <= extra <= 0.0079 * size


# --- LoopDisks: backing and allocated ------------------------------------------------------------


def test_backing_lists_the_uuids_of_images_only(loop: LoopDisks) -> None:
    loop.root.mkdir(parents=True)
    for name in ("b-uuid.img", "a-uuid.img", "notes.txt", "c-uuid.img.tmp", "img"):
        (loop.root / name).write_bytes(b"")
    assert loop.backing() == ["a-uuid", "b-uuid"]


def test_backing_of_a_missing_folder_is_empty(loop: LoopDisks) -> None:
    assert loop.backing() == []


def test_backing_of_an_unreadable_folder_is_a_disk_error(loop: LoopDisks) -> None:
    loop.root.write_bytes(b"a file where the folder should be")
    with pytest.raises(DiskError, match="cannot list"):
        loop.backing()


def test_a_sparse_image_allocates_little(loop: LoopDisks, tmp_path: Path) -> None:
    ref = planned(loop, tmp_path, 100 * GB)
    loop.root.mkdir(parents=True)
    with ref.image.open("wb") as image:
        image.truncate(image_bytes(ref.size_bytes))
        image.seek(5 * MIB)
        image.write(b"x" * MIB)
    assert ref.image.stat().st_size > 100 * GB
    assert MIB <= loop.allocated(ref) < 4 * MIB


def test_a_missing_image_allocates_nothing(loop: LoopDisks, tmp_path: Path) -> None:
    assert loop.allocated(planned(loop, tmp_path)) == 0


# --- LoopDisks: create ---------------------------------------------------------------------------


def test_create_makes_a_sparse_image_formats_and_mounts_it(
    loop: LoopDisks, tmp_path: Path, run: FakeRun
) -> None:
    ref = planned(loop, tmp_path)
    loop.create(ref)
    assert stat.S_IMODE(loop.root.stat().st_mode) == 0o700
    assert ref.mount.is_dir()
    info = ref.image.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_size == image_bytes(GB)
    assert info.st_blocks * 512 < MIB  # nothing written: mkfs did not run
    assert run.argvs == [
        ["mkfs.ext4", *MKFS_OPTIONS, "-L", "lmrunner", str(ref.image)],
        ["mount", "-o", MOUNT_OPTIONS, str(ref.image), str(ref.mount)],
    ]
    assert "^has_journal" in MKFS_OPTIONS
    assert "nodev" in MOUNT_OPTIONS and "nosuid" in MOUNT_OPTIONS


@pytest.mark.parametrize("failing", ["mkfs.ext4", "mount"])
def test_a_failed_create_leaves_no_image(
    loop: LoopDisks, tmp_path: Path, run: FakeRun, failing: str
) -> None:
    ref = planned(loop, tmp_path)
    run.fail(failing, f"{failing}: something broke")
    with pytest.raises(DiskError, match=f"cannot make the filesystem of .*{failing}: something"):
        loop.create(ref)
    assert not ref.image.exists()
    assert loop.backing() == []
    # Not mounted: nothing to unmount.
    assert "umount" not in run.programs()


def test_a_timed_out_mkfs_leaves_no_image(
    loop: LoopDisks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def slow(argv: Sequence[str | Path], **kwargs: Any) -> runner.Completed:
        raise CommandTimeout([str(a) for a in argv], 60.0, "", "")

    monkeypatch.setattr(runner, "run", slow)
    ref = planned(loop, tmp_path)
    with pytest.raises(DiskError, match="timed out"):
        loop.create(ref)
    assert not ref.image.exists()


def test_an_image_that_cannot_be_made_is_a_disk_error(tmp_path: Path, run: FakeRun) -> None:
    loop = LoopDisks(tmp_path / "missing" / "disks")  # its parent does not exist
    ref = planned(loop, tmp_path)
    with pytest.raises(DiskError, match=r"cannot make .*No such file"):
        loop.create(ref)
    assert run.argvs == []


def test_a_failed_mount_of_a_mounted_disk_unmounts_it(
    loop: LoopDisks, tmp_path: Path, run: FakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mount can fail after attaching (a timeout): what a failed create made is undone."""
    ref = planned(loop, tmp_path)
    mounted_at(monkeypatch, ref.mount)
    run.fail("mount", "mount: timed out")
    with pytest.raises(DiskError):
        loop.create(ref)
    assert run.programs() == ["mkfs.ext4", "mount", "umount"]
    assert not ref.image.exists()


# --- LoopDisks: usage and release ----------------------------------------------------------------


@dataclass(frozen=True)
class StatVfs:
    f_blocks: int
    f_bfree: int
    f_frsize: int


def test_usage_is_none_when_not_mounted(loop: LoopDisks, tmp_path: Path) -> None:
    ref = planned(loop, tmp_path)
    ref.mount.mkdir(parents=True)
    assert loop.usage(ref) is None


def test_usage_reads_the_mounted_filesystem(
    loop: LoopDisks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = planned(loop, tmp_path)
    mounted_at(monkeypatch, ref.mount)
    asked: list[Path] = []

    def statvfs(path: Path) -> StatVfs:
        asked.append(Path(path))
        return StatVfs(f_blocks=1000, f_bfree=250, f_frsize=4096)

    monkeypatch.setattr("os.statvfs", statvfs)
    assert loop.usage(ref) == DiskUsage(750 * 4096, 1000 * 4096)
    assert asked == [ref.mount]


def test_usage_of_a_vanished_mount_is_none(
    loop: LoopDisks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = planned(loop, tmp_path)
    mounted_at(monkeypatch, ref.mount)

    def statvfs(path: Path) -> StatVfs:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr("os.statvfs", statvfs)
    assert loop.usage(ref) is None


def made_image(ref: DiskRef) -> None:
    ref.image.parent.mkdir(parents=True, exist_ok=True)
    ref.image.write_bytes(b"")
    ref.mount.mkdir(parents=True, exist_ok=True)


def test_release_of_an_unmounted_disk_removes_its_image_idempotently(
    loop: LoopDisks, tmp_path: Path, run: FakeRun
) -> None:
    ref = planned(loop, tmp_path)
    made_image(ref)
    loop.release(ref)
    assert not ref.image.exists()
    loop.release(ref)
    assert run.argvs == []


def test_release_unmounts_then_removes(
    loop: LoopDisks, tmp_path: Path, run: FakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = planned(loop, tmp_path)
    made_image(ref)
    mounted_at(monkeypatch, ref.mount)
    loop.release(ref)
    assert run.argvs == [["umount", str(ref.mount)]]
    assert not ref.image.exists()


def test_a_busy_disk_is_detached_lazily(
    loop: LoopDisks, tmp_path: Path, run: FakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = planned(loop, tmp_path)
    made_image(ref)
    mounted_at(monkeypatch, ref.mount)
    run.fail("umount", "umount: target is busy.")
    loop.release(ref)
    assert run.argvs == [["umount", str(ref.mount)], ["umount", "--lazy", str(ref.mount)]]
    assert not ref.image.exists()


def test_a_disk_that_cannot_be_unmounted_keeps_its_image(
    loop: LoopDisks, tmp_path: Path, run: FakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = planned(loop, tmp_path)
    made_image(ref)
    mounted_at(monkeypatch, ref.mount)
    run.fail("umount", "umount: target is busy.")
    run.fail("umount --lazy", "umount: not permitted")
    with pytest.raises(DiskError, match=r"cannot unmount .*not permitted"):
        loop.release(ref)
    assert ref.image.exists()


def test_an_image_that_cannot_be_removed_is_a_disk_error(
    loop: LoopDisks, tmp_path: Path, run: FakeRun
) -> None:
    ref = planned(loop, tmp_path)
    ref.image.mkdir(parents=True)  # a folder: unlink fails whoever runs the test
    with pytest.raises(DiskError, match="cannot remove"):
        loop.release(ref)


# --- open_disk_method, loop_missing and describe -------------------------------------------------


def test_no_method_when_asked_for_none(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def never() -> str | None:
        raise AssertionError("the host is not probed for disk_method none")

    monkeypatch.setattr(diskmethods, "loop_missing", never)
    assert open_disk_method(factory_of(env, DiskMethodName.NONE)) is None


@pytest.mark.parametrize("method", [DiskMethodName.AUTO, DiskMethodName.LOOP])
def test_loop_disks_where_the_host_can(
    env: Env, monkeypatch: pytest.MonkeyPatch, method: DiskMethodName
) -> None:
    monkeypatch.setattr(diskmethods, "loop_missing", lambda: None)
    opened = open_disk_method(factory_of(env, method))
    assert isinstance(opened, LoopDisks)
    assert opened.root == env.state_dir / "disks"
    assert opened.name == "loop"


@pytest.mark.parametrize("method", [DiskMethodName.AUTO, DiskMethodName.LOOP])
def test_unsupported_where_the_host_cannot(
    env: Env, monkeypatch: pytest.MonkeyPatch, method: DiskMethodName
) -> None:
    monkeypatch.setattr(diskmethods, "loop_missing", lambda: "mkfs.ext4 not found")
    with pytest.raises(DiskUnsupported, match=f"factory.disk_method {method}: mkfs.ext4 not found"):
        open_disk_method(factory_of(env, method))


def with_mode(mode: int) -> Callable[[], os.stat_result]:
    return lambda: os.stat_result((mode, 0, 0, 0, 0, 0, 0, 0, 0, 0))


class FakeLoopControl:
    """Stands for ``Path`` in diskmethods: only /dev/loop-control is looked at through it."""

    stat_of: Callable[[], os.stat_result] = staticmethod(with_mode(stat.S_IFCHR | 0o660))

    def __init__(self, path: str) -> None:
        assert path == "/dev/loop-control"

    def stat(self) -> os.stat_result:
        return type(self).stat_of()


def failing(code: int) -> Callable[[], os.stat_result]:
    def stat_of() -> os.stat_result:
        raise OSError(code, os.strerror(code))

    return stat_of


@pytest.mark.parametrize(
    ("stat_of", "missing"),
    [
        (with_mode(stat.S_IFCHR | 0o660), None),
        (with_mode(stat.S_IFREG | 0o644), "/dev/loop-control is not a device"),
        (failing(errno.ENOENT), "no /dev/loop-control (is the loop module loaded?)"),
        (failing(errno.EACCES), "/dev/loop-control: Permission denied"),
    ],
    ids=["device", "a-file", "absent", "forbidden"],
)
def test_loop_missing_looks_at_loop_control(
    monkeypatch: pytest.MonkeyPatch, stat_of: Callable[[], os.stat_result], missing: str | None
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda tool: f"/usr/sbin/{tool}")
    monkeypatch.setattr(FakeLoopControl, "stat_of", staticmethod(stat_of))
    monkeypatch.setattr(diskmethods, "Path", FakeLoopControl)
    assert loop_missing() == missing


def test_loop_missing_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert loop_missing() == "mounting needs root"


@pytest.mark.parametrize("tool", ["mkfs.ext4", "mount", "umount"])
def test_loop_missing_needs_the_tools(monkeypatch: pytest.MonkeyPatch, tool: str) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda name: None if name == tool else f"/usr/bin/{name}")
    assert loop_missing() == f"{tool} not found"


def test_describe_says_where_the_writes_go(tmp_path: Path) -> None:
    assert describe(None) == "disks: none (LMs write into the state directory, unbounded)"
    assert describe(LoopDisks(tmp_path / "disks")) == (
        f"disks: loop: one sparse ext4 image per LM in {tmp_path / 'disks'}, loop-mounted"
    )
