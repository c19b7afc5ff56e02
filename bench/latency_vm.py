"""VM side of ``bench/start_latency.py``: the vcbusybox kernel + initramfs under a bare QEMU.

Raw: ``qemu-system-x86_64 -accel <same> -kernel -initrd`` of the same artefacts and the same
payload, with only what the payload needs: its config drive (built beforehand, an input like the
image) and a 9p ``joboutputs`` share. lmrunner adds the per-LM config drive and scratch disk,
machine/job features shares, networking, QMP, the drop to sc_user, seccomp, the LM's cgroup and
the factory pass around it, and boots the kernel's unpacked ELF (``factory.vm_direct_kernel``);
``raw_unpacked`` boots that ELF bare too. The guest has its own clock, so the first instruction
is timed by the file's appearance on the host (``appearance``: 5 ms polls).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from latency_common import appearance, boottime

from lmrunner.backends import vm
from lmrunner.backends.vm import drive as vm_drive
from lmrunner.backends.vm import kernel as vm_kernel
from lmrunner.config import FactoryConfig

REPO = Path(__file__).resolve().parents[1]
VCBUSYBOX_OUT = Path(os.environ.get("VCBUSYBOX_OUT", REPO / "build" / "vcbusybox"))
KERNEL = VCBUSYBOX_OUT / "vm" / "vmlinuz"
INITRD = VCBUSYBOX_OUT / "vm" / "initramfs.cpio.gz"
APPEND = "console=ttyS0 panic=-1"
#: The factory default (mb_per_processor 2048, one processor): both sides boot the same guest.
MEMORY = "2048M"
PAYLOAD = '#!/bin/sh\ntouch "$JOBOUTPUTS/first"\n'
first_seen = appearance
_accel: vm.Accel | None = None


def accel() -> vm.Accel:
    """The accelerator lmrunner picks here (probing KVM once; the factory's backend then finds
    it in the host-wide cache file, so no measured pass pays for the probe)."""
    global _accel
    if _accel is None:
        config = FactoryConfig(space="bench.example.com", state_dir=Path("/nonexistent"))
        _accel = vm.VmBackend(config).accel().accel
    return _accel


def machinetype(folder: Path, user_data: Path) -> dict[str, Any]:
    accel()
    return {"backend": "vm", "image": str(KERNEL), "vm_initrd": str(INITRD),
            "vm_kernel_append": APPEND, "user_data": str(user_data)}  # fmt: skip


def raw_run(folder: Path, kernel: Path = KERNEL) -> float:
    """A bare QEMU booting the same kernel, initramfs and payload; seconds to the first file."""
    out = folder / "raw"
    out.mkdir(parents=True)
    drive = folder / "raw-config.iso"
    if not drive.exists():
        data = vm_drive.DriveData(uuid="00000000-0000-4000-8000-000000000000",
                                  hostname="raw.example.com", user_data=PAYLOAD.encode(),
                                  availability_zone="bench", meta={})  # fmt: skip
        vm_drive.build(data, drive)
    qemu = shutil.which(vm.QEMU) or vm.QEMU
    argv = [
        qemu, "-accel", accel().value, "-m", MEMORY, "-smp", "1", "-nodefaults", "-no-reboot",
        "-display", "none", "-serial", f"file:{folder / 'raw-console.log'}",
        "-kernel", str(kernel), "-initrd", str(INITRD), "-append", APPEND,
        "-drive", f"file={drive},if=virtio,format=raw,readonly=on",
        "-fsdev", f"local,id=jo,path={out},security_model=none",
        "-device", "virtio-9p-pci,fsdev=jo,mount_tag=joboutputs",
    ]  # fmt: skip
    started = boottime()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        seen = appearance(out / "first")
        proc.wait(timeout=300)  # the guest powers off after the payload
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return seen - started


def raw_unpacked(folder: Path) -> float:
    """The bare QEMU booting the kernel lmrunner boots (``vm_direct_kernel``: the bzImage's
    unpacked ELF): the same guest work, so the ratio against it is lmrunner's own cost (its
    devices, QMP, cgroup, the pass) without the decompression lmrunner saves. A kernel lmrunner
    cannot unpack is booted as given, as lmrunner then does too."""
    try:
        kernel = vm_kernel.cached(KERNEL, folder.parent / "kernels")
    except vm_kernel.KernelError:
        kernel = KERNEL
    return raw_run(folder, kernel)


EXTRA_RAW = {"raw_unpacked": raw_unpacked}
