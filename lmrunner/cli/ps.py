"""``lmrunner ps``: what runs, read straight from the state store (no daemon needed).

``--json`` prints a versioned document (schema ``lmrunner.ps/1``, described in docs/cli.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from lmrunner.cli.common import common_options, open_store
from lmrunner.state import LmRecord

SCHEMA = "lmrunner.ps/1"
COLUMNS = ("NAME", "MACHINETYPE", "BACKEND", "STATE", "PROCS", "UPTIME", "CPU%", "MEM", "OUTCOME")


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "ps",
        parents=[common_options()],
        help="list logical machines (running ones; --all for finished too)",
        description="List logical machines from the state store: a table with a totals line, "
        "or JSON (schema lmrunner.ps/1) with --json. Works without the daemon.",
    )
    parser.add_argument("-a", "--all", action="store_true", help="include finished and failed LMs")
    parser.add_argument("--json", action="store_true", help="print JSON (schema lmrunner.ps/1)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print LM names only")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    store = open_store(args)
    try:
        records = store.recent() if args.all else store.active()
        factory_id = store.factory_id
    finally:
        store.close()
    records.sort(key=lambda r: (not r.active, r.slot if r.active else -r.created))
    now = time.time()
    if args.quiet:
        for record in records:
            print(record.name)
    elif args.json:
        document = {
            "schema": SCHEMA,
            "factory": factory_id,
            "generated": now,
            "lms": [to_json(record) for record in records],
        }
        json.dump(document, sys.stdout, indent=1)
        print()
    else:
        print(table(records, now))
    return 0


def to_json(record: LmRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "uuid": record.uuid,
        "machinetype": record.machinetype,
        "backend": record.backend,
        "state": record.state.value,
        "processors": record.processors,
        "created": record.created,
        "started": record.started,
        "finished": record.finished,
        "shutdown_time": record.shutdown_time,
        "cpu_seconds": record.cpu_seconds,
        "memory_bytes": None,
        "memory_peak_bytes": record.memory_peak_bytes,
        "outcome": None if record.outcome is None else record.outcome.to_json(),
        # Which numbers were measured for this LM (cgroup accounting arrives per backend).
        "measured": {
            "cpu_seconds": record.cpu_seconds is not None,
            "memory_bytes": False,
            "memory_peak_bytes": record.memory_peak_bytes is not None,
        },
    }


def table(records: list[LmRecord], now: float) -> str:
    rows = [COLUMNS]
    for r in records:
        end = r.finished if r.finished is not None else now
        uptime = _duration(end - r.started) if r.started is not None else "-"
        cpu = "-"
        if r.cpu_seconds is not None and r.started is not None and end > r.started:
            cpu = f"{100 * r.cpu_seconds / ((end - r.started) * r.processors):.1f}"
        mem = _bytes(r.memory_peak_bytes) if r.memory_peak_bytes is not None else "-"
        outcome = r.outcome.message if r.outcome is not None else "-"
        rows.append(
            (
                r.name,
                r.machinetype,
                r.backend,
                r.state.value,
                str(r.processors),
                uptime,
                cpu,
                mem,
                outcome[:40],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in rows
    ]
    active = [r for r in records if r.active]
    lines.append(
        f"{len(active)} active LMs using {sum(r.processors for r in active)} processors"
        + (f"; {len(records) - len(active)} ended" if len(records) > len(active) else "")
    )
    return "\n".join(line.rstrip() for line in lines)


def _duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _bytes(value: int) -> str:
    return f"{value / 1048576:.0f}M"
