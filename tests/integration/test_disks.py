"""Every LM's writable space is its own filesystem, bounded at its disk size, on every backend.

A payload writes zeros until it fails into each place it can write: joboutputs, a tmp_bind,
``/tmp``, its working directory and (Docker) ``/``; it reports what each took, removing each
file before the next. The test watches the state directory's free space all along, and checks:
each write stopped at the LM's size (within 5 %), the host lost no more than that, the LM's end
was recorded with its peak disk use, its disk is gone, and the factory went on starting LMs.

A second test kills the daemon with SIGKILL while two LMs run: the one that ends while no
daemon runs has its disk removed once by the next daemon, and the one still running is adopted
with its disk mounted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmrunner.diskmethods import DiskRef, loop_missing
from lmrunner.lifecycle import LmState
from lmrunner.loader import load_config
from lmrunner.state import LmRecord, Store
from tests.integration.conftest import (
    TIMESCALE,
    Factories,
    drive,
    remove_lms,
    start_daemon,
    wait_ended,
)

pytestmark = pytest.mark.slow

#: Each place the payload writes, by the name it reports.
FILL = r"""#!/bin/sh
report=""
fill() {
  dd if=/dev/zero of="$2/lmrunner-fill" bs=65536 2>/dev/null
  bytes=$(wc -c < "$2/lmrunner-fill" 2>/dev/null || echo 0)
  rm -f "$2/lmrunner-fill"
  report="$report$1 $bytes
"
}
fill joboutputs "$JOBOUTPUTS"
fill tmp /tmp
fill cwd "$PWD"
[ -d /scratch ] && fill scratch /scratch
[ -n "$FILL_ROOT" ] && fill root /
for b in /sys/block/vd*; do  # a VM: its scratch disk, by its serial
  [ "$(cat "$b/serial" 2>/dev/null)" = scratch ] || continue
  dd if=/dev/zero of="/dev/${b##*/}" bs=65536 2>/dev/null
  sync
  report="${report}scratchdisk $(( $(cat "$b/size") * 512 ))
"
  fill joboutputs-after "$JOBOUTPUTS"
done
printf '%s' "$report" > "$JOBOUTPUTS/fills"
echo "200 filled" > "$JOBOUTPUTS/shutdown_message"
"""
SIZE_GB = 0.2
VM_OVERHEAD = 64 * 2**20  # backends.vm.driver.DISK_OVERHEAD_BYTES


@dataclass(frozen=True)
class Engine:
    machinetype: dict[str, Any]
    factory: dict[str, Any]
    size_gb: float = SIZE_GB


def engine(request: pytest.FixtureRequest, backend: str) -> Engine:
    if loop_missing() is not None:
        pytest.skip(f"no loop devices here: {loop_missing()}")
    vcbusybox: Path = request.getfixturevalue("vcbusybox")
    if backend == "docker":
        request.getfixturevalue("docker_client")
        return Engine(
            {"backend": "docker", "image": "docker://vcbusybox:latest", "tmp_binds": ["/scratch"]},
            {},
        )
    sc_user = request.getfixturevalue("sc_user")
    if backend == "apptainer":
        request.getfixturevalue("apptainer")
        return Engine(
            {"backend": "apptainer", "image": str(vcbusybox / "rootfs"), "tmp_binds": ["/scratch"]},
            {"sc_user": sc_user},
        )
    request.getfixturevalue("qemu")
    kernel, initrd = request.getfixturevalue("vm_artefacts")
    return Engine(
        {
            "backend": "vm",
            "image": str(kernel),
            "vm_initrd": str(initrd),
            "vm_kernel_append": "console=ttyS0 panic=-1",
        },
        # never: the kernel unpacked into the state directory would count as the LM's writes
        {
            "sc_user": sc_user,
            "mb_per_processor": 256,
            "vm_accel": "auto",
            "vm_direct_kernel": "never",
        },
        size_gb=0.1,  # guest writes are slow under TCG
    )


def write_config(top: Path, eng: Engine, script: str, **factory: Any) -> Path:
    user_data = top / "user_data"
    user_data.write_text(script)
    user_data.chmod(0o755)
    document = {
        "factory": {
            "space": "disks.example.com",
            "hostname": "disks.example.com",
            "state_dir": str(top / "state"),
            "total_processors": 1,
            "overload_per_processor": 100,
            "disk_gb_per_processor": eng.size_gb,
            "disk_method": "loop",
            **eng.factory,
            **factory,
        },
        "machinetypes": {
            "fill": {
                **eng.machinetype,
                "user_data": str(user_data),
                "target_share": 1,
                "fizzle_seconds": 0,
                "backoff_seconds": 0,
            },
        },
    }
    path = top / "lmrunner.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def top() -> Iterator[Path]:
    """A 0755 folder outside pytest's 0700 tree (LM accounts must reach the LM folders)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="lmrunner-disks-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class FreeSpace(threading.Thread):
    """The least free space of a filesystem while it runs (sampled every 20 ms)."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="free-space", daemon=True)
        self.path = path
        self.before = self.free()
        self.least = self.before
        self.done = threading.Event()

    def free(self) -> int:
        info = os.statvfs(self.path)
        return info.f_bavail * info.f_frsize

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.least = min(self.least, self.free())


def fills(directory: Path) -> dict[str, int]:
    """The payload's report, from the joboutputs kept after its end."""
    text = (directory / "joboutputs" / "fills").read_text()
    return {name: int(size) for name, size in (line.split() for line in text.splitlines())}


