"""lmrunner.lmdisks without a Factory or root: LmDisks on the in-memory FakeDisks and a Store in
tmp_path; refusal on a faked statvfs; keep_outputs on hostile joboutputs; host_disks."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from lmrunner import lmdisks
from lmrunner.config import DiskMethodName, FactoryConfig
from lmrunner.diskmethods import DiskError, DiskRef, DiskUnsupported, DiskUsage
from lmrunner.lifecycle import LmState
from lmrunner.lmdisks import RESERVE_BYTES, LmDisks, host_disks, keep_outputs, refusal
from lmrunner.state import LmRecord, Store
from tests.unit.test_factory import LIMITS, T0, Env, bare_record

LOGGER = "lmrunner.lmdisks"
GB = 10**9


class FakeDisks:
    """A DiskMethod in memory: "backing storage" is a set of uuids, a created disk's mount is a
    real folder. Records every call; told to fail with DiskError."""

    name = "fake"

    def __init__(self, root: Path, store: Store | None = None) -> None:
        self.root = root
        self.store = store
        self.calls: list[tuple[str, str]] = []
        self.stored: set[str] = set()
        self.allocated_of: dict[str, int] = {}
        self.released: list[DiskRef] = []
        #: The row's ``disk`` when create was called (with a store).
        self.recorded_at_create: list[str | None] = []
        self.fail_create = False
        self.fail_release = False
        self.fail_backing = False

    @staticmethod
    def uuid_of(ref: DiskRef) -> str:
        return ref.image.name.removesuffix(".disk")

    def plan(self, uuid: str, mount: Path, size_bytes: int) -> DiskRef:
        return DiskRef(self.name, self.root / f"{uuid}.disk", mount, size_bytes)

    def create(self, ref: DiskRef) -> None:
        uuid = self.uuid_of(ref)
        self.calls.append(("create", uuid))
        if self.store is not None:
            row = self.store.get(uuid)
            self.recorded_at_create.append(None if row is None else row.disk)
        if self.fail_create:
            raise DiskError(f"cannot make {ref.image}: No space left on device")
        ref.mount.mkdir(parents=True, exist_ok=True)
        self.stored.add(uuid)

    def usage(self, ref: DiskRef) -> DiskUsage | None:
        uuid = self.uuid_of(ref)
        self.calls.append(("usage", uuid))
        if uuid not in self.stored:
            return None
        return DiskUsage(self.allocated_of.get(uuid, 0), ref.size_bytes)

    def allocated(self, ref: DiskRef) -> int:
        return self.allocated_of.get(self.uuid_of(ref), 0)

    def release(self, ref: DiskRef) -> None:
        uuid = self.uuid_of(ref)
        self.calls.append(("release", uuid))
        if self.fail_release:
            raise DiskError(f"cannot unmount {ref.mount}: target is busy")
        self.released.append(ref)
        self.stored.discard(uuid)

    def backing(self) -> list[str]:
        if self.fail_backing:
            raise DiskError(f"cannot list {self.root}: Permission denied")
        return sorted(self.stored)

    def of(self, uuid: str) -> list[str]:
        return [op for op, who in self.calls if who == uuid]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = Env(tmp_path)
    yield made
    made.close()


@pytest.fixture
def fake(env: Env) -> FakeDisks:
    return FakeDisks(env.state_dir / "disks", env.store)


@pytest.fixture
def disks(env: Env, fake: FakeDisks) -> LmDisks:
    return LmDisks(fake, env.store)


def ref_of(fake: FakeDisks, record: LmRecord) -> DiskRef:
    return fake.plan(record.uuid, record.directory / "mnt", record.limits.disk_bytes)


def active(env: Env, slot: int, uuid: str, **extra: Any) -> LmRecord:
    return env.store.insert(bare_record(env, slot, uuid, **extra))


def with_disk(env: Env, fake: FakeDisks, slot: int, uuid: str, **extra: Any) -> LmRecord:
    """An LM whose row names its disk, which the fake holds."""
    planned = bare_record(env, slot, uuid, **extra)
    fake.stored.add(uuid)
    return env.store.insert(replace(planned, disk=ref_of(fake, planned).to_json()))


def ended(env: Env, fake: FakeDisks, slot: int, uuid: str, *, disk: bool) -> LmRecord:
    """A finished LM whose backing storage the fake holds; ``disk``: its row still names it (its
    removal failed, or a crash came before it)."""
    extra: dict[str, Any] = {
        "state": LmState.FINISHED,
        "started": T0 - 50.0,
        "finished": T0 - 10.0,
    }
    if disk:
        return with_disk(env, fake, slot, uuid, **extra)
    fake.stored.add(uuid)
    return env.store.insert(bare_record(env, slot, uuid, **extra))


def row(env: Env, uuid: str) -> LmRecord:
    record = env.store.get(uuid)
    assert record is not None
    return record


def mounted_at(monkeypatch: pytest.MonkeyPatch, *mounts: Path) -> None:
    """``os.path.ismount`` says yes for these folders (a real mount needs root)."""
    real = os.path.ismount

    def ismount(path: Any) -> bool:
        return Path(path) in mounts or real(path)

    monkeypatch.setattr("os.path.ismount", ismount)


def write_outputs(mount: Path, files: dict[str, bytes]) -> Path:
    outputs = mount / "joboutputs"
    outputs.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (outputs / name).write_bytes(data)
    return outputs


def kept(directory: Path) -> dict[str, bytes]:
    outputs = directory / "joboutputs"
    if not outputs.is_dir():
        return {}
    return {path.name: path.read_bytes() for path in sorted(outputs.iterdir())}


# --- make ----------------------------------------------------------------------------------------


def test_without_a_method_make_makes_nothing(env: Env) -> None:
    record = active(env, 0, "00000000-none")
    assert LmDisks(None, env.store).make(record, overhead=GB) is None
    assert row(env, record.uuid).disk is None


def test_a_disk_size_of_0_gets_no_disk(env: Env, fake: FakeDisks, disks: LmDisks) -> None:
    record = env.store.insert(
        replace(bare_record(env, 0, "11111111-zero"), limits=replace(LIMITS, disk_bytes=0))
    )
    assert disks.make(record, overhead=GB) is None
    assert fake.calls == []
    assert row(env, record.uuid).disk is None


def test_make_records_the_disk_before_making_it(env: Env, fake: FakeDisks, disks: LmDisks) -> None:
    record = active(env, 0, "22222222-make")
    mount = disks.make(record, overhead=5 * GB)
    assert mount == record.directory / "mnt"
    assert mount.is_dir()
    expected = DiskRef("fake", fake.root / f"{record.uuid}.disk", mount, LIMITS.disk_bytes + 5 * GB)
    # Recorded first: a crash during create leaves the disk findable from the row.
    assert fake.recorded_at_create == [expected.to_json()]
    assert row(env, record.uuid).disk == expected.to_json()
    assert DiskRef.from_json(row(env, record.uuid).disk or "") == expected
    assert fake.of(record.uuid) == ["create"]


def test_a_disk_that_cannot_be_made_stays_recorded_for_its_removal(
    env: Env, fake: FakeDisks, disks: LmDisks
) -> None:
    record = active(env, 0, "33333333-fail")
    fake.fail_create = True
    with pytest.raises(DiskError, match="No space left"):
        disks.make(record)
    recorded = row(env, record.uuid)
    assert recorded.disk == ref_of(fake, record).to_json()
    ended_row = env.store.transition(record.uuid, LmState.FAILED, finished=T0)
    assert env.store.leftover_disks() == [ended_row]
    disks.remove_leftovers()
    assert fake.of(record.uuid) == ["create", "release"]
    assert row(env, record.uuid).disk is None


# --- usage, peak and sample ----------------------------------------------------------------------


def test_usage_asks_the_method_only_for_a_recorded_disk(
    env: Env, fake: FakeDisks, disks: LmDisks
) -> None:
    bare = active(env, 0, "44444444-bare")
    record = with_disk(env, fake, 1, "55555555-usage")
    fake.allocated_of[record.uuid] = 3 * GB
    assert disks.usage(bare) is None
    assert disks.usage(record) == DiskUsage(3 * GB, LIMITS.disk_bytes)
    assert LmDisks(None, env.store).usage(record) is None
    assert fake.of(bare.uuid) == []


def test_peak_is_the_most_of_allocated_and_the_stored_peak(
    env: Env, fake: FakeDisks, disks: LmDisks
) -> None:
    record = with_disk(env, fake, 0, "66666666-peak", disk_peak_bytes=2 * GB)
    fake.allocated_of[record.uuid] = 1 * GB
    assert disks.peak(record) == 2 * GB
    fake.allocated_of[record.uuid] = 7 * GB
    assert disks.peak(record) == 7 * GB
    unsampled = replace(record, disk_peak_bytes=None)
    assert disks.peak(unsampled) == 7 * GB
    # Without a disk or a method: the stored peak only.
    assert disks.peak(replace(record, disk=None)) == 2 * GB
    assert disks.peak(replace(unsampled, disk=None)) is None
    assert LmDisks(None, env.store).peak(record) == 2 * GB


def test_sample_keeps_the_highest_peak_and_never_lowers_it(
    env: Env, fake: FakeDisks, disks: LmDisks
) -> None:
    record = with_disk(env, fake, 0, "77777777-sample")
    bare = active(env, 1, "88888888-bare")
    for allocated, expected in ((GB, GB), (3 * GB, 3 * GB), (2 * GB, 3 * GB), (0, 3 * GB)):
        fake.allocated_of[record.uuid] = allocated
        disks.sample(env.store.active())
        assert row(env, record.uuid).disk_peak_bytes == expected
    assert row(env, bare.uuid).disk_peak_bytes is None


# --- release -------------------------------------------------------------------------------------


def test_release_keeps_the_joboutputs_then_removes_the_disk(
    env: Env, fake: FakeDisks, disks: LmDisks, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = ended(env, fake, 0, "aaaaaaaa-release", disk=True)
    mount = record.directory / "mnt"
    write_outputs(mount, {"shutdown_message": b"300 Nothing to do\n", "log": b"done\n"})
    mounted_at(monkeypatch, mount)
    assert disks.release(record) is True
    assert kept(record.directory) == {
        "log": b"done\n",
        "shutdown_message": b"300 Nothing to do\n",
    }
    assert fake.of(record.uuid) == ["release"]
    assert fake.released == [ref_of(fake, record)]
    assert row(env, record.uuid).disk is None
    assert env.store.leftover_disks() == []


def test_release_of_an_unmounted_disk_copies_nothing(
    env: Env, fake: FakeDisks, disks: LmDisks
) -> None:
    """Not a mount point: its joboutputs folder is the LM directory's own, not the payload's."""
    record = ended(env, fake, 0, "bbbbbbbb-unmounted", disk=True)
    write_outputs(record.directory / "mnt", {"log": b"x"})
    assert disks.release(record) is True
    assert not (record.directory / "joboutputs").exists()
    assert fake.of(record.uuid) == ["release"]
    assert row(env, record.uuid).disk is None


def test_a_disk_that_cannot_be_released_is_kept_for_a_retry(
    env: Env, fake: FakeDisks, disks: LmDisks, caplog: pytest.LogCaptureFixture
) -> None:
    record = ended(env, fake, 0, "cccccccc-busy", disk=True)
    fake.fail_release = True
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert disks.release(record) is False
    assert f"lm={record.name}: cannot remove its disk yet" in caplog.text
    assert row(env, record.uuid).disk == record.disk
    assert env.store.leftover_disks() == [record]

    fake.fail_release = False
    assert disks.release(record) is True
    assert row(env, record.uuid).disk is None


def test_an_unreadable_reference_is_forgotten(
    env: Env, fake: FakeDisks, disks: LmDisks, caplog: pytest.LogCaptureFixture
) -> None:
    record = ended(env, fake, 0, "dddddddd-garbled", disk=False)
    garbled = env.store.update(record.uuid, disk="{not json")
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert disks.release(garbled) is True
    assert "unreadable disk reference" in caplog.text
    assert row(env, record.uuid).disk is None
    assert fake.calls == []  # found by its uuid by remove_leftovers


def test_release_without_a_disk_is_done(env: Env, fake: FakeDisks) -> None:
    record = ended(env, fake, 0, "eeeeeeee-nodisk", disk=False)
    assert LmDisks(fake, env.store).release(record) is True
    assert LmDisks(None, env.store).release(record) is True
    assert fake.calls == []


def test_a_recorded_disk_without_a_method_is_not_done(env: Env, fake: FakeDisks) -> None:
    record = ended(env, fake, 0, "ffffffff-nomethod", disk=True)
    assert LmDisks(None, env.store).release(record) is False
    assert row(env, record.uuid).disk == record.disk


def test_a_retried_release_keeps_no_more_than_the_bound(
    env: Env, fake: FakeDisks, disks: LmDisks, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lmdisks, "KEEP_FILES", 2)
    record = ended(env, fake, 0, "12121212-retry", disk=True)
    mount = record.directory / "mnt"
    write_outputs(mount, {f"f{n}": b"x" for n in range(6)})
    mounted_at(monkeypatch, mount)
    fake.fail_release = True
    assert disks.release(record) is False
    assert disks.release(record) is False
    assert len(kept(record.directory)) <= 2


# --- remove_leftovers ----------------------------------------------------------------------------


def test_remove_leftovers_removes_ended_lms_disks_recorded_or_not(
    env: Env, fake: FakeDisks, disks: LmDisks, caplog: pytest.LogCaptureFixture
) -> None:
    recorded = ended(env, fake, 0, "13131313-recorded", disk=True)
    unrecorded = ended(env, fake, 1, "14141414-unrecorded", disk=False)
    running = with_disk(env, fake, 2, "15151515-running")
    starting = active(env, 3, "16161616-starting")  # its disk made, its row not written yet
    fake.stored.add(starting.uuid)
    stranger = "17171717-unknown"  # no row names it: not ours to guess about
    fake.stored.add(stranger)

    with caplog.at_level(logging.INFO, logger=LOGGER):
        disks.remove_leftovers()

    assert fake.stored == {running.uuid, starting.uuid, stranger}
    assert fake.of(recorded.uuid) == ["release"]
    assert fake.of(unrecorded.uuid) == ["release"]
    for untouched in (running.uuid, starting.uuid, stranger):
        assert fake.of(untouched) == []
    # The unrecorded disk is planned from the row: its place and size are the LM's.
    assert fake.released[-1] == ref_of(fake, unrecorded)
    assert row(env, recorded.uuid).disk is None
    assert row(env, running.uuid).disk == running.disk
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"lm={unrecorded.name}: removed a disk its record did not name"
    ]


def test_a_leftover_whose_release_fails_is_tried_once_per_call(
    env: Env, fake: FakeDisks, disks: LmDisks
) -> None:
    record = ended(env, fake, 0, "18181818-busy", disk=True)
    fake.fail_release = True
    disks.remove_leftovers()
    # Once as a recorded leftover; its row still names it, so not again as an unrecorded one.
    assert fake.of(record.uuid) == ["release"]
    assert row(env, record.uuid).disk == record.disk
    fake.fail_release = False
    disks.remove_leftovers()
    assert fake.stored == set()
    assert row(env, record.uuid).disk is None


def test_an_unrecorded_disk_that_cannot_be_released_is_logged(
    env: Env, fake: FakeDisks, disks: LmDisks, caplog: pytest.LogCaptureFixture
) -> None:
    record = ended(env, fake, 0, "19191919-busy", disk=False)
    fake.fail_release = True
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        disks.remove_leftovers()
        disks.remove_leftovers()  # retried: not logged again
    assert caplog.text.count(f"lm={record.name}: cannot remove its disk yet: unrecorded") == 1
    assert fake.stored == {record.uuid}


def test_an_unreadable_reference_of_an_ended_lm_still_loses_its_disk(
    env: Env, fake: FakeDisks, disks: LmDisks
) -> None:
    """The reference is forgotten, and the storage is found by the LM's uuid."""
    record = ended(env, fake, 0, "20202020-garbled", disk=False)
    env.store.update(record.uuid, disk="{not json")
    disks.remove_leftovers()
    assert row(env, record.uuid).disk is None
    assert fake.stored == set()
    assert fake.released == [ref_of(fake, record)]


