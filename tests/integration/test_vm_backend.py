"""The VM backend on real QEMU (TCG where KVM hangs), driven by a real Factory.

Each test boots the vcbusybox kernel + initramfs as an LM of a factory with the host's cgroups:
user_data from the config drive, output through 9p, ACPI power button, adoption after the
daemon goes away, and the config drive read back by standard ISO tools. Every QEMU a test starts
is removed at its end. The life-cycle scenarios shared with every backend are in tests/contract/.
"""

from __future__ import annotations

import json
import pwd
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmrunner import runner
from lmrunner.backends import vm
from lmrunner.config import Config
from lmrunner.factory import Factory
from lmrunner.lifecycle import LmState, OutcomeSource
from lmrunner.loader import load_config
from lmrunner.state import LmRecord
from tests.integration.conftest import REPO, Factories, drive

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

#: A TCG boot of vcbusybox takes 5-15 s on a busy 2-core host.
BOOT_TIMEOUT = 120.0


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A 0755 folder outside pytest's 0700 tree, shadowing pytest's ``tmp_path`` here: QEMU's
    account (sc_user) runs each LM's metadata service, which must reach the LM's folder."""
    top = Path(tempfile.mkdtemp(prefix="lmrunner-vm-test-"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def make_config(
    tmp_path: Path, artefacts: tuple[Path, Path], script: str, **options: Any
) -> Config:
    user_data = tmp_path / "user_data"
    user_data.write_text(script)
    kernel, initrd = artefacts
    factory = {
        "space": "vm.example.com",
        "hostname": "vmtest.example.com",
        "state_dir": str(tmp_path / "state"),
        "total_processors": 1,
        "mb_per_processor": 256,  # a small guest: the host is shared
        "disk_gb_per_processor": 1,
        "vm_accel": "auto",
    }
    machinetype = {
        "backend": "vm",
        "image": str(kernel),
        "vm_initrd": str(initrd),
        "vm_kernel_append": "console=ttyS0 panic=-1",
        "user_data": str(user_data),
        "target_share": 1,
        "fizzle_seconds": 0,
        "stop_grace_seconds": 60,
        **options,
    }
    path = tmp_path / "lmrunner.yaml"
    path.write_text(yaml.safe_dump({"factory": factory, "machinetypes": {"vmtest": machinetype}}))
    return load_config(path, cpus=1)


@pytest.fixture
def factory_of(
    qemu: str, vm_artefacts: tuple[Path, Path], sc_user: str
) -> Iterator[Callable[[Config], Factory]]:
    factories = Factories("vm", after_remove=no_qemu_left, idle_wait_seconds=0.5)
    yield factories.make
    factories.close()


def no_qemu_left(factory: Factory) -> None:
    """No QEMU of the factory's LMs may survive the test (checked after remove_all)."""
    for lm in factory.store.recent():
        if lm.handle is not None and lm.handle.data.get("pid"):
            assert not running(lm), f"QEMU of {lm.name} left running"


def start_one(factory: Factory) -> LmRecord:
    """Run passes until the factory started its LM; then drain it (no second LM after it)."""
    drive(factory, lambda: bool(factory.store.recent()), BOOT_TIMEOUT)
    factory.store.set_meta("draining", "1")
    return only(factory)


def only(factory: Factory) -> LmRecord:
    records = factory.store.recent()
    assert len(records) == 1, records
    return records[0]


def ended(factory: Factory) -> Callable[[], bool]:
    return lambda: bool(factory.store.recent()) and not only(factory).active


def running(lm: LmRecord) -> bool:
    from lmrunner import process

    assert lm.handle is not None
    return process.alive(process.ProcessId(lm.handle.data["pid"], lm.handle.data["start_ticks"]))


