"""``lmrunner machinetypes``: each machinetype's share, what runs, backoff, and its last outcome."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from lmrunner import lmdisks, payload, slots
from lmrunner.cli.common import common_options, load
from lmrunner.diskmethods import DiskMethod, DiskUnsupported, open_disk_method
from lmrunner.lifecycle import ACTIVE
from lmrunner.state import Store

SCHEMA = "lmrunner.machinetypes/1"


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "machinetypes",
        parents=[common_options()],
        help="show each machinetype's share, running LMs, backoff and last outcome",
        description="Per machinetype: target share, running LMs/processors/HS06, whether it may "
        "start now (or why not: backoff until when, share 0, ...), and its last outcome.",
    )
    parser.add_argument("--json", action="store_true", help=f"print JSON (schema {SCHEMA})")
    parser.add_argument(
        "--space",
        action="store_true",
        help="each machinetype summed over every factory of the space (VacQuery; schema "
        "lmrunner.machinetypes.space/1 with --json)",
    )
    parser.add_argument("--timeout", type=float, help="with --space: seconds in all")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.space:
        from lmrunner.cli import spaceviews  # VacQuery only when asked

        return spaceviews.machinetypes(args)
    config = load(args, check_files=False)
    store = Store(config.factory.state_dir)
    try:
        active = store.active()
        last = store.last_finished(config.machinetypes)
    finally:
        store.close()
    now = time.time()
    running = [
        slots.RunningLm(r.machinetype, r.processors, r.hs06, r.shutdown_time, r.created, r.started)
        for r in active
        if r.state in ACTIVE
    ]
    disks: DiskMethod | None
    try:
        disks = open_disk_method(config.factory)
    except DiskUnsupported:
        disks = None
    rows: list[dict[str, Any]] = []
    for name, mt in config.machinetypes.items():
        record = last.get(name)
        aborted = record is not None and record.outcome is not None and record.outcome.abort
        history = slots.TypeHistory(last_abort=record.finished if aborted and record else None)
        mine = [r for r in running if r.machinetype == name]
        blocked = slots.eligible(mt, config, running, history, now)
        if blocked is None:  # the state directory's room for its smallest LM's disk
            size = payload.limits_for(config, mt, mt.min_processors).disk_bytes
            blocked = lmdisks.refusal(disks, config.factory, active, size)
        rows.append(
            {
                "machinetype": name,
                "backend": mt.backend.value,
                "target_share": mt.target_share,
                "running_lms": len(mine),
                "running_processors": sum(r.processors for r in mine),
                "running_hs06": sum(r.hs06 for r in mine),
                "startable": blocked is None,
                "blocked": blocked,
                "last_outcome": None
                if record is None or record.outcome is None
                else record.outcome.to_json(),
                "last_finished": None if record is None else record.finished,
            }
        )
    if args.json:
        json.dump({"schema": SCHEMA, "generated": now, "machinetypes": rows}, sys.stdout, indent=1)
        print()
        return 0
    header = (
        "MACHINETYPE",
        "BACKEND",
        "SHARE",
        "LMS",
        "PROCS",
        "HS06",
        "STARTABLE",
        "LAST OUTCOME",
    )
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        outcome = row["last_outcome"]
        lines.append(
            (
                row["machinetype"],
                row["backend"],
                f"{row['target_share']:g}",
                str(row["running_lms"]),
                str(row["running_processors"]),
                f"{row['running_hs06']:g}",
                "yes" if row["startable"] else f"no: {row['blocked']}",
                "-" if outcome is None else f"{outcome['code']} {outcome['text']}"[:40],
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)).rstrip()
        )
    return 0
