"""``lmrunner health``: a Nagios/NRPE check of this factory (Vac's ``check-vacd``).

Exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN, one line on stdout with performance data. Reads
the daemon's heartbeat file, the store and the state directory's filesystem; asks no daemon.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from lmrunner import health
from lmrunner.cli.common import common_options, load
from lmrunner.lifecycle import ACTIVE
from lmrunner.state import LmRecord, Store, StoreError


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "health",
        parents=[common_options()],
        help="Nagios/NRPE check: is the factory passing, are its engines and disk well",
        description="Check the factory the way Vac's check-vacd did: exit 0 OK, 1 WARNING, "
        "2 CRITICAL, 3 UNKNOWN, with one line of text and performance data. CRITICAL: no "
        "daemon, no pass for 5 minutes, the state directory full, read-only or under 3 %% "
        "free. WARNING: an engine unavailable, under 10 %% free, factories of the space silent.",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        verdict = _verdict(args)
    except Exception as err:  # a check must answer, whatever happened: UNKNOWN
        verdict = health.Verdict(health.UNKNOWN, health.plain(str(err) or type(err).__name__))
    print(verdict.line())
    return verdict.code


def _verdict(args: argparse.Namespace) -> health.Verdict:
    config = load(args, check_files=False)
    state_dir = config.factory.state_dir
    active: list[LmRecord] | None = None
    try:  # unreadable (no daemon and no rights to its WAL): the heartbeat still judges
        store = Store(state_dir, readonly=True)
    except StoreError:
        store = None
    if store is not None:
        try:
            active = [r for r in store.active() if r.state in ACTIVE]
        except StoreError:
            active = None
        finally:
            store.close()
    try:
        info = os.statvfs(state_dir)
        free: float | None = info.f_bavail / info.f_blocks if info.f_blocks else None
    except OSError:
        free = None
    return health.judge(
        health.read_heartbeat(state_dir),
        now=time.time(),
        lms=None if active is None else len(active),
        processors_used=None if active is None else sum(r.processors for r in active),
        processors_total=config.factory.total_processors,
        free_share=free,
    )
