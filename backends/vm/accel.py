"""The accelerator: KVM only when a probe guest runs under it within a timeout, else TCG.

Some hosts have a ``/dev/kvm`` whose guests hang in early boot, or crawl (the development
machines run a guest's instructions there hundreds of times slower than TCG), so
``factory.vm_accel: auto`` runs a probe guest under ``-accel kvm`` and keeps the answer per QEMU
and host kernel (:class:`AccelCache`). The probe guest needs no build artefact: it is a 512-byte
boot sector made here (:func:`probe_boot_sector`), written to a temporary file for each probe.
The cache is an object its backend owns, made from explicit settings (files, timeout); this
module keeps no state of its own.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import struct
import tempfile
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

#: The probe guest counts this far down in 64-bit mode: about 0.1 s on a CPU running it natively,
#: under 1 s under TCG, minutes under the crawling KVM of the development machines.
PROBE_LOOPS = 1 << 28
#: The probe guest writes :data:`PROBE_EXIT_VALUE` to the ``isa-debug-exit`` port, which makes
#: QEMU exit with ``(value << 1) | 1``: that status proves the guest ran to its end.
PROBE_EXIT_PORT, PROBE_EXIT_VALUE = 0xF4, 0x31
PROBE_EXIT_STATUS = (PROBE_EXIT_VALUE << 1) | 1  # 99
#: The probe guest finishes in well under a second wherever KVM works (QEMU's start included).
DEFAULT_PROBE_TIMEOUT = 20.0
#: Which probe made a cached answer: answers of another (the former vcbusybox guest, which
#: could not tell a crawling KVM from a working one) are probed again.
PROBE_VERSION = 2
#: Host machines (``platform.machine()``) whose KVM can run the x86_64 guests of this backend.
KVM_MACHINES = frozenset({"x86_64", "amd64", "AMD64"})
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

_LOAD_ADDRESS = 0x7C00  # where the BIOS loads a boot sector
_GDT_CODE64 = 0x00209A0000000000  # present, ring 0, executable, long mode


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


def probe_boot_sector(loops: int = PROBE_LOOPS) -> bytes:
    """The probe guest: a BIOS boot sector that enters 64-bit mode, counts ``loops`` down and
    makes QEMU exit with :data:`PROBE_EXIT_STATUS` (through ``isa-debug-exit``).

    Long mode with paging is what real guests run, and the count makes a KVM that runs guest
    code far slower than TCG miss the timeout (merely entering the guest works on such hosts).
    The bytes are what GNU as makes of (``.code16``, Intel syntax, linked at 0x7c00)::

        cli; cld; xor ax,ax; mov ds,ax; mov es,ax
        mov di,0x1000; mov cx,0x1800; rep stosw          ; zero three page-table pages
        mov word [0x1000],0x2003                         ; PML4[0] -> PDPT at 0x2000
        mov word [0x2000],0x3003                         ; PDPT[0] -> PD at 0x3000
        mov word [0x3000],0x0083                         ; PD[0]: 2 MiB page at 0
        mov eax,0x20; mov cr4,eax                        ; PAE
        mov eax,0x1000; mov cr3,eax
        mov ecx,0xc0000080; rdmsr; or ax,0x100; wrmsr    ; EFER.LME
        mov eax,cr0; or eax,0x80000001; mov cr0,eax      ; PG, PE
        lgdt [gdtr]; jmp 0x08:long64
      .code64
      long64:
        mov ecx,LOOPS
      1: dec ecx; jnz 1b
        mov al,0x31; out 0xf4,al
      2: hlt; jmp 2b
        .p2align 3; gdt: .quad 0, 0x00209a0000000000; gdtr: .word 15; .long gdt
        .org 510; .byte 0x55,0xaa
    """
    if not 0 < loops < 1 << 32:
        raise ValueError(f"loops must fit in 32 bits and be positive, not {loops}")

    def real_mode(gdtr: int, long64: int) -> bytes:
        return b"".join([
            b"\xfa\xfc",  # cli; cld
            b"\x31\xc0\x8e\xd8\x8e\xc0",  # xor ax,ax; mov ds,ax; mov es,ax
            b"\xbf\x00\x10\xb9\x00\x18\xf3\xab",  # mov di,0x1000; mov cx,0x1800; rep stosw
            b"\xc7\x06\x00\x10\x03\x20",  # mov word [0x1000],0x2003
            b"\xc7\x06\x00\x20\x03\x30",  # mov word [0x2000],0x3003
            b"\xc7\x06\x00\x30\x83\x00",  # mov word [0x3000],0x0083
            b"\x66\xb8\x20\x00\x00\x00\x0f\x22\xe0",  # mov eax,0x20; mov cr4,eax
            b"\x66\xb8\x00\x10\x00\x00\x0f\x22\xd8",  # mov eax,0x1000; mov cr3,eax
            b"\x66\xb9\x80\x00\x00\xc0\x0f\x32",  # mov ecx,0xc0000080; rdmsr
            b"\x0d\x00\x01\x0f\x30",  # or ax,0x100; wrmsr
            b"\x0f\x20\xc0\x66\x0d\x01\x00\x00\x80\x0f\x22\xc0",  # cr0 |= PG | PE
            b"\x0f\x01\x16" + struct.pack("<H", gdtr),  # lgdt [gdtr]
            b"\xea" + struct.pack("<HH", long64, 0x08),  # jmp 0x08:long64
        ])  # fmt: skip

    long64 = b"".join([
        b"\xb9" + struct.pack("<I", loops),  # mov ecx,loops
        b"\xff\xc9\x75\xfc",  # 1: dec ecx; jnz 1b
        bytes([0xB0, PROBE_EXIT_VALUE, 0xE6, PROBE_EXIT_PORT]),  # mov al,0x31; out 0xf4,al
        b"\xf4\xeb\xfd",  # 2: hlt; jmp 2b
    ])  # fmt: skip
    code_size = len(real_mode(0, 0))
    gdt_offset = -(-(code_size + len(long64)) // 8) * 8
    gdt = struct.pack("<QQ", 0, _GDT_CODE64)
    gdtr_offset = gdt_offset + len(gdt)
    code = real_mode(_LOAD_ADDRESS + gdtr_offset, _LOAD_ADDRESS + code_size) + long64
    sector = code.ljust(gdt_offset, b"\0") + gdt
    sector += struct.pack("<HI", len(gdt) - 1, _LOAD_ADDRESS + gdt_offset)
    return sector.ljust(510, b"\0") + b"\x55\xaa"


def probe_argv(
    qemu: str | Path, image: Path, accel: Accel = Accel.KVM, cpu: str | None = None
) -> list[str]:
    """QEMU's command line booting the probe guest ``image`` (:func:`probe_boot_sector`):
    no devices but the disk and the exit port, no display, no reboot (a guest that faults
    makes QEMU exit 0 rather than loop through the BIOS)."""
    drive = str(image).replace(",", ",,")  # QEMU's escape for a comma in an option value
    return [
        str(qemu), "-accel", accel.value, *(["-cpu", cpu] if cpu else []), "-machine", "pc",
        "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
        "-drive", f"file={drive},format=raw,if=ide",
        "-device", f"isa-debug-exit,iobase={PROBE_EXIT_PORT:#x},iosize=0x04",
    ]  # fmt: skip


def probe_accel(
    qemu: str | Path,
    *,
    timeout: float = DEFAULT_PROBE_TIMEOUT,
    dev_kvm: Path = Path("/dev/kvm"),
    cpu: str | None = None,
    machine: str | None = None,
) -> AccelProbe:
    """Run the probe guest under KVM and report whether KVM can be used.

    ``cpu`` is the CPU model LMs will get under KVM (``host``): a
    model the host cannot run makes QEMU abort, which selects TCG too. ``machine`` is the
    host's (default: :func:`platform.machine`): KVM runs only guests of the host's own
    architecture, so on a host other than x86_64 it is TCG without a probe. Never raises for a
    failing KVM: every failure (no device, no permission, QEMU error, a guest that hangs or
    crawls) is reported as :attr:`Accel.TCG` with a one-line reason in ``detail``. QEMU is
    killed (and reaped) at ``timeout``.
    """
    started = time.monotonic()

    def tcg(reason: str) -> AccelProbe:
        LOG.info("KVM not used: %s", reason)
        return AccelProbe(Accel.TCG, reason, time.monotonic() - started)

    machine = machine if machine is not None else platform.machine()
    if machine not in KVM_MACHINES:
        return tcg(f"KVM not tried: this host is {machine or 'unknown'}, not x86_64 "
                   "(KVM runs guests of the host's architecture only)")  # fmt: skip
    if not dev_kvm.exists():
        return tcg(f"{dev_kvm} does not exist")
    if not os.access(dev_kvm, os.R_OK | os.W_OK):
        return tcg(f"{dev_kvm} is not readable and writable by this process")
    try:
        with tempfile.TemporaryDirectory(prefix="lmrunner-kvm-probe-") as folder:
            image = Path(folder) / "probe.img"
            image.write_bytes(probe_boot_sector())
            runner.run(probe_argv(qemu, image, Accel.KVM, cpu), timeout=timeout,
                       ok_codes=(PROBE_EXIT_STATUS,))  # fmt: skip
    except CommandTimeout:
        return tcg(f"the KVM probe timed out: its guest did not finish within {timeout:g} s "
                   "(KVM hangs or runs guests too slowly)")  # fmt: skip
    except CommandError as err:
        said = err.stderr.strip().splitlines()[-1] if err.stderr.strip() else "no message"
        if err.returncode is None:
            return tcg(f"qemu -accel kvm did not run: {said}")
        return tcg(f"qemu -accel kvm exited with {err.returncode}, not "
                   f"{PROBE_EXIT_STATUS} (the probe guest's end): {said}")  # fmt: skip
    except OSError as err:
        return tcg(f"cannot write the KVM probe guest to a temporary folder: {err}")
    seconds = time.monotonic() - started
    return AccelProbe(Accel.KVM, f"KVM probe guest ran in {seconds:.1f} s", seconds)


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
    directory (tests, the demo) is spared the probe (up to its timeout). Writing is best effort.
    """

    def __init__(
        self,
        files: tuple[Path, ...],
        probe_timeout: float = DEFAULT_PROBE_TIMEOUT,
    ) -> None:
        self.files = files
        self.probe_timeout = probe_timeout
        self._found: dict[CacheKey, AccelProbe] = {}
        self._lock = threading.Lock()  # one probe at a time: the others wait for its answer

    def get(self, qemu: str, version: str) -> AccelProbe:
        """The accelerator for this QEMU on this host kernel: known, read, or probed now."""
        key = (qemu, version, os.uname().release)
        with self._lock:
            found = self._found.get(key)
            for file in self.files:
                found = found or _load(file, key)
            if found is not None:
                self._found[key] = found
                return found
            LOG.info("vm: probing KVM with a boot-sector guest (up to %g s)", self.probe_timeout)
            found = probe_accel(qemu, timeout=self.probe_timeout, cpu="host")
            self._found[key] = found
            for file in self.files:
                _save(file, key, found)
            return found


def _load(path: Path, key: CacheKey) -> AccelProbe | None:
    try:
        data = json.loads(path.read_text())
        if (data["qemu"], data["qemu_version"], data["kernel"]) != key:
            return None  # probed for another QEMU or host kernel
        if data.get("probe") != PROBE_VERSION:
            return None  # made by another probe
        return AccelProbe(Accel(data["accel"]), str(data["detail"]), float(data["seconds"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save(path: Path, key: CacheKey, result: AccelProbe) -> None:
    data = {
        "accel": result.accel.value, "detail": result.detail, "seconds": result.seconds,
        "qemu": key[0], "qemu_version": key[1], "kernel": key[2], "probed_at": time.time(),
        "probe": PROBE_VERSION,
    }  # fmt: skip
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(data, indent=1) + "\n")
    except OSError as err:
        LOG.info("vm: cannot cache the accelerator probe in %s: %s", path, err)
