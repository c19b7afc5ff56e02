"""Virtual-machine logical machines on QEMU.

For now this module holds the accelerator probe: on some hosts ``/dev/kvm`` exists and answers
``KVM_GET_API_VERSION`` but a KVM guest hangs in early boot, so KVM is only used when a probe guest
actually reaches userspace within a timeout; otherwise the LM runs under TCG (software emulation).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from lmrunner import runner
from lmrunner.errors import CommandError, CommandTimeout
from lmrunner.model import ETC_PLACEMENT

LOG = logging.getLogger(__name__)

#: In the guest: the 9p shares are mounted where Docker LMs have them (images/vcbusybox/README.md);
#: user_data arrives on the config drive and is copied to /user_data.
PLACEMENT = ETC_PLACEMENT

#: What the vcbusybox init prints when booted with ``vcbusybox.probe=1``.
PROBE_MARKER = "VCBUSYBOX-PROBE-OK"
#: A KVM guest reaches userspace in 1-2 s; a hanging one never does.
DEFAULT_PROBE_TIMEOUT = 20.0


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
) -> AccelProbe:
    """Boot a probe guest under KVM and report whether KVM can be used.

    Never raises for a failing KVM: every failure (no device, no permission, QEMU error, a guest
    that hangs) is reported as :attr:`Accel.TCG` with the reason in ``detail``.
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
        str(qemu), "-accel", "kvm", "-m", "128", "-smp", "1", "-nodefaults", "-no-reboot",
        "-display", "none", "-monitor", "none", "-serial", "stdio",
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
