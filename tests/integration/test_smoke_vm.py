"""Smoke test of QEMU and the vcbusybox VM artefacts: boot, run user_data, power off."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from lmrunner import runner
from lmrunner.backends.vm import DEFAULT_PROBE_TIMEOUT, Accel, AccelProbe

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

USER_DATA = """#!/bin/sh
echo "hello from $(hostname) cpus=$(cat $MACHINEFEATURES/total_cpu)" > "$JOBOUTPUTS/payload.txt"
echo "300 No more work" > "$JOBOUTPUTS/shutdown_message"
"""


def make_config_drive(tmp_path: Path, user_data: str, hostname: str) -> Path:
    """An OpenStack config drive (ISO 9660, label config-2), as cloud images expect it."""
    tree = tmp_path / "config-drive" / "openstack" / "latest"
    tree.mkdir(parents=True)
    (tree / "user_data").write_text(user_data)
    meta = {"uuid": "5b2c3f64-0000-4000-8000-000000000001", "hostname": hostname, "name": hostname}
    (tree / "meta_data.json").write_text(json.dumps(meta))
    iso = tmp_path / "config-drive.iso"
    xorriso = shutil.which("xorriso")
    if xorriso is None:
        pytest.skip("xorriso not on PATH: run scripts/bootstrap")
    runner.run(
        [xorriso, "-as", "mkisofs", "-V", "config-2", "-J", "-R", "-o", iso, tree.parents[1]]
    )
    return iso


def test_kvm_probe_decides_within_its_timeout(accel: AccelProbe) -> None:
    # On the development machines /dev/kvm exists but guests hang: the probe must give up, not hang.
    assert accel.accel in (Accel.KVM, Accel.TCG)
    assert accel.seconds < DEFAULT_PROBE_TIMEOUT + 10, accel
    print(f"accelerator: {accel.accel} ({accel.detail}, {accel.seconds:.1f} s)")


def test_vm_runs_user_data_and_output_reaches_host(
    qemu: str, vm_artefacts: tuple[Path, Path], accel: AccelProbe, lm_dir: Path, tmp_path: Path
) -> None:
    kernel, initrd = vm_artefacts
    iso = make_config_drive(tmp_path, USER_DATA, "vm-smoke.example.org")
    console = lm_dir / "console.log"
    argv = [
        qemu, "-accel", accel.accel.value, "-m", "256", "-smp", "1", "-nodefaults", "-no-reboot",
        "-display", "none", "-monitor", "none", "-serial", f"file:{console}",
        "-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0 panic=-1 quiet",
        "-drive", f"file={iso},if=virtio,format=raw,readonly=on",
        "-virtfs", f"local,path={lm_dir / 'machinefeatures'},mount_tag=machinefeatures,"
                   "security_model=none,readonly=on,id=mf",
        "-virtfs", f"local,path={lm_dir / 'joboutputs'},mount_tag=joboutputs,"
                   "security_model=none,id=jo",
    ]  # fmt: skip
    started = time.monotonic()
    runner.run(argv, timeout=180)
    seconds = time.monotonic() - started
    print(f"VM boot to poweroff under {accel.accel}: {seconds:.1f} s")
    assert (lm_dir / "joboutputs" / "payload.txt").read_text() == (
        "hello from vm-smoke.example.org cpus=1\n"
    ), console.read_text()[-2000:]
    assert (lm_dir / "joboutputs" / "shutdown_message").read_text() == "300 No more work\n"
    assert "vcbusybox: powering off" in console.read_text()
