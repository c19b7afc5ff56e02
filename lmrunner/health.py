"""Is this factory well? The daemon's heartbeat file and the Nagios/NRPE verdict on it.

The daemon writes ``<state_dir>/daemon.heartbeat`` (JSON, atomically) after passes, at most every
:data:`HEARTBEAT_SECONDS`: when, its pid, engines that do not work, why the state directory
cannot take more, the space's silent factories. ``lmrunner health`` reads it with the store and
the state directory's filesystem and gives Vac's ``check-vacd`` exit codes: 0 OK, 1 WARNING,
2 CRITICAL, 3 UNKNOWN, with one line of text and performance data.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmrunner import atomic

HEARTBEAT = "daemon.heartbeat"
HEARTBEAT_SECONDS = 10.0
#: A heartbeat older than this: the loop does not pass (hung, or the daemon is gone).
STALE_SECONDS = 300.0
#: Free space of the state directory's filesystem below these shares: WARNING, CRITICAL.
FREE_WARNING = 0.10
FREE_CRITICAL = 0.03
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
WORDS = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
MAX_HEARTBEAT_BYTES = 65536


@dataclass(frozen=True)
class Heartbeat:
    time: float
    pid: int
    unavailable: Mapping[str, str] = field(default_factory=dict)
    state_dir_problem: str | None = None
    silent: Sequence[str] = ()

    def to_json(self) -> str:
        return json.dumps(
            {
                "time": self.time,
                "pid": self.pid,
                "unavailable": dict(self.unavailable),
                "state_dir_problem": self.state_dir_problem,
                "silent": list(self.silent),
            }
        )


class HeartbeatWriter:
    """Writes the heartbeat from the loop, at most every :data:`HEARTBEAT_SECONDS` unless what
    it says changed (a tiny atomic file: no store write per pass)."""

    def __init__(self, state_dir: Path, clock: Any = time.time) -> None:
        self.path = state_dir / HEARTBEAT
        self.clock = clock
        self._last = float("-inf")
        self._said: tuple[object, ...] = ()

    def beat(
        self, unavailable: Mapping[str, str], problem: str | None, silent: Sequence[str]
    ) -> None:
        now = self.clock()
        said = (tuple(sorted(unavailable.items())), problem, tuple(silent))
        if now - self._last < HEARTBEAT_SECONDS and said == self._said:
            return
        beat = Heartbeat(now, os.getpid(), dict(unavailable), problem, list(silent))
        try:
            atomic.write_text(self.path, beat.to_json(), durable=False)
        except OSError:
            return  # a full or read-only state directory: the store's own check reports it
        self._last, self._said = now, said


def read_heartbeat(state_dir: Path) -> Heartbeat | None:
    """The daemon's last heartbeat (None: none, or unreadable)."""
    try:
        with (state_dir / HEARTBEAT).open("rb") as handle:
            data = json.loads(handle.read(MAX_HEARTBEAT_BYTES))
        if not math.isfinite(float(data["time"])):
            return None
        return Heartbeat(
            float(data["time"]), int(data["pid"]), dict(data.get("unavailable") or {}),
            data.get("state_dir_problem"), list(data.get("silent") or []),
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Verdict:
    code: int
    text: str
    perfdata: str = ""

    def line(self) -> str:
        tail = f" | {self.perfdata}" if self.perfdata else ""
        return f"LMRUNNER {WORDS[self.code]} - {self.text}{tail}"


def plain(text: str) -> str:
    """One line without Nagios' perfdata separator: engines' messages may hold either."""
    return " ".join(text.replace("|", "/").split())[:300]


def _alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0, ...) signals our own group: never a daemon's pid
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def judge(
    heartbeat: Heartbeat | None,
    *,
    now: float,
    lms: int | None,
    processors_used: int | None,
    processors_total: int,
    free_share: float | None,
    alive: Any = _alive,
) -> Verdict:
    """The verdict: CRITICAL when no daemon passes or the state directory cannot take more or
    is nearly full; WARNING for a broken engine, a filling disk, silent factories."""
    perf = []
    if lms is not None and processors_used is not None:
        perf = [f"lms={lms}", f"processors={processors_used};;;0;{processors_total}"]
    problems: list[tuple[int, str]] = []
    if heartbeat is None:
        problems.append((CRITICAL, "no daemon heartbeat (is lmrunner daemon running?)"))
    else:
        age = max(now - heartbeat.time, 0.0)
        perf.append(f"pass_age={age:.0f}s;{STALE_SECONDS / 2:.0f};{STALE_SECONDS:.0f}")
        if not alive(heartbeat.pid):
            problems.append((CRITICAL, f"the daemon (pid {heartbeat.pid}) is not running"))
        elif age > STALE_SECONDS:
            problems.append((CRITICAL, f"the daemon has not passed for {age:.0f} s"))
        elif age > STALE_SECONDS / 2:
            problems.append((WARNING, f"the daemon's last pass was {age:.0f} s ago"))
        if heartbeat.state_dir_problem:
            problems.append((CRITICAL, f"no LM starts: {heartbeat.state_dir_problem}"))
        for backend, why in sorted(heartbeat.unavailable.items()):
            problems.append((WARNING, f"backend {backend} unavailable: {why}"[:200]))
        if heartbeat.silent:
            problems.append((WARNING, f"no answer from {', '.join(heartbeat.silent)}"[:200]))
    if free_share is not None:
        # Lower is worse: Nagios ranges "N:" alert below N.
        perf.append(f"state_dir_free={100 * free_share:.1f}%;{100 * FREE_WARNING:.0f}:;"
                    f"{100 * FREE_CRITICAL:.0f}:")  # fmt: skip
        if free_share < FREE_CRITICAL:
            problems.append((CRITICAL, f"state directory {100 * free_share:.1f}% free"))
        elif free_share < FREE_WARNING:
            problems.append((WARNING, f"state directory {100 * free_share:.1f}% free"))
    problems = [(level, plain(text)) for level, text in problems]
    code = max((level for level, _ in problems), default=OK)
    summary = f"{lms} LMs on {processors_used} of {processors_total} processors"
    if lms is None:
        summary = "LMs unknown (the state store cannot be read)"
    if problems:
        worst = [text for level, text in problems if level == code]
        text = "; ".join(worst + [text for level, text in problems if level != code])
        return Verdict(code, f"{text}; {summary}", " ".join(perf))
    age_text = "" if heartbeat is None else f", last pass {max(now - heartbeat.time, 0):.0f} s ago"
    return Verdict(OK, summary + age_text, " ".join(perf))