BACKENDS = [
    pytest.param("docker", marks=pytest.mark.docker),
    pytest.param("apptainer", marks=pytest.mark.apptainer),
    pytest.param("vm", marks=pytest.mark.qemu),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_payload_filling_every_writable_place_stops_at_its_size(
    request: pytest.FixtureRequest, top: Path, backend: str
) -> None:
    eng = engine(request, backend)
    script = FILL.replace('[ -n "$FILL_ROOT" ]', "true" if backend == "docker" else "false")
    config = load_config(write_config(top, eng, script))
    size = round(eng.size_gb * 1e9)
    factories = Factories(backend, disks=True)
    watcher = FreeSpace(top)
    watcher.start()
    try:
        factory = factories.make(config)
        assert factory.lm_disks.method is not None

        def next_started() -> bool:  # the first LM ended, and the factory went on
            records = sorted(factory.store.recent(), key=lambda r: r.created)
            return len(records) >= 2 and not records[0].active

        drive(factory, next_started, timeout=240)
        watcher.done.set()
        first = sorted(factory.store.recent(), key=lambda r: r.created)[0]
        assert first.outcome is not None and first.outcome.message == "200 filled", first.outcome
        got = fills(first.directory)
        places = {"joboutputs", "tmp", "cwd"} | (
            {"scratch", "root"} if backend == "docker" else set()
        )
        if backend == "apptainer":
            places.add("scratch")
        if backend == "vm":
            places = {"joboutputs", "scratchdisk", "joboutputs-after"}
        assert set(got) >= places, got
        # A VM's filesystem also holds its disk images: the engine's room comes on top.
        promised = size + (VM_OVERHEAD + size // 100 if backend == "vm" else 0)
        for place in places - {"root", "cwd", "tmp", "joboutputs-after", "scratchdisk"}:
            assert abs(got[place] - promised) <= 0.05 * promised, (place, got[place], promised)
        if backend == "docker":
            assert got["root"] == 0  # a read-only root: dockerd's writable layer is not there
            assert got["cwd"] in (0, got["tmp"])  # / in vcbusybox
        if backend == "apptainer":
            assert abs(got["tmp"] - size) <= 0.05 * size and abs(got["cwd"] - size) <= 0.05 * size
        if backend == "vm":  # the scratch disk and joboutputs share the LM's filesystem
            assert abs(got["scratchdisk"] - size) < 4096  # qemu-img rounds to sectors
            # joboutputs keep the engine's room beside a full scratch disk, no more
            assert 0 < got["joboutputs-after"] <= VM_OVERHEAD + size // 100
        # The host lost at most the LM's size (sparse images: nothing before the payload wrote).
        drop = watcher.before - watcher.least
        print(
            f"{backend}: size {size}, fills {got}, host drop {drop}, peak {first.disk_peak_bytes}"
        )
        assert drop <= promised * 1.05 + 16 * 2**20, (drop, promised)
        # Its end records its peak; its disk is gone; the next LM started.
        assert first.disk is None
        assert first.disk_peak_bytes is not None
        assert 0.9 * size <= first.disk_peak_bytes <= promised * 1.05
        (accounted,) = [a for a in factory.store.accounting() if a.uuid == first.uuid]
        assert accounted.disk_peak_bytes == first.disk_peak_bytes
        assert not os.path.ismount(first.directory / "mnt")
        assert not (config.factory.state_dir / "disks" / f"{first.uuid}.img").exists()
        assert len(factory.store.recent()) >= 2
    finally:
        watcher.done.set()
        factories.close()
    assert list((config.factory.state_dir / "disks").glob("*.img")) == []


def _records(state: Path) -> list[LmRecord]:
    store = Store(state, readonly=True)
    try:
        return store.recent()
    finally:
        store.close()


@pytest.mark.docker
def test_kill_9_daemon_adopts_running_lms_with_their_disks_and_cleans_the_ended_ones_once(
    request: pytest.FixtureRequest, top: Path
) -> None:
    eng = engine(request, "docker")
    short = top / "user_data-short"
    short.write_text("#!/bin/sh\nsleep 3\necho '200 short' > $JOBOUTPUTS/shutdown_message\n")
    long = top / "user_data-long"
    long.write_text("#!/bin/sh\nsleep 25\necho '200 long' > $JOBOUTPUTS/shutdown_message\n")
    for path in (short, long):
        path.chmod(0o755)
    config_file = write_config(top, eng, "", total_processors=2)
    document = yaml.safe_load(config_file.read_text())
    base = document["machinetypes"].pop("fill")
    document["machinetypes"] = {
        name: {**base, "user_data": str(path), "max_processors": 1, "backoff_seconds": 3600}
        for name, path in (("short", short), ("long", long))
    }
    document["factory"]["disk_overcommit"] = 1.0
    config_file.write_text(yaml.safe_dump(document))
    state, log = top / "state", top / "daemon.log"
    first = start_daemon(config_file, log)
    try:
        deadline = time.monotonic() + 60 * TIMESCALE
        while time.monotonic() < deadline:
            running = [r for r in _records(state) if r.state is LmState.RUNNING] if (
                state / "lmrunner.db").exists() else []  # fmt: skip
            if {r.machinetype for r in running} == {"short", "long"}:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"two LMs did not start:\n{log.read_text()}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    by_type = {r.machinetype: r for r in running}
    refs = {name: DiskRef.from_json(r.disk or "") for name, r in by_type.items()}
    for ref in refs.values():
        assert os.path.ismount(ref.mount) and ref.image.exists()
    time.sleep(6)  # short ends while no daemon runs; its disk stays until one records its end
    assert os.path.ismount(refs["short"].mount)
    second = start_daemon(config_file, log)
    try:
        store = Store(state, readonly=True)
        try:
            ended = wait_ended(store, by_type["short"].uuid, log, timeout=30)
            assert ended.outcome is not None and ended.outcome.message == "200 short"
            time.sleep(1)
            assert not os.path.ismount(refs["short"].mount)
            assert not refs["short"].image.exists()
            assert (
                ended.directory / "joboutputs" / "shutdown_message"
            ).read_text() == "200 short\n"
            adopted = store.get(by_type["long"].uuid)
            assert adopted is not None and adopted.active and adopted.disk == by_type["long"].disk
            assert os.path.ismount(refs["long"].mount)
            done = wait_ended(store, by_type["long"].uuid, log, timeout=60)
            assert done.outcome is not None and done.outcome.message == "200 long"
            assert [r.uuid for r in store.recent()].count(by_type["long"].uuid) == 1
        finally:
            store.close()
        time.sleep(1)
        assert not os.path.ismount(refs["long"].mount) and not refs["long"].image.exists()
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(timeout=30)
        except subprocess.TimeoutExpired:
            second.kill()
            second.wait()
        remove_lms(config_file)
    text = log.read_text()
    assert "Traceback" not in text
    assert "cannot remove its disk" not in text and "unrecorded disk" not in text


def test_no_lm_starts_when_the_state_directory_cannot_hold_its_disk(
    request: pytest.FixtureRequest, top: Path
) -> None:
    """A promise beyond the free space refuses the start, in the log and ``machinetypes``; an
    explicit overcommit ratio that makes room lets it start."""
    if loop_missing() is not None:
        pytest.skip(f"no loop devices here: {loop_missing()}")
    info = os.statvfs(top)
    free_gb = info.f_bavail * info.f_frsize / 1e9
    eng = Engine({"backend": "fake", "image": "fake:seconds=600"}, {}, size_gb=free_gb * 1.5)
    config_file = write_config(top, eng, "")
    log = top / "daemon.log"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lmrunner", *args, "--config", str(config_file)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    done = cli("daemon", "--once")
    log.write_text(done.stderr)
    assert done.returncode == 0, done.stderr
    assert "no LM starts: disk:" in done.stderr and "disk_overcommit 1" in done.stderr
    assert _records(top / "state") == []
    shown = cli("machinetypes")
    assert "no: disk:" in shown.stdout, shown.stdout
    document = yaml.safe_load(config_file.read_text())
    document["factory"]["disk_overcommit"] = 2.0
    config_file.write_text(yaml.safe_dump(document))
    try:
        done = cli("daemon", "--once")
        assert done.returncode == 0, done.stderr
        (record,) = _records(top / "state")
        assert record.disk is not None and os.path.ismount(record.directory / "mnt")
    finally:
        remove_lms(config_file)
    assert list((top / "state" / "disks").glob("*.img")) == []
