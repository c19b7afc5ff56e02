"""``lmrunner accounting``: totals of finished LMs per machinetype and per VO, from the store.

``--json`` prints a versioned document (schema ``lmrunner.accounting/1``, described in
docs/accounting.md). Like ``ps`` it only reads the state store, so it works without the daemon.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from lmrunner.accounting import AccountingRecord, Flag
from lmrunner.cli.common import common_options, open_store
from lmrunner.errors import LmrunnerError

SCHEMA = "lmrunner.accounting/1"
FLAGS = (Flag.SHORT, Flag.FAILED, Flag.OOM, Flag.UNMEASURED)
COLUMNS = ("LMS", "WALL_H", "CPU_H", "EFF%", "HS06_H", *(f.value.upper() for f in FLAGS))
_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(?:[0-9]+[wdhms])+")
WHEN_TEXT = (
    "an ISO date or date/time in UTC (2024-05-01, 2024-05-01T12:00) or a duration back from "
    "now (7d, 12h, 1d12h; units w d h m s)"
)


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "accounting",
        parents=[common_options()],
        help="totals of finished LMs per machinetype and VO (wall, CPU, HS06 hours, flags)",
        description="Totals of the LMs that finished (since WHEN), per machinetype and per VO: "
        "LMs, wall hours, CPU hours, CPU efficiency, HS06-hours and flagged records. Reads the "
        f"state store; works without the daemon. --json prints schema {SCHEMA}.",
    )
    parser.add_argument(
        "--since", metavar="WHEN", help=f"only LMs that finished since WHEN: {WHEN_TEXT}"
    )
    parser.add_argument("--json", action="store_true", help=f"print JSON (schema {SCHEMA})")
    parser.set_defaults(run=run)


def parse_when(text: str, now: float) -> float:
    """``--since`` as a Unix time: an ISO date/time (naive means UTC) or a duration before now.

    Raises:
        LmrunnerError: naming the value and what was expected.
    """
    value = text.strip()
    if _DURATION.fullmatch(value):
        seconds = sum(
            int(number) * _UNITS[unit] for number, unit in re.findall(r"([0-9]+)([wdhms])", value)
        )
        return now - seconds
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise LmrunnerError(f"--since {text!r}: expected {WHEN_TEXT}") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.timestamp()


@dataclass
class Totals:
    """Sums over a group of accounting records."""

    lms: int = 0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0  # over the records with measured CPU only
    measured_core_seconds: float = 0.0  # wall x processors of those same records
    hs06_hours: float = 0.0
    flags: dict[str, int] = field(default_factory=lambda: {f.value: 0 for f in FLAGS})

    def add(self, record: AccountingRecord) -> None:
        self.lms += 1
        self.wall_seconds += record.wall_seconds
        if record.cpu_seconds is not None:
            self.cpu_seconds += record.cpu_seconds
            self.measured_core_seconds += record.wall_seconds * record.processors
        self.hs06_hours += record.hs06_hours
        for flag in record.flags:
            if flag.value in self.flags:
                self.flags[flag.value] += 1

    @property
    def efficiency(self) -> float | None:
        """CPU time over wall time x processors, of the LMs whose CPU time was measured."""
        if self.measured_core_seconds <= 0:
            return None
        return self.cpu_seconds / self.measured_core_seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "lms": self.lms,
            "wall_hours": self.wall_seconds / 3600,
            "cpu_hours": self.cpu_seconds / 3600,
            "efficiency": self.efficiency,
            "hs06_hours": self.hs06_hours,
            "flags": dict(self.flags),
        }

    def cells(self) -> tuple[str, ...]:
        efficiency = self.efficiency
        return (
            str(self.lms),
            f"{self.wall_seconds / 3600:.2f}",
            f"{self.cpu_seconds / 3600:.2f}",
            "-" if efficiency is None else f"{100 * efficiency:.1f}",
            f"{self.hs06_hours:.2f}",
            *(str(self.flags[f.value]) for f in FLAGS),
        )


@dataclass
class Summary:
    """Totals overall, per machinetype and per VO (``-``: no accounting_fqan)."""

    total: Totals = field(default_factory=Totals)
    machinetypes: dict[str, Totals] = field(default_factory=dict)
    vos: dict[str, Totals] = field(default_factory=dict)


def summarise(records: Iterable[AccountingRecord]) -> Summary:
    summary = Summary()
    for record in records:
        summary.total.add(record)
        summary.machinetypes.setdefault(record.machinetype, Totals()).add(record)
        summary.vos.setdefault(record.vo or "-", Totals()).add(record)
    return summary


def run(args: argparse.Namespace) -> int:
    now = time.time()
    since = None if args.since is None else parse_when(args.since, now)
    store = open_store(args)
    try:
        records = store.accounting(since)
        factory_id = store.factory_id
    finally:
        store.close()
    summary = summarise(records)
    if args.json:
        document = {
            "schema": SCHEMA,
            "factory": factory_id,
            "generated": now,
            "since": since,
            "total": summary.total.to_json(),
            "machinetypes": {name: t.to_json() for name, t in sorted(summary.machinetypes.items())},
            "vos": {name: t.to_json() for name, t in sorted(summary.vos.items())},
        }
        print(json.dumps(document))
    else:
        print(table(summary, since))
    return 0


def table(summary: Summary, since: float | None) -> str:
    """Two tables (per machinetype, per VO), each ending with the total, and a heading line."""
    if since is None:
        heading = f"{summary.total.lms} finished LMs (all recorded)"
    else:
        when = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        heading = f"{summary.total.lms} LMs finished since {when}"
    out = [heading]
    for title, groups in (("MACHINETYPE", summary.machinetypes), ("VO", summary.vos)):
        rows = [(title, *COLUMNS)]
        rows += [(name, *totals.cells()) for name, totals in sorted(groups.items())]
        rows.append(("TOTAL", *summary.total.cells()))  # names are lower case
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        out.append("")
        for row in rows:
            name, *numbers = row
            cells = [name.ljust(widths[0])]
            cells += [cell.rjust(width) for cell, width in zip(numbers, widths[1:], strict=True)]
            out.append("  ".join(cells))
    out.append("")
    out.append("CPU_H and EFF% count only LMs whose CPU time was measured (see UNMEASURED).")
    return "\n".join(out)
