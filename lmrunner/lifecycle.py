"""An LM's states, the transitions between them, and how its outcome is decided.

States form an explicit table: an illegal transition is a bug and raises. Outcomes are
machine-readable ``{code, text, source}`` using the HEPiX shutdown codes (vac.md §7.2): 100 host
asked, 200 work done, 300 no more work, 400 banned, 500 site problem, 600 grid-wide problem,
700 payload problem; a code of 300 or more is an abort and makes the machinetype back off.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from lmrunner.errors import LmrunnerError

ABORT_CODE = 300


class LmState(StrEnum):
    """Where an LM is in its life."""

    CREATING = "creating"  # record written, directory being prepared, engine not asked yet
    STARTING = "starting"  # the engine was asked to start it
    RUNNING = "running"  # the engine runs it
    STOPPING = "stopping"  # lmrunner asked it to stop (grace period, then kill)
    FINISHED = "finished"  # it ended; outcome and accounting recorded, engine object removed
    FAILED = "failed"  # it never ran (preparing or starting failed); outcome recorded


#: Every allowed transition; anything else is a bug.
TRANSITIONS: dict[LmState, frozenset[LmState]] = {
    LmState.CREATING: frozenset({LmState.STARTING, LmState.FAILED}),
    LmState.STARTING: frozenset(
        {LmState.RUNNING, LmState.STOPPING, LmState.FINISHED, LmState.FAILED}
    ),
    LmState.RUNNING: frozenset({LmState.STOPPING, LmState.FINISHED}),
    LmState.STOPPING: frozenset({LmState.FINISHED}),
    LmState.FINISHED: frozenset(),
    LmState.FAILED: frozenset(),
}
#: States in which an LM holds processors.
ACTIVE = frozenset({LmState.CREATING, LmState.STARTING, LmState.RUNNING, LmState.STOPPING})


class IllegalTransition(LmrunnerError):
    """A state change the transition table forbids (a bug in lmrunner, never bad input)."""


def check_transition(old: LmState, new: LmState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"illegal LM state transition {old} -> {new}")


class OutcomeSource(StrEnum):
    """Who decided how an LM ended."""

    PAYLOAD = "payload"  # its shutdown_message
    WALLCLOCK = "wallclock"  # lmrunner stopped it at its shutdowntime
    HEARTBEAT = "heartbeat"  # lmrunner stopped it for a missing or stale heartbeat file
    OOM = "oom"  # the kernel killed it for exceeding its memory limit
    OPERATOR = "operator"  # an admin stopped or killed it
    START_FAILED = "start_failed"  # it could not be prepared or started
    LOST = "lost"  # its engine object vanished behind lmrunner's back
    EXIT_STATUS = "exit_status"  # it ended by itself without a message


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an LM ended: a shutdown code, its text, and who decided it."""

    code: int
    text: str
    source: OutcomeSource

    @property
    def abort(self) -> bool:
        return self.code >= ABORT_CODE

    @property
    def message(self) -> str:
        """The ``shutdown_message`` line: ``NNN text``."""
        return f"{self.code} {self.text}"

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "text": self.text, "source": self.source.value}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        return cls(int(data["code"]), str(data["text"]), OutcomeSource(data["source"]))


_MESSAGE = re.compile(r"\s*([1-7][0-9][0-9])(?:\s+(.*))?\s*", re.DOTALL)


