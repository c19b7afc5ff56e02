"""The boot plan: how one LM boots, read from its spec and its image's first bytes.

Validated before any side effect: a relative or remote image, a missing file or a bad option is
a :class:`~lmrunner.errors.SpecError` here, never a half-started LM.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path, PurePosixPath

from lmrunner.backends.base import MachineSpec
from lmrunner.backends.vm.metadata import MJF_URL
from lmrunner.config import MachinetypeConfig, resolve_local
from lmrunner.errors import SpecError
from lmrunner.model import ETC_PLACEMENT, MIB

LOG = logging.getLogger("lmrunner.backends.vm")  # one logger for the whole backend

#: In the guest: the 9p shares are mounted where Docker LMs have them (images/vcbusybox/README.md);
#: user_data arrives on the config drive and is copied to /user_data. With user networking the
#: same folders are served over HTTP as Vac served them (``metadata.py``).
PLACEMENT = replace(ETC_PLACEMENT, mjf_url=MJF_URL)
#: The 9p mount tag of each shared folder, by its place in the guest. Guests mount by tag
#: (``mount -t 9p -o trans=virtio,version=9p2000.L TAG DIR``); vcbusybox's init knows these.
MOUNT_TAGS: Mapping[PurePosixPath, str] = {
    PLACEMENT.machinefeatures: "machinefeatures",
    PLACEMENT.jobfeatures: "jobfeatures",
    PLACEMENT.joboutputs: "joboutputs",
    PLACEMENT.cvmfs: "cvmfs",
}
DEFAULT_APPEND = "console=ttyS0 panic=-1"


class ImageKind(StrEnum):
    KERNEL = "kernel"  # image is a kernel, booted with vm_initrd and vm_kernel_append
    ISO = "iso"  # a live CD (CernVM): boots from a CD-ROM, the scratch disk is its disk
    DISK = "disk"  # a bootable disk (qcow2 or raw), through a per-LM copy-on-write overlay


@dataclass(frozen=True, slots=True)
class VmOptions:
    """The VM backend's options, from the machinetype (the schema checked them)."""

    vm_initrd: Path | None = None  # the initramfs booted with a kernel image (absolute)
    vm_kernel_append: str = DEFAULT_APPEND  # the kernel command line
    vm_bridge: str | None = None  # a bridge the admin prepared; None: user networking

    @classmethod
    def from_machinetype(cls, mt: MachinetypeConfig, files_dir: Path) -> VmOptions:
        return cls(
            vm_initrd=None if mt.vm_initrd is None else resolve_local(mt.vm_initrd, files_dir),
            vm_kernel_append=mt.vm_kernel_append,
            vm_bridge=mt.vm_network.partition(":")[2] or None,  # "user" or "bridge:NAME"
        )

    @classmethod
    def of(cls, spec: MachineSpec) -> VmOptions:
        """The spec's options (the defaults when the core gave none, as tests do)."""
        return spec.options if isinstance(spec.options, cls) else cls()


@dataclass(frozen=True, slots=True)
class Plan:
    """How one LM boots: what :func:`plan` read from its spec and image."""

    kind: ImageKind
    image: Path
    initrd: Path | None = None
    append: str = ""
    disk_format: str | None = None  # qcow2 or raw (DISK only)
    bridge: str | None = None  # None: user-mode networking
    shares: tuple[tuple[str, Path, bool], ...] = ()  # (9p tag, host folder, read-only)
    user_data: Path | None = None


def image_kind(path: Path) -> tuple[ImageKind, str | None]:
    """What a local image file is, from its first bytes: a Linux kernel (bzImage), an ISO 9660
    image, or a disk (qcow2, else raw)."""
    with path.open("rb") as handle:
        head = handle.read(0x8006)
    if head[:4] == b"QFI\xfb":
        return ImageKind.DISK, "qcow2"
    if head[0x202:0x206] == b"HdrS":  # the x86 boot protocol's header signature
        return ImageKind.KERNEL, None
    if head[0x8001:0x8006] == b"CD001":  # the first volume descriptor at 32 KiB
        return ImageKind.ISO, None
    return ImageKind.DISK, "raw"


def plan(spec: MachineSpec) -> Plan:
    """Check ``spec`` and decide how its LM boots. Reads only file headers.

    Raises:
        SpecError: a relative or remote image, a missing file, a bad option.
    """
    where = f"vm: machinetype {spec.machinetype}"
    options = VmOptions.of(spec)
    image = _local_file(spec.image, f"{where}: image")
    initrd = options.vm_initrd
    initrd = None if initrd is None else _local_file(str(initrd), f"{where}: vm_initrd")
    try:
        kind, disk_format = image_kind(image)
    except OSError as err:
        raise SpecError(f"{where}: image {image}: cannot read it: {err.strerror}") from err
    if initrd is not None:
        kind, disk_format = ImageKind.KERNEL, None
    if spec.limits.processors < 1 or spec.limits.memory_bytes < 64 * MIB:
        raise SpecError(f"{where}: needs at least 1 processor and 64 MiB of memory")
    shares = []
    user_data = None
    for mount in spec.mounts:
        if mount.target == PLACEMENT.user_data:
            user_data = mount.source  # on the config drive, not shared
        elif mount.target in MOUNT_TAGS:
            shares.append((MOUNT_TAGS[mount.target], mount.source, mount.read_only))
        else:  # tmp_binds: containers only (Vac's VMs had none); the scratch disk serves VMs
            LOG.info("%s: %s is not shared with VMs (tmp_binds are for containers)", where, mount)
    if options.vm_bridge is not None and MJF_URL in spec.env.get("JOBOUTPUTS", ""):
        raise SpecError(
            f"{where}: vm_network bridge:{options.vm_bridge} has no metadata service (it needs "
            "user networking): set mjf_env_style to path or file_url"
        )
    append = options.vm_kernel_append or DEFAULT_APPEND
    return Plan(kind, image, initrd, append, disk_format, options.vm_bridge, tuple(shares),
                user_data)  # fmt: skip


def _local_file(name: str, what: str) -> Path:
    if "://" in name:
        raise SpecError(f"{what} {name!r}: a URL reached the VM backend (the factory gives it "
                        "the downloaded copy of an https:// image)")  # fmt: skip
    path = Path(name)
    if not path.is_absolute():
        raise SpecError(f"{what} {name!r}: not an absolute path")
    try:
        readable = path.is_file() and os.access(path, os.R_OK)
    except OSError as err:  # no access to a folder above it, a name too long
        raise SpecError(f"{what} {path}: cannot look at it: {err.strerror or err}") from err
    if not readable:
        raise SpecError(f"{what} {path}: not a readable file")
    return path