def test_remove_leftovers_goes_on_when_the_storage_cannot_be_listed(
    env: Env, fake: FakeDisks, disks: LmDisks, caplog: pytest.LogCaptureFixture
) -> None:
    recorded = ended(env, fake, 0, "21212121-recorded", disk=True)
    unrecorded = ended(env, fake, 1, "22222222-unrecorded", disk=False)
    fake.fail_backing = True
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        disks.remove_leftovers()
    assert "cannot look for leftover disks" in caplog.text
    assert fake.stored == {unrecorded.uuid}
    assert row(env, recorded.uuid).disk is None


def test_remove_leftovers_without_a_method_does_nothing(env: Env, fake: FakeDisks) -> None:
    record = ended(env, fake, 0, "23232323-kept", disk=True)
    LmDisks(None, env.store).remove_leftovers()
    assert row(env, record.uuid).disk == record.disk
    assert fake.calls == []


# --- refusal -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatVfs:
    f_bavail: int
    f_frsize: int


def free_space(monkeypatch: pytest.MonkeyPatch, free_bytes: int) -> list[Path]:
    """The state directory's filesystem has ``free_bytes`` beside the reserve; the paths asked."""
    asked: list[Path] = []

    def statvfs(path: Path) -> StatVfs:
        asked.append(Path(path))
        return StatVfs(f_bavail=RESERVE_BYTES + free_bytes, f_frsize=1)

    monkeypatch.setattr("os.statvfs", statvfs)
    return asked


