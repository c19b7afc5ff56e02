"""Virtual-machine logical machines: one QEMU process per LM, started directly (no libvirt).

Each LM is one ``qemu-system-x86_64`` started through :mod:`lmrunner.process` inside the LM's
cgroup. QEMU starts as root, opens everything it needs (kernel, disks, config drive, shared
folders, sockets, ``/dev/kvm``, the bridge helper), then drops to the factory's ``sc_user`` with
``-runas`` and runs under a seccomp filter (``-sandbox``): a guest escaping into QEMU lands in an
unprivileged account, and the LM's joboutputs files belong to that account (docs/backends/vm.md).

- **Boot**: a disk image (qcow2 or raw, through a per-LM copy-on-write qcow2 overlay, so the base
  is never written), an ISO (CernVM style, booted from a CD-ROM) or a kernel (``vm_initrd``,
  ``vm_kernel_append``). Memory and vCPUs are the LM's limits; a sparse qcow2 scratch disk holds
  ``disk_bytes``.
- **Contextualisation**: a config drive (:mod:`lmrunner.backends.vm_drive`) carries user_data and
  metadata; machine/job features (read-only), joboutputs (read-write) and ``/cvmfs`` are shared
  with virtio-9p under fixed mount tags (:data:`MOUNT_TAGS`).
- **Accelerator**: KVM only when a probe guest boots under it within a timeout (some hosts have
  a ``/dev/kvm`` whose guests hang), otherwise TCG; the result is cached per host kernel and
  QEMU version in ``<state_dir>/vm/accel.json``.
- **Control**: two QMP sockets per LM. ``events.sock`` is held open by the backend to learn why
  QEMU stopped (``SHUTDOWN`` reason: the guest powered off, reset or panicked, or the host quit
  it); ``qmp.sock`` takes short commands: ``stop`` presses the ACPI power button
  (``system_powerdown``), ``stop(force=True)`` sends ``quit`` and then SIGKILL.
- **State**: ``<state_dir>/vm/<uuid>/`` holds the record (``lm.json``: labels, pid and start
  time), the exit status, the shutdown reason, the sockets and the disks; ``destroy`` removes it.
  The guest's serial console goes to ``<LM dir>/console.log``, QEMU's own messages to
  ``<LM dir>/qemu.log`` (both shown by ``lmrunner logs``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar

from lmrunner import atomic, process, runner
from lmrunner.backends import vm_drive, vm_kernel
from lmrunner.backends.base import (
    LABEL_FACTORY,
    LABEL_NAME,
    EngineState,
    Handle,
    Health,
    MachineSpec,
    Owned,
    Probe,
    Status,
)
from lmrunner.errors import (
    BackendError,
    BackendUnavailable,
    CommandError,
    CommandTimeout,
    LmrunnerError,
    MachineNotFound,
    SpecError,
    StartError,
)
from lmrunner.model import ETC_PLACEMENT, MIB, Placement

if TYPE_CHECKING:
    from lmrunner.cgroups.base import CgroupController
    from lmrunner.config import FactoryConfig

LOG = logging.getLogger(__name__)

#: In the guest: the 9p shares are mounted where Docker LMs have them (images/vcbusybox/README.md);
#: user_data arrives on the config drive and is copied to /user_data.
PLACEMENT = ETC_PLACEMENT
#: The 9p mount tag of each shared folder, by its place in the guest. Guests mount by tag
#: (``mount -t 9p -o trans=virtio,version=9p2000.L TAG DIR``); vcbusybox's init knows these.
MOUNT_TAGS: Mapping[PurePosixPath, str] = {
    PLACEMENT.machinefeatures: "machinefeatures",
    PLACEMENT.jobfeatures: "jobfeatures",
    PLACEMENT.joboutputs: "joboutputs",
    PLACEMENT.cvmfs: "cvmfs",
}
HANDLE_VERSION = 1
QEMU = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"

#: What the vcbusybox init prints when booted with ``vcbusybox.probe=1``.
PROBE_MARKER = "VCBUSYBOX-PROBE-OK"
#: A KVM guest reaches userspace in 1-2 s; a hanging one never does.
DEFAULT_PROBE_TIMEOUT = 20.0
#: Where a probe guest (the vcbusybox VM artefacts) is looked for, after <state_dir>/vm/probe/.
PROBE_KERNEL, PROBE_INITRD = "vmlinuz", "initramfs.cpio.gz"

#: TCG's translation cache (QEMU's default grows to 1 GiB, charged to the LM's cgroup).
TCG_TB_MIB = 256
#: QEMU's own memory beside the guest's RAM (device models, I/O buffers, the TCG cache).
QEMU_OVERHEAD_MIB = 128
#: From QEMU's start to its QMP socket answering (seconds); a QEMU that fails exits sooner.
STARTUP_TIMEOUT = 30.0
QMP_TIMEOUT = 10.0
#: A stopping guest's power button is pressed again this often (a press in early boot is lost).
PRESS_AGAIN_SECONDS = 2.0
#: Files in each LM's folder under <state_dir>/vm/<uuid>/.
RECORD, EXIT, SHUTDOWN = "lm.json", "exit.json", "shutdown.json"
QMP_SOCKET, EVENTS_SOCKET = "qmp.sock", "events.sock"
DRIVE, OVERLAY, SCRATCH = "config.iso", "overlay.qcow2", "scratch.qcow2"
KERNELS = "kernels"  # <state_dir>/vm/kernels: unpacked kernels (vm_kernel), shared by all LMs
PVH_QEMU = (4, 0)  # the first QEMU that boots an ELF kernel through its PVH entry
BOOT_UNPACKED = "kernel-pvh"  # how an LM booted (ImageKind, or this: the unpacked ELF kernel)
CONSOLE_LOG, QEMU_LOG = "console.log", "qemu.log"
#: Longest QMP message read (QEMU's answers and events here are a few hundred bytes): a QEMU
#: taken over by its guest must not make the daemon hold an endless line.
QMP_LINE_LIMIT = 1024 * 1024
#: What the host and the data this backend keeps can raise: OSError from files, /proc, sockets
#: and signals; ValueError, TypeError and KeyError from a handle or record of the wrong shape
#: (hand-edited, or an older version's).
HOST_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, TypeError, KeyError)


class Accel(StrEnum):
    """QEMU accelerator an LM runs under."""

    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True, slots=True)
class AccelProbe:
    """Result of :func:`probe_accel`: the accelerator to use and why."""

    accel: Accel
    detail: str
    seconds: float


def probe_accel(
    qemu: str | Path,
    kernel: Path,
    initrd: Path,
    *,
    timeout: float = DEFAULT_PROBE_TIMEOUT,
    dev_kvm: Path = Path("/dev/kvm"),
    cpu: str | None = None,
) -> AccelProbe:
    """Boot a probe guest under KVM and report whether KVM can be used.

    ``cpu`` is the CPU model LMs will get under KVM (``host``): a model the host cannot run
    makes QEMU abort, which selects TCG too. Never raises for a failing KVM: every failure (no
    device, no permission, QEMU error, a guest that hangs) is reported as :attr:`Accel.TCG` with
    the reason in ``detail``.
    """
    started = time.monotonic()

    def tcg(reason: str) -> AccelProbe:
        LOG.info("KVM not used: %s", reason)
        return AccelProbe(Accel.TCG, reason, time.monotonic() - started)

    if not dev_kvm.exists():
        return tcg(f"{dev_kvm} does not exist")
    if not os.access(dev_kvm, os.R_OK | os.W_OK):
        return tcg(f"{dev_kvm} is not readable and writable by this process")
    argv = [
        str(qemu), "-accel", "kvm", *(["-cpu", cpu] if cpu else []), "-m", "128", "-smp", "1",
        "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none", "-serial", "stdio",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 quiet vcbusybox.probe=1",
    ]  # fmt: skip
    try:
        done = runner.run(argv, timeout=timeout)
    except CommandTimeout:
        return tcg(f"a KVM guest did not reach userspace within {timeout:g} s")
    except CommandError as err:
        return tcg(f"qemu -accel kvm failed: {err}")
    if PROBE_MARKER not in done.stdout:
        return tcg("the KVM probe guest powered off without reaching userspace")
    seconds = time.monotonic() - started
    return AccelProbe(Accel.KVM, f"KVM probe guest booted in {seconds:.1f} s", seconds)


def memory_overhead_bytes(accel: Accel) -> int:
    """What one QEMU needs beyond its guest's RAM: the LM's cgroup must allow this much more
    than ``limits.memory_bytes``, or a guest using all its memory gets QEMU OOM-killed."""
    return (QEMU_OVERHEAD_MIB + (TCG_TB_MIB if accel is Accel.TCG else 0)) * MIB


# --- the boot plan (validated before any side effect) ----------------------------------------


class ImageKind(StrEnum):
    KERNEL = "kernel"  # image is a kernel, booted with vm_initrd and vm_kernel_append
    ISO = "iso"  # a live CD (CernVM): boots from a CD-ROM, the scratch disk is its disk
    DISK = "disk"  # a bootable disk (qcow2 or raw), through a per-LM copy-on-write overlay


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


DEFAULT_APPEND = "console=ttyS0 panic=-1"


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
    options = spec.options
    image = _local_file(spec.image, f"{where}: image")
    initrd_name = options.get("vm_initrd")
    initrd = _local_file(str(initrd_name), f"{where}: vm_initrd") if initrd_name else None
    try:
        kind, disk_format = image_kind(image)
    except OSError as err:
        raise SpecError(f"{where}: image {image}: cannot read it: {err.strerror}") from err
    if initrd is not None:
        kind, disk_format = ImageKind.KERNEL, None
    network = str(options.get("vm_network") or "user")
    if network == "user":
        bridge = None
    elif re.fullmatch(r"bridge:[A-Za-z0-9_.-]+", network):
        bridge = network.partition(":")[2]
    else:
        raise SpecError(f"{where}: vm_network {network!r}: expected user or bridge:NAME")
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
    append = str(options.get("vm_kernel_append") or DEFAULT_APPEND)
    return Plan(kind, image, initrd, append, disk_format, bridge, tuple(shares), user_data)


def _local_file(name: str, what: str) -> Path:
    if "://" in name:
        raise SpecError(f"{what} {name!r}: VM images must be local files (no download cache)")
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


# --- the QEMU command line -----------------------------------------------------------------


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
    kernel: Path | None = None  # the kernel to boot instead of the image (vm_kernel.cached)


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
    disk = "if=none,cache=unsafe,discard=unmap"  # throw-away disks: no flushes
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
            "-drive", f"file={_opt(vm_dir / OVERLAY)},format=qcow2,id=root,{disk}",
            "-device", "virtio-blk-pci,drive=root,serial=root,bootindex=0",
        ]  # fmt: skip
    if launch.scratch:
        argv += [
            "-drive", f"file={_opt(vm_dir / SCRATCH)},format=qcow2,id=scratch,{disk}",
            "-device", "virtio-blk-pci,drive=scratch,serial=scratch",
        ]  # fmt: skip
    argv += [
        "-drive", f"file={_opt(vm_dir / DRIVE)},format=raw,if=none,id=config,readonly=on",
        "-device", f"virtio-blk-pci,drive=config,serial={vm_drive.VOLUME_LABEL}",
    ]  # fmt: skip
    for index, (tag, source, read_only) in enumerate(boot.shares):
        # none: files the guest (as root) makes are plain files of QEMU's account on the host.
        readonly = ",readonly=on" if read_only else ""
        argv += [
            "-fsdev", f"local,id=fs{index},path={_opt(source)},security_model=none{readonly}",
            "-device", f"virtio-9p-pci,fsdev=fs{index},mount_tag={tag}",
        ]  # fmt: skip
    if boot.bridge is None:
        netdev = f"user,id=net0,hostname={_opt(spec.name)}"
    else:  # qemu-bridge-helper (run by QEMU while still root) adds the tap to the bridge
        netdev = f"bridge,id=net0,br={_opt(boot.bridge)}"
    # No PXE option ROM (romfile=): the firmware would run it on every boot, ~1 s under TCG.
    argv += [
        "-netdev", netdev,
        "-device", f"virtio-net-pci,netdev=net0,mac={mac_address(spec.uuid)},romfile=",
    ]  # fmt: skip
    # seccomp: no obsolete calls, no new processes (the bridge helper is one), no scheduler or
    # resource changes. Privilege calls stay allowed: -runas itself needs setuid.
    sandbox = "on,obsolete=deny,resourcecontrol=deny"
    argv += ["-sandbox", sandbox + (",spawn=deny" if boot.bridge is None else "")]
    if launch.runas is not None:
        if launch.qemu_version >= (9, 1):  # -runas is deprecated there
            argv += ["-run-with", f"user={_opt(launch.runas)}"]
        else:
            argv += ["-runas", launch.runas]
    return argv


# --- QMP -----------------------------------------------------------------------------------


class QmpError(LmrunnerError):
    """A QMP session failed (no socket, no greeting, an error answer)."""


class QmpSession:
    """One QMP connection: the greeting, ``qmp_capabilities``, then commands and events.

    Connects through ``/proc/self/fd/<dir>/<name>``, so the socket's own path may be longer than
    the 108 bytes a socket address holds.
    """

    def __init__(self, directory: Path, name: str, timeout: float = QMP_TIMEOUT) -> None:
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(f"/proc/self/fd/{fd}/{name}")
            self.reader = self.sock.makefile("rb")
            self.greeting = self._read()
            if "QMP" not in self.greeting:
                raise QmpError(f"not a QMP greeting: {self.greeting!r}")
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise
        finally:
            os.close(fd)

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run ``command``; its ``return`` value. Events arriving meanwhile are skipped."""
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = dict(arguments)
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            answer = self._read()
            if "return" in answer:
                return answer["return"]
            if "error" in answer:
                error = answer["error"]
                desc = error.get("desc", error) if isinstance(error, dict) else error
                raise QmpError(f"{command}: {desc}")

    def events(self) -> Iterator[dict[str, Any]]:
        """Yield events until QEMU closes the connection (it exits) or :meth:`close`."""
        try:
            self.sock.settimeout(None)
            while True:
                event = self._read()
                yield event
        except (QmpError, OSError, ValueError):  # ValueError: read from a closed file
            return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # QEMU sees the end at once (it takes the next)
        with contextlib.suppress(OSError):
            self.reader.close()
        self.sock.close()

    def _read(self) -> dict[str, Any]:
        line = self.reader.readline(QMP_LINE_LIMIT)
        if not line:
            raise QmpError("QEMU closed the QMP connection")
        if len(line) >= QMP_LINE_LIMIT and not line.endswith(b"\n"):
            raise QmpError(f"a QMP message longer than {QMP_LINE_LIMIT} bytes: {line[:200]!r}")
        try:
            value = json.loads(line)
        except ValueError as err:
            raise QmpError(f"not QMP: {line[:200]!r}") from err
        if not isinstance(value, dict):
            raise QmpError(f"not QMP: {line[:200]!r}")
        return value


