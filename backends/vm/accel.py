"""The accelerator: KVM only when a probe guest boots under it within a timeout, else TCG.

Some hosts have a ``/dev/kvm`` whose guests hang in early boot, so ``factory.vm_accel: auto``
boots the vcbusybox kernel + initramfs under ``-accel kvm`` and keeps the answer per QEMU and
host kernel (:class:`AccelCache`). The cache is an object its backend owns, made from explicit
settings (files, probe guest folders, timeout); this module keeps no state of its own.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from lmrunner import atomic, runner
from lmrunner.errors import CommandError, CommandTimeout
from lmrunner.model import MIB

LOG = logging.getLogger("lmrunner.backends.vm")  # one logger for the whole backend

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
#: Where the probe's answer is kept for the whole host (best effort), unless the environment
#: names another folder (:func:`host_cache_dir`).
HOST_CACHE_DIR = Path("/var/cache/lmrunner")
HOST_CACHE_ENV = "LMRUNNER_CACHE_DIR"

#: What a cached answer holds for: (QEMU's path, its version, the host kernel's release).
CacheKey = tuple[str, str, str]


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


def host_cache_dir(environ: Mapping[str, str]) -> Path:
    """The host-wide cache folder: ``$LMRUNNER_CACHE_DIR``, else :data:`HOST_CACHE_DIR`."""
    return Path(environ.get(HOST_CACHE_ENV, str(HOST_CACHE_DIR)))


class AccelCache:
    """The KVM probe's answer, asked once per QEMU and host kernel.

    Kept in memory (for the backend that owns this object) and in ``files``: read in their
    order, and all written after a probe. The backend passes its own ``accel.json`` and the
    host-wide ``vm-accel.json``: the answer is the host's, not one factory's, so a new state
    directory (tests, the demo) is spared the 20 s probe. Writing is best effort.
    """

    def __init__(
        self,
        files: tuple[Path, ...],
        probe_dirs: tuple[Path, ...],
        probe_timeout: float = DEFAULT_PROBE_TIMEOUT,
    ) -> None:
        self.files = files
        self.probe_dirs = probe_dirs
        self.probe_timeout = probe_timeout
        self._found: dict[CacheKey, AccelProbe] = {}
        self._lock = threading.Lock()  # one probe at a time: the others wait for its answer

    def get(self, qemu: str, version: str) -> AccelProbe:
        """The accelerator for this QEMU on this host kernel: known, read, or probed now.
        Without a probe guest it is TCG, not kept (the guest may be installed later)."""
        key = (qemu, version, os.uname().release)
        with self._lock:
            found = self._found.get(key)
            for file in self.files:
                found = found or _load(file, key)
            if found is not None:
                self._found[key] = found
                return found
            artefacts = self._probe_guest()
            if artefacts is None:
                where = ", ".join(str(d) for d in self.probe_dirs)
                return AccelProbe(Accel.TCG, f"KVM not tried: no probe guest ({PROBE_KERNEL}, "
                                  f"{PROBE_INITRD}) in {where}", 0.0)  # fmt: skip
            LOG.info("vm: probing KVM with %s (up to %g s)", artefacts[0], self.probe_timeout)
            found = probe_accel(qemu, *artefacts, timeout=self.probe_timeout, cpu="host")
            self._found[key] = found
            for file in self.files:
                _save(file, key, found)
            return found

    def _probe_guest(self) -> tuple[Path, Path] | None:
        for folder in self.probe_dirs:
            kernel, initrd = folder / PROBE_KERNEL, folder / PROBE_INITRD
            if kernel.is_file() and initrd.is_file():
                return kernel, initrd
        return None


def _load(path: Path, key: CacheKey) -> AccelProbe | None:
    try:
        data = json.loads(path.read_text())
        if (data["qemu"], data["qemu_version"], data["kernel"]) != key:
            return None  # probed for another QEMU or host kernel
        return AccelProbe(Accel(data["accel"]), str(data["detail"]), float(data["seconds"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save(path: Path, key: CacheKey, result: AccelProbe) -> None:
    data = {
        "accel": result.accel.value, "detail": result.detail, "seconds": result.seconds,
        "qemu": key[0], "qemu_version": key[1], "kernel": key[2], "probed_at": time.time(),
    }  # fmt: skip
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(data, indent=1) + "\n")
    except OSError as err:
        LOG.info("vm: cannot cache the accelerator probe in %s: %s", path, err)
