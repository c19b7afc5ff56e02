"""How a VM ended: QEMU's exit status and its ``SHUTDOWN`` reason, turned into a Status."""

from __future__ import annotations

import signal
from collections.abc import Mapping

from lmrunner import process
from lmrunner.backends.base import EngineState, Status

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