def qmp_execute(directory: Path, command: str, timeout: float = QMP_TIMEOUT) -> Any:
    """One command on the LM's command socket (a short session of its own)."""
    try:
        session = QmpSession(directory, QMP_SOCKET, timeout)
    except OSError as err:
        raise QmpError(f"cannot connect to {directory / QMP_SOCKET}: {err}") from err
    try:
        return session.execute(command)
    except OSError as err:
        raise QmpError(f"{command}: {err}") from err
    finally:
        session.close()


# --- how an LM ended ---------------------------------------------------------------------------

#: QEMU's SHUTDOWN reasons (qapi/run-state.json) -> (exit code, detail, engine fault). The core
#: uses the fault only when lmrunner did not stop the LM itself.
REASONS: Mapping[str, tuple[int | None, str, str | None]] = {
    "guest-shutdown": (0, "the guest powered off", None),
    "guest-reset": (None, "the guest rebooted or reset (QEMU runs with -no-reboot)", None),
    "guest-panic": (None, "the guest kernel panicked", None),
    "host-qmp-quit": (0, "QEMU quit on a QMP command", "QEMU was told to quit (QMP) from "
                      "outside lmrunner"),
    "host-qmp-system-reset": (None, "reset by a QMP command", "The VM was reset (QMP) from "
                              "outside lmrunner"),
    "host-signal": (None, "QEMU was stopped by a signal", "QEMU was stopped by a signal from "
                    "outside lmrunner"),
    "host-ui": (None, "QEMU was closed from its user interface", "QEMU was closed from "
                "outside lmrunner"),
    "host-error": (None, "QEMU stopped on a host error", "QEMU stopped on a host error"),
}  # fmt: skip


