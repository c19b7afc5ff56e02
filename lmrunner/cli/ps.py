"""``lmrunner ps``: what runs, read straight from the state store (no daemon needed).

``--json`` prints a versioned document (schema ``lmrunner.ps/1``, described in docs/cli.md).
This command is run often and by monitoring, so it reads light rows and imports little.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from typing import Any

from lmrunner.cgroups.base import CgroupRef, live_usage
from lmrunner.cli.common import common_options, open_store
from lmrunner.errors import CgroupError

SCHEMA = "lmrunner.ps/1"
COLUMNS = (
    "NAME", "MACHINETYPE", "BACKEND", "STATE", "PROCS", "UPTIME", "CPU%", "MEM", "DISK", "OUTCOME",
)  # fmt: skip
ACTIVE = ("creating", "starting", "running", "stopping")


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
    parser.add_argument(
        "--space",
        action="store_true",
        help="every LM of the space's factories, as they answer VacQuery (schema "
        "lmrunner.ps.space/1 with --json; --all adds empty slots)",
    )
    parser.add_argument("--timeout", type=float, help="with --space: seconds in all")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.space:
        from lmrunner.cli import spaceviews  # VacQuery only when asked: ps stays light

        return spaceviews.ps(args)
    store = open_store(args)
    try:
        listed = store.listing(ended=args.all)
        factory_id = store.factory_id
    finally:
        store.close()
    now = time.time()
    rows = [_with_live_usage(row) for row in listed]
    if args.quiet:
        sys.stdout.write("".join(f"{row['name']}\n" for row in rows))
    elif args.json:
        document = {
            "schema": SCHEMA,
            "factory": factory_id,
            "generated": now,
            "lms": [to_json(row) for row in rows],
        }
        print(json.dumps(document))  # compact: the C encoder, many times faster than indent
    else:
        print(table(rows, now))
    return 0


def _with_live_usage(row: sqlite3.Row) -> dict[str, Any]:
    """The row as a dict; a running LM's CPU and memory come live from its cgroup."""
    values = dict(row)
    values["memory_bytes"] = None
    if row["state"] in ACTIVE and row["cgroup"] is not None:
        try:
            live = live_usage(CgroupRef.from_json(row["cgroup"]))
        except CgroupError:
            live = None
        if live is not None:
            values["cpu_seconds"], values["memory_bytes"] = live
    values["disk_bytes"] = None
    if row["state"] in ACTIVE and row["disk_mount"] is not None:
        values["disk_bytes"] = _disk_used(row["disk_mount"])
    return values


def _disk_used(mount: str) -> int | None:
    """What a running LM's own filesystem holds now (None: not mounted, or unreadable)."""
    try:
        if not os.path.ismount(mount):
            return None
        info = os.statvfs(mount)
    except OSError:
        return None
    return (info.f_blocks - info.f_bfree) * info.f_frsize


def _outcome(row: dict[str, Any]) -> dict[str, Any] | None:
    value = row["outcome"]
    return None if value is None else dict(json.loads(value))


def _engine(row: dict[str, Any]) -> dict[str, str]:
    value = row["engine"]  # the handle's "engine" object, as JSON text (Store.listing)
    return {} if value is None else dict(json.loads(value))


def to_json(row: dict[str, Any]) -> dict[str, Any]:
    """One LM in the ``lmrunner.ps/1`` schema (docs/cli.md)."""
    return {
        "name": row["name"],
        "uuid": row["uuid"],
        "machinetype": row["machinetype"],
        "backend": row["backend"],
        "state": row["state"],
        "processors": row["processors"],
        "created": row["created"],
        "started": row["started"],
        "finished": row["finished"],
        "shutdown_time": row["shutdown_time"],
        "cpu_seconds": row["cpu_seconds"],
        "memory_bytes": row["memory_bytes"],
        "memory_peak_bytes": row["memory_peak_bytes"],
        # The LM's own filesystem: what it holds now (running), the most it held (sampled).
        "disk_bytes": row["disk_bytes"],
        "disk_peak_bytes": row["disk_peak_bytes"],
        "outcome": _outcome(row),
        # Facts the backend gives about how its engine runs the LM (a VM's accel, a container).
        "engine": _engine(row),
        # Which numbers were measured (from the LM's cgroup: live while it runs, final after).
        "measured": {
            "cpu_seconds": row["cpu_seconds"] is not None,
            "memory_bytes": row["memory_bytes"] is not None,
            "memory_peak_bytes": row["memory_peak_bytes"] is not None,
            "disk_bytes": row["disk_bytes"] is not None,
        },
    }


def table(rows: list[dict[str, Any]], now: float) -> str:
    lines = [COLUMNS]
    active = processors = 0
    for row in rows:
        started, finished = row["started"], row["finished"]
        end = finished if finished is not None else now
        uptime = duration(end - started) if started is not None else "-"
        cpu = "-"
        if row["cpu_seconds"] is not None and started is not None and end > started:
            cpu = f"{100 * row['cpu_seconds'] / ((end - started) * row['processors']):.1f}"
        # Running: memory now; ended: its peak (lifetime CPU%, as procps ps shows).
        memory = row["memory_bytes"]
        if memory is None:
            memory = row["memory_peak_bytes"]
        mem = "-" if memory is None else f"{memory / 1048576:.0f}M"
        disk = row["disk_bytes"] if row["disk_bytes"] is not None else row["disk_peak_bytes"]
        shown_disk = "-" if disk is None else f"{disk / 1048576:.0f}M"
        outcome = _outcome(row)
        shown = "-" if outcome is None else f"{outcome['code']} {outcome['text']}"[:40]
        if row["state"] in ACTIVE:
            active += 1
            processors += row["processors"]
        lines.append((row["name"], row["machinetype"], row["backend"], row["state"],
                      str(row["processors"]), uptime, cpu, mem, shown_disk, shown))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS) - 1)]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
           + "  " + line[-1] for line in lines]  # fmt: skip
    total = f"{active} active LMs using {processors} processors"
    if len(rows) > active:
        total += f"; {len(rows) - active} ended"
    out.append(total)
    return "\n".join(line.rstrip() for line in out)


def duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