def factory_of(env: Env, **changes: Any) -> FactoryConfig:
    return replace(env.config().factory, **changes)


def test_no_refusal_without_a_method_or_a_disk(
    env: Env, fake: FakeDisks, monkeypatch: pytest.MonkeyPatch
) -> None:
    free_space(monkeypatch, 0)
    factory = factory_of(env)
    assert refusal(None, factory, [], 10 * GB) is None
    assert refusal(fake, factory, [], 0) is None


def test_refusal_counts_what_active_lms_may_still_write(
    env: Env, fake: FakeDisks, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = free_space(monkeypatch, 4_096_000_000)
    factory = factory_of(env)
    half_written = with_disk(env, fake, 0, "24242424-half")  # promised 40 GB
    fake.allocated_of[half_written.uuid] = 38 * GB  # 2 GB of it may still be written
    overfull = with_disk(env, fake, 1, "25252525-over")
    fake.allocated_of[overfull.uuid] = 41 * GB  # its image's metadata: nothing is still owed
    bare = active(env, 2, "26262626-bare")
    lms = [half_written, overfull, bare]
    room = 4_096_000_000 - 2 * GB

    assert refusal(fake, factory, lms, room) is None
    refused = refusal(fake, factory, lms, room + 1)
    assert refused is not None
    assert "disk_overcommit 1" in refused
    assert "4.1 GB would be promised" in refused
    assert "4.1 GB free" in refused
    assert asked == [env.state_dir, env.state_dir]


def test_disk_overcommit_makes_room(
    env: Env, fake: FakeDisks, monkeypatch: pytest.MonkeyPatch
) -> None:
    free_space(monkeypatch, 10 * GB)
    lms = [with_disk(env, fake, 0, "27272727-other")]  # 40 GB promised, nothing written
    assert refusal(fake, factory_of(env), lms, GB) is not None
    refused = refusal(fake, factory_of(env, disk_overcommit=4.0), lms, GB)
    assert refused is not None and "disk_overcommit 4" in refused
    assert refusal(fake, factory_of(env, disk_overcommit=5.0), lms, 10 * GB) is None
    assert refusal(fake, factory_of(env, disk_overcommit=5.0), lms, 10 * GB + 1) is not None


def test_below_the_reserve_nothing_starts(
    env: Env, fake: FakeDisks, monkeypatch: pytest.MonkeyPatch
) -> None:
    free_space(monkeypatch, -RESERVE_BYTES // 2)
    refused = refusal(fake, factory_of(env, disk_overcommit=100.0), [], 1)
    assert refused is not None and "0.0 GB free" in refused


def test_a_state_directory_that_cannot_be_measured_refuses(
    env: Env, fake: FakeDisks, monkeypatch: pytest.MonkeyPatch
) -> None:
    def statvfs(path: Path) -> StatVfs:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("os.statvfs", statvfs)
    assert refusal(fake, factory_of(env), [], GB) == (
        "cannot look at the state directory: Permission denied"
    )


# --- keep_outputs --------------------------------------------------------------------------------


@pytest.fixture
def lm_dir(tmp_path: Path) -> Path:
    made = tmp_path / "lm"
    made.mkdir()
    return made


@pytest.fixture
def mount(lm_dir: Path) -> Path:
    made = lm_dir / "mnt"
    made.mkdir()
    return made


def within(seconds: float, call: Callable[[], None]) -> None:
    """Run ``call`` in a thread; fail (without hanging the run) when it blocks."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as err:  # handed to the test's thread
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for more than {seconds} s"
    if errors:
        raise errors[0]


def test_keep_outputs_skips_links_fifos_and_folders(
    tmp_path: Path, lm_dir: Path, mount: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"root's secret\n")
    outputs = write_outputs(mount, {"log": b"fine\n"})
    (outputs / "link").symlink_to(secret)
    (outputs / "dirlink").symlink_to(tmp_path)
    os.mkfifo(outputs / "fifo")
    (outputs / "folder").mkdir()
    (outputs / "folder" / "inner").write_bytes(b"not at the top\n")

    with caplog.at_level(logging.INFO, logger=LOGGER):
        within(10.0, lambda: keep_outputs(mount, lm_dir, "lm0"))

    assert kept(lm_dir) == {"log": b"fine\n"}
    assert "kept 1 joboutputs files (5 bytes), skipped 4" in caplog.text


def test_a_joboutputs_link_is_not_followed(tmp_path: Path, lm_dir: Path, mount: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "shadow").write_bytes(b"root's secret\n")
    (mount / "joboutputs").symlink_to(host)
    keep_outputs(mount, lm_dir, "lm0")
    assert kept(lm_dir) == {}


def test_keep_outputs_keeps_the_tail_of_a_long_file(
    lm_dir: Path, mount: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lmdisks, "KEEP_FILE_LIMIT", 10)
    write_outputs(mount, {"long": b"0123456789abcdefghij", "short": b"12345", "exact": b"x" * 10})
    keep_outputs(mount, lm_dir, "lm0")
    assert kept(lm_dir) == {"exact": b"x" * 10, "long": b"abcdefghij", "short": b"12345"}


def test_keep_outputs_keeps_at_most_keep_files(
    lm_dir: Path, mount: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(lmdisks, "KEEP_FILES", 3)
    write_outputs(mount, {f"f{n}": f"{n}".encode() for n in range(5)})
    with caplog.at_level(logging.INFO, logger=LOGGER):
        keep_outputs(mount, lm_dir, "lm0")
    assert kept(lm_dir) == {"f0": b"0", "f1": b"1", "f2": b"2"}
    assert "skipped 2" in caplog.text


def test_keep_outputs_keeps_at_most_keep_total_bytes(
    lm_dir: Path, mount: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lmdisks, "KEEP_FILE_LIMIT", 10)
    monkeypatch.setattr(lmdisks, "KEEP_TOTAL", 25)
    write_outputs(mount, {"a": b"A" * 10, "b": b"B" * 12, "c": b"0123456789", "d": b"D"})
    keep_outputs(mount, lm_dir, "lm0")
    # a: 10, b: its last 10, c: the 5 bytes left (its tail), d: nothing left.
    assert kept(lm_dir) == {"a": b"A" * 10, "b": b"B" * 10, "c": b"56789"}
    assert sum(len(data) for data in kept(lm_dir).values()) == 25


def test_keep_outputs_never_overwrites_a_kept_file(lm_dir: Path, mount: Path) -> None:
    (lm_dir / "joboutputs").mkdir()
    (lm_dir / "joboutputs" / "shutdown_message").write_bytes(b"100 lmrunner's own\n")
    write_outputs(mount, {"shutdown_message": b"300 the payload's\n", "log": b"x\n"})
    keep_outputs(mount, lm_dir, "lm0")
    assert kept(lm_dir) == {"log": b"x\n", "shutdown_message": b"100 lmrunner's own\n"}


def test_keep_outputs_without_joboutputs_makes_an_empty_folder(lm_dir: Path, mount: Path) -> None:
    keep_outputs(mount, lm_dir, "lm0")
    assert (lm_dir / "joboutputs").is_dir()
    assert kept(lm_dir) == {}


def test_keep_outputs_into_a_gone_directory_is_logged(
    tmp_path: Path, mount: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_outputs(mount, {"log": b"x\n"})
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        keep_outputs(mount, tmp_path / "gone", "lm0")
    assert "lm=lm0: cannot keep its joboutputs" in caplog.text


# --- host_disks ----------------------------------------------------------------------------------


def test_host_disks_opens_the_configured_method(
    env: Env, fake: FakeDisks, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[FactoryConfig] = []

    def opened(factory: FactoryConfig) -> FakeDisks:
        asked.append(factory)
        return fake

    monkeypatch.setattr(lmdisks, "open_disk_method", opened)
    factory = factory_of(env, disk_method=DiskMethodName.LOOP)
    assert host_disks(factory) is fake
    assert asked == [factory]


def unsupported(factory: FactoryConfig) -> FakeDisks:
    raise DiskUnsupported("factory.disk_method auto: mounting needs root")


def test_host_disks_is_none_and_logged_for_auto_on_a_host_without_loop(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(lmdisks, "open_disk_method", unsupported)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert host_disks(factory_of(env, disk_method=DiskMethodName.AUTO)) is None
    [line] = caplog.records
    assert line.levelno == logging.WARNING
    assert "mounting needs root" in line.getMessage()


def test_host_disks_refuses_an_explicit_loop_on_a_host_without_loop(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lmdisks, "open_disk_method", unsupported)
    with pytest.raises(DiskUnsupported, match="mounting needs root"):
        host_disks(factory_of(env, disk_method=DiskMethodName.LOOP))