def ended(exit_status: process.ExitStatus | None, reason: str | None) -> Status:
    """The Status of a VM whose QEMU has ended, from its exit status (known while QEMU was
    this daemon's child) and its SHUTDOWN reason (known while the event socket was held)."""
    code = None if exit_status is None else exit_status.exit_code
    ended_at = None if exit_status is None else exit_status.ended_at
    if reason is not None and reason in REASONS:
        reason_code, detail, fault = REASONS[reason]
        if code is None or code == 0:
            code = reason_code
        return Status(EngineState.EXITED, code, ended_at=ended_at, detail=detail,
                      engine_fault=fault)  # fmt: skip
    if code is None:
        detail = "QEMU ended while lmrunner was not watching; how is unknown"
        return Status(EngineState.EXITED, None, ended_at=ended_at, detail=detail)
    if code > 128:  # killed by a signal (lmrunner's own kills come with a stop reason)
        number = code - 128
        name = signal.Signals(number).name if number in signal.valid_signals() else str(number)
        why = f"QEMU was killed by {name}"
        return Status(EngineState.EXITED, code, ended_at=ended_at, detail=why)
    if code != 0:
        why = f"QEMU failed with exit status {code} (see qemu.log)"
        return Status(EngineState.EXITED, code, ended_at=ended_at, detail=why, engine_fault=why)
    return Status(EngineState.EXITED, 0, ended_at=ended_at, detail="QEMU exited")