def parse_shutdown_message(text: str) -> tuple[int, str] | None:
    """``(code, text)`` from a ``shutdown_message`` ("NNN text"); None when it is not one."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    match = _MESSAGE.fullmatch(first)
    if match is None:
        return None
    return int(match.group(1)), (match.group(2) or "").strip()


#: Exit statuses of an LM ended by a signal that only the host or an admin sends (128 + N).
OUTSIDE_KILLS = {128 + 15: "SIGTERM", 128 + 9: "SIGKILL"}


def decide_outcome(
    *,
    message: str | None,
    stop_reason: Outcome | None,
    exit_code: int | None,
    oom_killed: bool,
    lost: bool,
    lifetime: float | None,
    fizzle_seconds: int,
    engine_fault: str | None = None,
) -> Outcome:
    """The outcome of an LM that ended, from everything known about its end: the only place
    where facts (a backend's :class:`~lmrunner.backends.base.Status`, the payload's message,
    lmrunner's own stop reason) become an outcome.

    Precedence: the payload's own message; else the reason lmrunner stopped it; else an OOM
    kill; else a vanished engine object, an engine fault, or a SIGTERM/SIGKILL lmrunner did not
    send (a site problem, 500); else, for an LM that ended by itself without a message, an abort
    when it lived less than ``fizzle_seconds`` (what Vac meant to do and never did) and
    otherwise its exit status (0 is work done, anything else a payload problem).
    """
    parsed = parse_shutdown_message(message) if message is not None else None
    # A 700 after an OOM kill is the consequence (an init reporting its killed child), not news.
    if parsed is not None and not (oom_killed and parsed[0] == 700):
        return Outcome(parsed[0], parsed[1], OutcomeSource.PAYLOAD)
    if stop_reason is not None:
        return stop_reason
    if oom_killed:
        return Outcome(700, "Killed for exceeding its memory limit (OOM)", OutcomeSource.OOM)
    if lost:
        return Outcome(500, "Engine object vanished; the LM was lost", OutcomeSource.LOST)
    if engine_fault is not None:
        return Outcome(500, engine_fault, OutcomeSource.LOST)
    if exit_code in OUTSIDE_KILLS:  # lmrunner's own stops come with a stop reason
        return Outcome(
            500,
            f"Stopped from outside lmrunner (exit status {exit_code}: "
            f"{OUTSIDE_KILLS[exit_code]}, by the host or an admin)",
            OutcomeSource.LOST,
        )
    status = "unknown" if exit_code is None else str(exit_code)
    if lifetime is not None and lifetime < fizzle_seconds:
        return Outcome(
            ABORT_CODE,
            f"Fizzled after {lifetime:.0f} s without a shutdown_message (exit status {status})",
            OutcomeSource.EXIT_STATUS,
        )
    if exit_code == 0:
        return Outcome(
            200, "Exited with status 0 without a shutdown_message", OutcomeSource.EXIT_STATUS
        )
    return Outcome(
        700, f"Exited with status {status} without a shutdown_message", OutcomeSource.EXIT_STATUS
    )


def wallclock_outcome() -> Outcome:
    return Outcome(100, "Shutdown time reached", OutcomeSource.WALLCLOCK)


def heartbeat_outcome(created: bool) -> Outcome:
    """Vac's exact texts, which payload frameworks already recognise."""
    detail = "updated" if created else "created"
    return Outcome(700, f"Heartbeat file not {detail}", OutcomeSource.HEARTBEAT)


def heartbeat_problem(
    *,
    now: float,
    started: float,
    daemon_started: float,
    fizzle_seconds: int,
    heartbeat_seconds: int,
    beat_mtime: Callable[[], float | None],
) -> Outcome | None:
    """Vac's heartbeat rule (vac.md §3.6), with its grace after a daemon (re)start: once both the
    LM and the daemon started *more than* ``fizzle_seconds`` ago (Vac: started < now -
    fizzle_seconds), a missing heartbeat file (``beat_mtime()`` None, asked only then) or one
    older than ``heartbeat_seconds`` (0: any age) stops the LM."""
    if fizzle_seconds <= 0 or min(now - started, now - daemon_started) <= fizzle_seconds:
        return None
    mtime = beat_mtime()
    if mtime is None:
        return heartbeat_outcome(created=False)
    if heartbeat_seconds > 0 and now - mtime > heartbeat_seconds:
        return heartbeat_outcome(created=True)
    return None


def operator_outcome(forced: bool) -> Outcome:
    return Outcome(
        100, "Killed by operator" if forced else "Stopped by operator", OutcomeSource.OPERATOR
    )


def start_failed_outcome(reason: str) -> Outcome:
    return Outcome(500, f"Start failed: {reason}", OutcomeSource.START_FAILED)
