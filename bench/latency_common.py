"""Shared by ``bench/start_latency.py`` and its per-backend modules (``bench/latency_<name>.py``).

A backend module provides:
  - ``PAYLOAD``: the user_data script; its first act writes ``$JOBOUTPUTS/first``;
  - ``machinetype(folder, user_data) -> dict``: the machinetype running that payload;
  - ``raw_run(folder) -> float``: seconds from launching the same artefacts with the bare engine
    to the payload's first instruction;
  - ``first_seen(path) -> float``: the host's CLOCK_BOOTTIME of the first instruction, read from
    the file the payload wrote (``uptime_in_file`` for containers, ``appearance`` for VMs).
"""

from __future__ import annotations

import time
from pathlib import Path

#: Containers share the host's CLOCK_BOOTTIME through /proc/uptime (10 ms resolution).
UPTIME_PAYLOAD = '#!/bin/sh\ncat /proc/uptime > "$JOBOUTPUTS/first"\n'


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def uptime_in_file(path: Path, timeout: float = 60.0) -> float:
    """The uptime a container payload wrote into ``path`` (waits for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        if text.strip():
            return float(text.split()[0])
        time.sleep(0.005)
    raise TimeoutError(f"the payload never wrote {path}")


def appearance(path: Path, timeout: float = 300.0) -> float:
    """The host's boottime when ``path`` appears (guests have their own clock): 5 ms polls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return boottime()
        time.sleep(0.005)
    raise TimeoutError(f"the payload never wrote {path}")