# --- the accelerator cache ---------------------------------------------------------------------

_ACCEL_CACHE: dict[tuple[str, str, str], AccelProbe] = {}  # per process: (qemu, version, kernel)
_ACCEL_LOCK = threading.Lock()


def _load_accel(path: Path, key: tuple[str, str, str]) -> AccelProbe | None:
    try:
        data = json.loads(path.read_text())
        if (data["qemu"], data["qemu_version"], data["kernel"]) != key:
            return None  # probed for another QEMU or host kernel
        return AccelProbe(Accel(data["accel"]), str(data["detail"]), float(data["seconds"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


#: Where the accelerator probe's answer is kept for the whole host (best effort).
HOST_CACHE_DIR = Path(os.environ.get("LMRUNNER_CACHE_DIR", "/var/cache/lmrunner"))


def _save_accel(path: Path, key: tuple[str, str, str], result: AccelProbe) -> None:
    data = {
        "accel": result.accel.value, "detail": result.detail, "seconds": result.seconds,
        "qemu": key[0], "qemu_version": key[1], "kernel": key[2], "probed_at": time.time(),
    }  # fmt: skip
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(data, indent=1) + "\n")
    except OSError as err:
        LOG.info("vm: cannot cache the accelerator probe in %s: %s", path, err)


# --- the backend -------------------------------------------------------------------------------


class VmBackend:
    """QEMU virtual machines as logical machines.

    No OSError, no error of a corrupt handle or record, and no error of the QEMU tools leaves
    a method of the protocol: each is raised again as a :class:`~lmrunner.errors.BackendError`
    naming the LM (:meth:`_host_errors`).
    """

    name: ClassVar[str] = "vm"
    placement: ClassVar[Placement] = PLACEMENT
    #: QEMU drops to sc_user (-runas) once it has opened its files; see the module docstring.
    runs_as_sc_user: ClassVar[bool] = True

    def __init__(
        self,
        factory: FactoryConfig,
        cgroups: CgroupController | None = None,
        *,
        supervisor: process.Supervisor | None = None,
        probe_dirs: tuple[Path, ...] | None = None,
        probe_timeout: float = DEFAULT_PROBE_TIMEOUT,
    ) -> None:
        self.factory = factory
        self.cgroups = cgroups
        self.root = factory.state_dir / "vm"
        self.supervisor = supervisor or process.Supervisor()
        self.probe_dirs = probe_dirs if probe_dirs is not None else self._default_probe_dirs()
        self.probe_timeout = probe_timeout
        self._version: tuple[str, str] | None = None  # (qemu path, version text)
        self._lock = threading.Lock()
        self._listeners: dict[str, tuple[QmpSession, threading.Thread]] = {}
        self._children: set[str] = set()  # LMs whose QEMU is this process's child
        self._pressing: set[str] = set()  # LMs whose power button is pressed until they end
        self._closed = threading.Event()
        self._kernels = vm_kernel.KernelCache(self.root / KERNELS)
        self._told: set[str] = set()  # kernels already logged as not unpackable

    # --- the protocol ---------------------------------------------------------------------

    def probe(self) -> Probe:
        try:
            return self._probe()
        except Exception as err:  # the contract: never raises; a surprise is a reason, logged
            LOG.exception("vm: the probe failed unexpectedly")
            return Probe(Health.UNAVAILABLE, None, f"unavailable: {type(err).__name__}: {err}")

    def _probe(self) -> Probe:
        try:
            version = self._qemu()[1]
            if shutil.which(QEMU_IMG) is None:
                return Probe(Health.UNAVAILABLE, version, f"unavailable: {QEMU_IMG} not found")
            if vm_drive.iso_tool() is None:
                why = "unavailable: no genisoimage or xorriso to write config drives"
                return Probe(Health.UNAVAILABLE, version, why)
            accel = self.accel()
        except (LmrunnerError, OSError) as err:
            return Probe(Health.UNAVAILABLE, None, f"unavailable: {err}")
        return Probe(Health.OK, version, f"QEMU {version}, accel {accel.accel} ({accel.detail})")

    def validate(self, spec: MachineSpec) -> None:
        plan(spec)
        self._runas(spec)

    def start(self, spec: MachineSpec) -> Handle:
        boot = plan(spec)
        runas = self._runas(spec)
        try:
            vm_dir = self._vm_dir(spec.uuid)
            qemu, version = self._qemu()
            accel = self.accel().accel
        except (LmrunnerError, OSError) as err:
            recoverable = isinstance(err, BackendUnavailable)  # QEMU broken: maybe mended soon
            raise StartError(
                self.name, f"cannot start {spec.name}: {err}", recoverable=recoverable
            ) from err
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            vm_dir.mkdir(mode=0o700)
        except OSError as err:
            raise StartError(self.name, f"cannot make {vm_dir}: {err}") from err
        record: dict[str, Any] = {
            "uuid": spec.uuid, "name": spec.name, "labels": dict(spec.labels),
            "directory": str(spec.directory), "accel": accel.value, "qemu": version,
            "created": time.time(), "pid": None, "start_ticks": None, "boot": boot.kind.value,
        }  # fmt: skip
        pid: process.ProcessId | None = None
        try:
            self._write_record(spec.uuid, record)  # first: a half-started LM can be found
            self._drive(spec, boot, vm_dir / DRIVE)
            if boot.kind is ImageKind.DISK:
                self._qemu_img("create", "-q", "-f", "qcow2", "-F", boot.disk_format or "raw",
                               "-b", boot.image, vm_dir / OVERLAY)  # fmt: skip
            scratch = spec.limits.disk_bytes > 0
            if scratch:
                self._qemu_img("create", "-q", "-f", "qcow2", vm_dir / SCRATCH,
                               str(spec.limits.disk_bytes))  # fmt: skip
            kernel = self._direct_kernel(boot, accel, _version_tuple(version))
            if kernel is not None:
                record["boot"] = BOOT_UNPACKED
            launch = Launch(qemu, _version_tuple(version), accel, vm_dir, runas, scratch, kernel)
            argv = qemu_argv(spec, boot, launch)
            with self._lock:
                self._children.add(spec.uuid)
            pid = self.supervisor.spawn(
                spec.uuid,
                argv,
                status_file=vm_dir / EXIT,
                log_file=spec.directory / QEMU_LOG,
                procs_files=spec.cgroup.procs_files if spec.cgroup else (),
                env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
                cwd=vm_dir,
            )
            record.update(pid=pid.pid, start_ticks=pid.start_ticks)
            self._write_record(spec.uuid, record)
            self._listen(spec.uuid, vm_dir, pid, STARTUP_TIMEOUT, spec.directory)
        except (LmrunnerError, OSError) as err:
            if pid is not None:
                self._kill(pid)
            with self._lock:
                self._children.discard(spec.uuid)
            shutil.rmtree(vm_dir, ignore_errors=True)
            if isinstance(err, StartError):
                raise
            raise StartError(self.name, f"cannot start the VM of {spec.name}: {err}") from err
        LOG.info("vm: lm=%s pid=%d accel=%s boot=%s", spec.name, pid.pid, accel, record["boot"])
        return Handle(HANDLE_VERSION, {
            "pid": pid.pid, "start_ticks": pid.start_ticks, "vm_dir": str(vm_dir),
            "directory": str(spec.directory), "accel": accel.value,
        }, _engine(record))  # fmt: skip

    def recover(self, uuid: str, handle: Handle) -> None:
        with self._host_errors(f"cannot reattach to LM {uuid}"):
            record = self._record(uuid)
            if record is None:
                raise MachineNotFound(self.name, f"no VM record {self.root / uuid / RECORD}")
            pid = self._process(uuid, handle, record)
            if pid is None:
                return  # it ended while lmrunner was down: inspect says how much is known
            if not self.supervisor.adopt(uuid, pid):
                return
            try:
                self._listen(uuid, self.root / uuid, pid, QMP_TIMEOUT, None)
            except (QmpError, StartError, OSError) as err:  # its exit is still seen, not why
                LOG.warning("vm: lm=%s: cannot reattach to QMP events: %s", uuid, err)

    def inspect(self, uuid: str, handle: Handle) -> Status:
        with self._host_errors(f"cannot inspect LM {uuid}"):
            return self._inspect(uuid, handle)

    def _inspect(self, uuid: str, handle: Handle) -> Status:
        vm_dir = self._vm_dir(uuid)
        record = self._record(uuid)
        if record is None:
            return Status(EngineState.MISSING, detail=f"no VM record in {vm_dir}")
        pid = self._process(uuid, handle, record)
        if pid is not None:
            return Status(EngineState.RUNNING)
        self._drain(uuid, wait=True)
        status = process.read_status(vm_dir / EXIT)
        with self._lock:
            child = uuid in self._children
        deadline = time.monotonic() + 2.0
        while status is None and child and time.monotonic() < deadline:
            time.sleep(0.01)  # the waiting thread records the status right after the exit
            status = process.read_status(vm_dir / EXIT)
        reason = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            found = json.loads((vm_dir / SHUTDOWN).read_text()).get("reason")
            reason = found if isinstance(found, str) else None
        return ended(status, reason)

    def stop(self, uuid: str, handle: Handle, *, force: bool = False) -> None:
        with self._host_errors(f"cannot stop LM {uuid}"):
            self._stop(uuid, handle, force=force)

    def _stop(self, uuid: str, handle: Handle, *, force: bool) -> None:
        vm_dir = self._vm_dir(uuid)
        pid = self._process(uuid, handle, self._readable_record(uuid))
        if pid is None:
            return
        if not force:
            try:  # the ACPI power button: the guest shuts down (vcbusybox: SIGTERM to payload)
                qmp_execute(vm_dir, "system_powerdown", timeout=5.0)
            except QmpError as err:
                raise BackendError(
                    self.name, f"LM {uuid}: cannot press the power button: {err}"
                ) from err
            with self._lock:
                if uuid in self._pressing:
                    return
                self._pressing.add(uuid)
            threading.Thread(
                target=self._press_again, args=(uuid, vm_dir, pid), name=f"power-{uuid[:8]}",
                daemon=True,
            ).start()  # fmt: skip
            return
        with contextlib.suppress(QmpError):
            qmp_execute(vm_dir, "quit", timeout=2.0)
        if not _gone(pid, 1.0):
            self._kill(pid)

    def destroy(self, uuid: str, handle: Handle) -> None:
        with self._host_errors(f"cannot destroy LM {uuid}"):
            vm_dir = self._vm_dir(uuid)
            pid = self._process(uuid, handle, self._readable_record(uuid))
            if pid is not None:
                self._kill(pid)
                _gone(pid, 5.0)
            self._drain(uuid, wait=False)
            with self._lock:
                self._children.discard(uuid)
            # Disks, drive, sockets, record: root's alone (0700), QEMU as sc_user writes none.
            shutil.rmtree(vm_dir, ignore_errors=True)

    def list_owned(self) -> list[Owned]:
        with self._host_errors("cannot list LMs"):
            return self._list_owned()

    def _list_owned(self) -> list[Owned]:
        owned = []
        for file in sorted(self.root.glob(f"*/{RECORD}")):
            try:
                record = self._record(file.parent.name)
            except BackendError as err:  # the others are still listed
                LOG.warning("%s", err)
                continue
            if record is None:
                continue
            labels = record.get("labels")
            labels = labels if isinstance(labels, dict) else {}
            handle = Handle(HANDLE_VERSION, {
                "pid": record.get("pid"), "start_ticks": record.get("start_ticks"),
                "vm_dir": str(file.parent), "directory": record.get("directory"),
                "accel": record.get("accel"),
            }, _engine(record))  # fmt: skip
            owned.append(Owned(record["uuid"], str(labels.get(LABEL_NAME, "")),
                               str(labels.get(LABEL_FACTORY, "")), handle))  # fmt: skip
        return owned

    def watch(self, notify: Callable[[str], None]) -> None:
        self.supervisor.watch(notify)

    def close(self) -> None:
        self._closed.set()
        self.supervisor.close()
        with self._lock:
            listeners = list(self._listeners.values())
            self._listeners.clear()
        for session, thread in listeners:
            session.close()
            thread.join(timeout=2)

    # --- accelerator ----------------------------------------------------------------------

    def memory_overhead(self) -> int:
        with self._host_errors("cannot tell QEMU's memory overhead", BackendUnavailable):
            return memory_overhead_bytes(self.accel().accel)

    def accel(self) -> AccelProbe:
        """The accelerator LMs start under (``factory.vm_accel``; ``auto`` probes once per host
        kernel and QEMU version, cached in <state_dir>/vm/accel.json and host-wide in
        /var/cache/lmrunner/vm-accel.json)."""
        choice = self.factory.vm_accel
        if choice == "tcg":
            return AccelProbe(Accel.TCG, "factory.vm_accel is tcg", 0.0)
        if choice == "kvm":
            return AccelProbe(Accel.KVM, "factory.vm_accel is kvm (not probed)", 0.0)
        qemu, version = self._qemu()
        key = (qemu, version, os.uname().release)
        cache = self.root / "accel.json"
        # The answer is the host's, not one factory's: a host-wide copy spares every new state
        # directory (tests, the demo) the 20 s probe.
        host_cache = HOST_CACHE_DIR / "vm-accel.json"
        with _ACCEL_LOCK:
            found = _ACCEL_CACHE.get(key) or _load_accel(cache, key) or _load_accel(host_cache, key)
            if found is not None:
                _ACCEL_CACHE[key] = found
                return found
            artefacts = self._probe_guest()
            if artefacts is None:  # not cached: the artefacts may be installed later
                where = ", ".join(str(d) for d in self.probe_dirs)
                return AccelProbe(Accel.TCG, f"KVM not tried: no probe guest ({PROBE_KERNEL}, "
                                  f"{PROBE_INITRD}) in {where}", 0.0)  # fmt: skip
            LOG.info("vm: probing KVM with %s (up to %g s)", artefacts[0], self.probe_timeout)
            found = probe_accel(qemu, *artefacts, timeout=self.probe_timeout, cpu="host")
            _ACCEL_CACHE[key] = found
            _save_accel(cache, key, found)
            _save_accel(host_cache, key, found)
            return found

    def _probe_guest(self) -> tuple[Path, Path] | None:
        for folder in self.probe_dirs:
            kernel, initrd = folder / PROBE_KERNEL, folder / PROBE_INITRD
            if kernel.is_file() and initrd.is_file():
                return kernel, initrd
        return None

    def _default_probe_dirs(self) -> tuple[Path, ...]:
        dirs = [self.root / "probe"]
        if "VCBUSYBOX_OUT" in os.environ:
            dirs.append(Path(os.environ["VCBUSYBOX_OUT"]) / "vm")
        dirs.append(Path(__file__).resolve().parents[1] / "build" / "vcbusybox" / "vm")  # checkout
        return tuple(dirs)

    # --- internals ------------------------------------------------------------------------

    def _qemu(self) -> tuple[str, str]:
        """QEMU's path and version (asked once)."""
        if self._version is None:
            found = shutil.which(QEMU)
            if found is None:
                raise BackendUnavailable(
                    self.name, f"{QEMU} not found (apt-get install qemu-system-x86)"
                )
            try:
                done = runner.run([found, "-version"], timeout=30)
            except CommandError as err:
                raise BackendUnavailable(self.name, f"{QEMU} does not run: {err}") from err
            match = re.search(r"version (\d+\.\d+(?:\.\d+)?)", done.stdout)
            self._version = (found, match.group(1) if match else done.stdout.strip()[:40])
        return self._version

    def _direct_kernel(self, boot: Plan, accel: Accel, qemu: tuple[int, int]) -> Path | None:
        """The unpacked ELF to boot instead of a bzImage (:mod:`vm_kernel`), or None."""
        choice = self.factory.vm_direct_kernel
        if boot.kind is not ImageKind.KERNEL or choice == "never" or qemu < PVH_QEMU:
            return None
        if choice == "auto" and accel is not Accel.TCG:  # KVM decompresses in ~0.2 s: keep KASLR
            return None
        try:
            kernel: Path = self._kernels.get(boot.image)
        except vm_kernel.KernelError as err:
            told = f"{boot.image}: {err}"
            if told not in self._told:  # once per kernel, not once per LM
                self._told.add(told)
                LOG.info("vm: %s boots as a bzImage: %s", boot.image, err)
            return None
        return kernel

    def _qemu_img(self, *args: str | Path) -> None:
        found = shutil.which(QEMU_IMG)
        if found is None:
            raise StartError(self.name, f"{QEMU_IMG} not found (apt-get install qemu-utils)")
        runner.run([found, *args], timeout=60)

    def _runas(self, spec: MachineSpec) -> str | None:
        """The account QEMU drops to: the LM's owner (sc_user), unless that is this process's."""
        uid = spec.owner[0]
        if uid == os.getuid():
            return None
        if os.getuid() != 0:
            raise SpecError(f"vm: cannot run QEMU as uid {uid}: lmrunner is not root")
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError as err:
            raise SpecError(f"vm: uid {uid} (the LM's owner) has no account name") from err

    def _drive(self, spec: MachineSpec, boot: Plan, output: Path) -> None:
        env = spec.env
        meta = {
            "machinetype": spec.machinetype,
            "machinefeatures": env.get("MACHINEFEATURES", str(PLACEMENT.machinefeatures)),
            "jobfeatures": env.get("JOBFEATURES", str(PLACEMENT.jobfeatures)),
            "joboutputs": env.get("JOBOUTPUTS", str(PLACEMENT.joboutputs)),
            "mount_tags": " ".join(tag for tag, _, _ in boot.shares),
        }
        key = self.factory.root_public_key
        public_key = None
        if key is not None:
            with contextlib.suppress(OSError):
                public_key = key.read_text().strip() or None
        data = vm_drive.DriveData(
            uuid=spec.uuid,
            hostname=spec.name,
            user_data=boot.user_data.read_bytes() if boot.user_data else b"",
            availability_zone=self.factory.hostname or socket.getfqdn(),
            meta=meta,
            public_key=public_key,
        )
        vm_drive.build(data, output)

    def _listen(
        self,
        uuid: str,
        vm_dir: Path,
        pid: process.ProcessId,
        timeout: float,
        lm_dir: Path | None,
    ) -> None:
        """Hold the LM's event socket (waiting up to ``timeout`` for QEMU to open it); a QEMU
        that exits first failed to start."""
        self._drain(uuid, wait=False)  # QEMU serves one client per socket: let go of ours first
        deadline = time.monotonic() + timeout
        while True:
            try:
                session = QmpSession(vm_dir, EVENTS_SOCKET, QMP_TIMEOUT)
                break
            except (OSError, QmpError) as err:
                if not process.alive(pid):
                    why = _tail(lm_dir / QEMU_LOG) if lm_dir else ""
                    raise StartError(self.name, f"QEMU exited at once: {why or err}") from err
                if time.monotonic() > deadline:
                    raise QmpError(f"no QMP answer within {timeout:g} s: {err}") from err
                time.sleep(0.01)
        thread = threading.Thread(
            target=self._events, args=(uuid, vm_dir, session), name=f"qmp-{uuid[:8]}", daemon=True
        )
        with self._lock:
            self._listeners[uuid] = (session, thread)
        thread.start()

    def _events(self, uuid: str, vm_dir: Path, session: QmpSession) -> None:
        """Record why QEMU stops (its SHUTDOWN event) until it closes the connection."""
        for event in session.events():
            if event.get("event") == "SHUTDOWN":
                data = event.get("data")
                data = data if isinstance(data, dict) else {}
                record = {"reason": data.get("reason"), "guest": data.get("guest"),
                          "at": time.time()}  # fmt: skip
                try:
                    atomic.write_text(vm_dir / SHUTDOWN, json.dumps(record))
                except OSError as err:  # destroyed meanwhile
                    LOG.debug("vm: lm=%s: cannot record the shutdown: %s", uuid, err)
        session.close()

    def _press_again(self, uuid: str, vm_dir: Path, pid: process.ProcessId) -> None:
        """Press the power button again every few seconds until QEMU is gone: a press before
        the guest handles ACPI (early boot) is lost, and pressing a shutting-down guest's button
        does nothing more."""
        try:
            while not self._closed.wait(PRESS_AGAIN_SECONDS) and process.alive(pid):
                try:
                    qmp_execute(vm_dir, "system_powerdown", timeout=2.0)
                except QmpError:
                    return  # QEMU is going (quit, killed, destroyed)
        finally:
            with self._lock:
                self._pressing.discard(uuid)

    def _drain(self, uuid: str, *, wait: bool) -> None:
        """Stop the LM's event thread; with ``wait``, first let it read what an ended QEMU
        sent (QEMU closed the socket, so this is quick)."""
        with self._lock:
            entry = self._listeners.pop(uuid, None)
        if entry is not None:
            session, thread = entry
            if wait:
                thread.join(timeout=2)
            session.close()
            thread.join(timeout=2)

    @contextlib.contextmanager
    def _host_errors(self, what: str, error: type[BackendError] = BackendError) -> Iterator[None]:
        """Raise :data:`HOST_ERRORS` met while doing ``what`` as ``error`` (chained): the one
        place they become lmrunner's. lmrunner's own errors pass unchanged."""
        try:
            yield
        except HOST_ERRORS as err:
            raise error(self.name, f"{what}: {err}") from err

    def _vm_dir(self, uuid: str) -> Path:
        """The LM's folder under <state_dir>/vm (destroy removes it: the uuid is never a path)."""
        try:
            canonical = str(uuid_mod.UUID(uuid)) == uuid
        except (ValueError, TypeError, AttributeError):
            canonical = False
        if not canonical:
            raise BackendError(self.name, f"not an LM uuid: {uuid!r}")
        return self.root / uuid

    def _record(self, uuid: str) -> dict[str, Any] | None:
        """The LM's record; None when it has none.

        Raises:
            BackendError: there is one, but it cannot be read or is not this LM's (corrupt, or
                an older version's).
        """
        file = self._vm_dir(uuid) / RECORD
        try:
            data = json.loads(file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise BackendError(self.name, f"LM {uuid}: unreadable record {file}: {err}") from err
        if not isinstance(data, dict) or data.get("uuid") != uuid:
            raise BackendError(self.name, f"LM {uuid}: {file} is not a record of this LM")
        return data

    def _readable_record(self, uuid: str) -> dict[str, Any] | None:
        """The LM's record, or None when it has none or an unreadable one (logged): for stop and
        destroy, which can do without it (the handle names the QEMU)."""
        try:
            return self._record(uuid)
        except BackendError as err:
            LOG.warning("%s", err)
            return None

    def _write_record(self, uuid: str, record: Mapping[str, Any]) -> None:
        atomic.write_text(self.root / uuid / RECORD, json.dumps(record, indent=1) + "\n")

    def _process(
        self, uuid: str, handle: Handle, record: Mapping[str, Any] | None
    ) -> process.ProcessId | None:
        """The LM's QEMU if it still runs (pid and start time both match), else None."""
        for source in (handle.data, record or {}):
            if source.get("pid") and source.get("start_ticks") is not None:
                pid = process.ProcessId(int(source["pid"]), int(source["start_ticks"]))
                return pid if process.alive(pid) else None
        return _find_qemu(uuid)  # started, but the daemon died before recording the pid

    def _kill(self, pid: process.ProcessId) -> None:
        """SIGKILL exactly this process (a pidfd: a recycled pid is never hit)."""
        try:
            pidfd = os.pidfd_open(pid.pid)
        except ProcessLookupError:
            return
        except OSError:  # no pidfd_open (Linux < 5.3, e.g. EL7): by its identity, checked first
            if process.alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid.pid, signal.SIGKILL)
            return
        try:
            if process.alive(pid):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)


def _engine(record: Mapping[str, Any]) -> dict[str, str]:
    """What ``lmrunner ps --json`` shows of a VM (``Handle.engine``)."""
    facts = {"accel": record.get("accel"), "boot": record.get("boot"), "pid": record.get("pid")}
    return {key: str(value) for key, value in facts.items() if value is not None}


def _gone(pid: process.ProcessId, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the process to end; whether it did."""
    deadline = time.monotonic() + timeout
    while process.alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _find_qemu(uuid: str) -> process.ProcessId | None:
    """A QEMU started with ``-uuid <uuid>`` (by its command line), for records without a pid."""
    wanted = f"\0-uuid\0{uuid}\0".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if wanted in cmdline and Path(os.fsdecode(cmdline.split(b"\0", 1)[0])).name == QEMU:
            return process.identify(int(entry.name))
    return None


def _version_tuple(version: str) -> tuple[int, int]:
    parts = re.findall(r"\d+", version)
    return (int(parts[0]), int(parts[1])) if len(parts) >= 2 else (0, 0)


def _tail(path: Path, lines: int = 3, limit: int = 65536) -> str:
    """The last ``lines`` lines of a log, from its last ``limit`` bytes at most."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(os.fstat(handle.fileno()).st_size - limit, 0))
            text = handle.read(limit).decode(errors="replace").strip()
    except OSError:
        return ""
    return " | ".join(text.splitlines()[-lines:])