def wait_for_file(path: Path, timeout: float = BOOT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_user_data_output_and_shutdown_message_reach_the_host(
    tmp_path: Path, vm_artefacts: tuple[Path, Path], factory_of: Callable[[Config], Factory]
) -> None:
    script = (
        "#!/bin/sh\n"
        'echo "hello from $(hostname) cpus=$(cat $MACHINEFEATURES/total_cpu)" > "$JOBOUTPUTS/out"\n'
        'echo "300 No more work" > "$JOBOUTPUTS/shutdown_message"\n'
    )
    factory = factory_of(make_config(tmp_path, vm_artefacts, script))
    lm = start_one(factory)
    assert lm.handle is not None and lm.handle.data["accel"] in ("tcg", "kvm")
    # Under TCG the Debian kernel boots unpacked, through its PVH entry (vm_direct_kernel auto).
    expected_boot = vm.BOOT_UNPACKED if lm.handle.data["accel"] == "tcg" else "kernel"
    assert lm.handle.engine["boot"] == expected_boot
    ps = runner.run([sys.executable, "-m", "lmrunner", "ps", "--json", "--state-dir",
                     factory.config.factory.state_dir], cwd=REPO)  # fmt: skip
    (entry,) = json.loads(ps.stdout)["lms"]
    assert entry["engine"]["accel"] == lm.handle.data["accel"]
    assert entry["engine"]["boot"] == expected_boot
    drive(factory, ended(factory), BOOT_TIMEOUT)

    done = only(factory)
    assert done.outcome is not None
    assert (done.outcome.code, done.outcome.source) == (300, OutcomeSource.PAYLOAD), done.outcome
    joboutputs = done.directory / "joboutputs"
    assert (joboutputs / "out").read_text() == "hello from vmtest-00.example.com cpus=1\n"
    assert (joboutputs / "shutdown_message").read_text() == "300 No more work\n"
    owner = pwd.getpwuid((joboutputs / "out").stat().st_uid).pw_name  # written by the guest's
    assert owner == "lmrunner-sc"  # root: plain files of QEMU's unprivileged account
    console = (done.directory / vm.CONSOLE_LOG).read_text()
    assert "vcbusybox: powering off" in console
    assert not (done.directory.parents[1] / "vm" / done.uuid).exists()  # destroyed
    print(f"memory peak {done.memory_peak_bytes}, cpu {done.cpu_seconds} s")


def test_graceful_stop_powers_the_guest_off_before_the_kill(
    tmp_path: Path, vm_artefacts: tuple[Path, Path], factory_of: Callable[[Config], Factory]
) -> None:
    script = '#!/bin/sh\ntouch "$JOBOUTPUTS/started"\nsleep 600 & wait $!\n'
    factory = factory_of(make_config(tmp_path, vm_artefacts, script))
    lm = start_one(factory)
    wait_for_file(lm.directory / "joboutputs" / "started")

    assert lm.handle is not None
    pid = lm.handle.data["pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    uid = pwd.getpwnam("lmrunner-sc").pw_uid
    assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status  # dropped with -runas
    if lm.cgroup is not None:  # QEMU runs in the LM's cgroup from its first instruction
        name = json.loads(lm.cgroup)["name"]
        assert all(name in line for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                   if line.split(":")[1] in ("memory", "cpu,cpuacct", "pids"))  # fmt: skip

    factory.store.add_request(lm.uuid, "stop")
    asked = time.monotonic()
    drive(factory, ended(factory), timeout=60)
    seconds = time.monotonic() - asked
    done = only(factory)
    assert done.outcome is not None
    assert (done.outcome.code, done.outcome.text) == (100, "Stopped by operator"), done.outcome
    assert done.outcome.source is OutcomeSource.OPERATOR
    assert done.stop_deadline is not None and done.finished is not None
    assert done.finished < done.stop_deadline  # the guest powered off; nothing was killed
    assert "vcbusybox: powering off" in (done.directory / vm.CONSOLE_LOG).read_text()
    assert not (done.directory / "joboutputs" / "shutdown_message").read_text().startswith("200")
    print(f"ACPI power button to QEMU's exit: {seconds:.1f} s")


def test_a_new_daemon_adopts_the_running_vm(
    tmp_path: Path, vm_artefacts: tuple[Path, Path], factory_of: Callable[[Config], Factory]
) -> None:
    # The payload waits for a file the test writes into its jobfeatures (read-only 9p share).
    script = (
        "#!/bin/sh\n"
        'touch "$JOBOUTPUTS/started"\n'
        'while [ ! -e "$JOBFEATURES/go" ]; do sleep 0.2; done\n'
        'echo "200 Intended work completed ok" > "$JOBOUTPUTS/shutdown_message"\n'
    )
    config = make_config(tmp_path, vm_artefacts, script)
    first = factory_of(config)
    lm = start_one(first)
    wait_for_file(lm.directory / "joboutputs" / "started")
    first.close()  # the daemon goes away (its backends stop watching); its VM keeps running

    second = factory_of(config)
    assert second.store.get(lm.uuid) is not None
    second.run_pass()
    adopted = only(second)  # the same LM, nothing started again
    assert adopted.uuid == lm.uuid and adopted.state is LmState.RUNNING
    assert adopted.handle == lm.handle and running(adopted)

    (lm.directory / "jobfeatures" / "go").write_text("")
    drive(second, ended(second), BOOT_TIMEOUT)
    done = only(second)
    assert done.outcome is not None
    assert (done.outcome.code, done.outcome.source) == (200, OutcomeSource.PAYLOAD), done.outcome


def test_the_config_drive_reads_back_with_standard_iso_tools(
    tmp_path: Path, vm_artefacts: tuple[Path, Path], factory_of: Callable[[Config], Factory]
) -> None:
    isoinfo, blkid = shutil.which("isoinfo"), shutil.which("blkid") or "/usr/sbin/blkid"
    if isoinfo is None:
        pytest.skip("isoinfo (genisoimage) not on PATH: run scripts/bootstrap")
    script = "#!/bin/sh\nsleep 600\n"
    factory = factory_of(make_config(tmp_path, vm_artefacts, script))
    lm = start_one(factory)
    iso = tmp_path / "state" / "vm" / lm.uuid / vm.DRIVE
    try:
        label = runner.run([blkid, "-o", "value", "-s", "LABEL", iso]).stdout.strip()
        assert label == "config-2"
        assert "Volume id: config-2" in runner.run([isoinfo, "-d", "-i", iso]).stdout
        listing = runner.run([isoinfo, "-R", "-f", "-i", iso]).stdout.split()
        assert sorted(f for f in listing if f.count("/") == 3) == [
            "/ec2/latest/meta-data.json", "/ec2/latest/user-data",
            "/openstack/latest/meta_data.json", "/openstack/latest/user_data",
        ]  # fmt: skip
        joliet = runner.run([isoinfo, "-J", "-f", "-i", iso]).stdout.split()
        assert "/openstack/latest/meta_data.json" in joliet  # case kept without Rock Ridge too

        def extract(name: str) -> str:
            return runner.run([isoinfo, "-R", "-i", iso, "-x", name]).stdout

        assert extract("/openstack/latest/user_data") == script
        assert extract("/ec2/latest/user-data") == script
        meta = json.loads(extract("/openstack/latest/meta_data.json"))
        assert (meta["uuid"], meta["hostname"], meta["name"]) == (lm.uuid, lm.name, lm.name)
        assert meta["availability_zone"] == "vmtest.example.com"
        assert meta["meta"]["machinetype"] == "vmtest"
        assert meta["meta"]["joboutputs"] == "http://169.254.169.253/joboutputs"  # as Vac's
        ec2 = json.loads(extract("/ec2/latest/meta-data.json"))
        assert (ec2["instance-id"], ec2["local-hostname"]) == (lm.uuid, lm.name)
    finally:
        factory.remove_all()
    assert not iso.exists()
    assert (lm.directory / vm.CONSOLE_LOG).exists()
