"""The QEMU command line of one LM: a pure function of its spec, boot plan and host facts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmrunner.backends.base import MachineSpec
from lmrunner.backends.vm.accel import TCG_TB_MIB, Accel
from lmrunner.backends.vm.drive import VOLUME_LABEL
from lmrunner.backends.vm.metadata import METADATA_ADDRESS, MJF_ADDRESS
from lmrunner.backends.vm.names import (
    CONSOLE_LOG,
    DRIVE,
    EVENTS_SOCKET,
    OVERLAY,
    QMP_SOCKET,
    SCRATCH,
)
from lmrunner.backends.vm.plan import ImageKind, Plan
from lmrunner.model import MIB

#: The guest's network under user networking: Vac's link-local one (vac.md §4.1).
USER_NETWORK = "169.254.0.0/16"
METADATA_ADDRESSES = (METADATA_ADDRESS, MJF_ADDRESS)


def _opt(value: object) -> str:
    """A value inside a QEMU option list (``key=value,...``): commas are doubled."""
    return str(value).replace(",", ",,")


def mac_address(uuid: str) -> str:
    """A stable, locally administered unicast MAC per LM (QEMU would give every VM the same)."""
    digits = uuid.replace("-", "")[:10]
    return "52:" + ":".join(digits[i : i + 2] for i in range(0, 10, 2))


@dataclass(frozen=True, slots=True)
class Launch:
    """Host-side facts a QEMU command line needs besides the spec."""

    qemu: str
    qemu_version: tuple[int, int]
    accel: Accel
    vm_dir: Path
    runas: str | None  # account QEMU drops to after opening everything (None: stays)
    scratch: bool  # a scratch disk was made
    kernel: Path | None = None  # the kernel to boot instead of the image (kernel.cached)
    #: argv QEMU runs per guest connection to the metadata addresses (user networking only);
    #: None: no metadata service. slirp splits it at spaces: no element may hold one.
    metadata: tuple[str, ...] | None = None
    #: where the root overlay and the scratch disk are: the LM's own filesystem when it has one
    #: (its size bounds what the guest can make them take on the host), else ``vm_dir``
    disk_dir: Path | None = None


def qemu_argv(spec: MachineSpec, boot: Plan, launch: Launch) -> list[str]:
    """The complete ``qemu-system-x86_64`` argv for one LM (a pure function, unit-tested).

    Disks appear in the guest in this order (virtio, /dev/vdX): the root disk (DISK images),
    the scratch disk, the config drive; each has a serial, so ``/dev/disk/by-id/virtio-<serial>``
    finds it whatever its letter. Sockets are relative to QEMU's working directory (the LM's
    folder under <state_dir>/vm), which keeps them below the 108-byte limit of socket paths.
    """
    vm_dir = launch.vm_dir
    argv = [launch.qemu, "-name", f"guest={_opt(spec.name)}", "-uuid", spec.uuid]
    if launch.accel is Accel.KVM:
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:  # QEMU's default CPU model: -cpu max (x86-64-v2 and more) made boots 9 % slower
        argv += ["-accel", f"tcg,tb-size={TCG_TB_MIB}"]
    argv += [
        "-machine", "pc", "-m", f"{spec.limits.memory_bytes // MIB}M",
        "-smp", str(spec.limits.processors),
        "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none", "-vga", "none",
        "-msg", "timestamp=on",
        "-chardev", f"socket,id=qmp,path={QMP_SOCKET},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"socket,id=events,path={EVENTS_SOCKET},server=on,wait=off",
        "-mon", "chardev=events,mode=control",
        "-chardev", f"file,id=console,path={_opt(spec.directory / CONSOLE_LOG)},append=on",
        "-serial", "chardev:console",
    ]  # fmt: skip
    # Throw-away disks: no flushes. werror/rerror=report: an LM filesystem that is full gives
    # the guest an I/O error (Vac's error_policy='report'), not a VM paused for ever.
    disk = "if=none,cache=unsafe,discard=unmap,werror=report,rerror=report"
    disk_dir = launch.disk_dir or vm_dir
    if boot.kind is ImageKind.KERNEL:
        argv += ["-kernel", str(launch.kernel or boot.image), "-append", boot.append]
        if boot.initrd is not None:
            argv += ["-initrd", str(boot.initrd)]
    elif boot.kind is ImageKind.ISO:
        argv += [
            "-drive", f"file={_opt(boot.image)},if=none,id=cd,media=cdrom,readonly=on",
            "-device", "ide-cd,drive=cd,bootindex=0",
        ]  # fmt: skip
    else:
        argv += [
            "-drive", f"file={_opt(disk_dir / OVERLAY)},format=qcow2,id=root,{disk}",
            "-device", "virtio-blk-pci,drive=root,serial=root,bootindex=0",
        ]  # fmt: skip
    if launch.scratch:
        argv += [
            "-drive", f"file={_opt(disk_dir / SCRATCH)},format=qcow2,id=scratch,{disk}",
            "-device", "virtio-blk-pci,drive=scratch,serial=scratch",
        ]  # fmt: skip
    argv += [
        "-drive", f"file={_opt(vm_dir / DRIVE)},format=raw,if=none,id=config,readonly=on",
        "-device", f"virtio-blk-pci,drive=config,serial={VOLUME_LABEL}",
    ]  # fmt: skip
    for index, (tag, source, read_only) in enumerate(boot.shares):
        # none: files the guest (as root) makes are plain files of QEMU's account on the host.
        readonly = ",readonly=on" if read_only else ""
        argv += [
            "-fsdev", f"local,id=fs{index},path={_opt(source)},security_model=none{readonly}",
            "-device", f"virtio-9p-pci,fsdev=fs{index},mount_tag={tag}",
        ]  # fmt: skip
    if boot.bridge is None:
        # Vac's link-local network, so its metadata addresses lie inside it (slirp forwards only
        # addresses of its own network); each connection starts the LM's own handler.
        netdev = f"user,id=net0,hostname={_opt(spec.name)},net={USER_NETWORK}"
        if launch.metadata is not None:
            handler = _opt(" ".join(launch.metadata))
            for address in METADATA_ADDRESSES:
                netdev += f",guestfwd=tcp:{address}:80-cmd:{handler}"
    else:  # qemu-bridge-helper (run by QEMU while still root) adds the tap to the bridge
        netdev = f"bridge,id=net0,br={_opt(boot.bridge)}"
    # No PXE option ROM (romfile=): the firmware would run it on every boot, ~1 s under TCG.
    argv += [
        "-netdev", netdev,
        "-device", f"virtio-net-pci,netdev=net0,mac={mac_address(spec.uuid)},romfile=",
    ]  # fmt: skip
    # seccomp: no obsolete calls, no new processes (the bridge helper and the metadata handler
    # are ones), no scheduler or resource changes. Privilege calls stay allowed: -runas itself
    # needs setuid.
    sandbox = "on,obsolete=deny,resourcecontrol=deny"
    spawns = boot.bridge is not None or launch.metadata is not None
    argv += ["-sandbox", sandbox + ("" if spawns else ",spawn=deny")]
    if launch.runas is not None:
        if launch.qemu_version >= (9, 1):  # -runas is deprecated there
            argv += ["-run-with", f"user={_opt(launch.runas)}"]
        else:
            argv += ["-runas", launch.runas]
    return argv
