"""``lmrunner factories``: every factory of the space, as it answers VacQuery (Vac's ``vac
factories``): LMs and processors against its total, load, free disk and memory, software.

Factories are those of ``factory.factories`` (``.`` is this one), or the names given. One
round, bounded by ``udp_timeout_seconds`` (``--timeout``): a factory that does not answer in
time is listed as such.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from lmrunner.cli.common import common_options, load
from lmrunner.vacquery import protocol, space
from lmrunner.yamlsrc import one_line

SCHEMA = "lmrunner.factories/1"


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "factories",
        parents=[common_options()],
        help="ask every factory of the space how it is (VacQuery)",
        description="Send a VacQuery factory_query to each factory of the space (factory."
        "factories, '.' being this one, or the NAMEs given) and list their answers: running LMs "
        "and processors against their total, load, free disk (kB) and memory, software.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="ask these factories instead")
    parser.add_argument("--json", action="store_true", help=f"print JSON (schema {SCHEMA})")
    parser.add_argument("--timeout", type=float, help="seconds in all (udp_timeout_seconds)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load(args, check_files=False)
    answers = space.ask(config, protocol.FACTORY_QUERY, args.names, timeout=args.timeout,
                        client_name="factories")  # fmt: skip
    names = args.names or space.members(config)
    rows = []
    for name in sorted(set(names)):
        reply = answers.replies.get(name, {}).get("")
        rows.append({"factory": name, "answered": reply is not None,
                     "signed": reply is not None and answers.verified(name),
                     "status": reply})  # fmt: skip
    if args.json:
        document = {"schema": SCHEMA, "space": config.factory.space, "generated": time.time(),
                    "seconds": round(answers.seconds, 3), "factories": rows}  # fmt: skip
        print(json.dumps(document))
        return 0
    lines = [("FACTORY", "LMS", "PROCESSORS", "LOAD", "STATE_DISK_KB", "MEM_KB", "SOFTWARE")]
    for row in rows:
        status = row["status"]
        if status is None:
            lines.append((row["factory"], "-", "-", "-", "-", "-", "no answer"))
            continue
        lines.append((
            row["factory"],
            f"{status['running_machines']}/{status['max_machines']}",
            f"{status['running_processors']}/{status['max_processors']}",
            f"{float(status['load_average']):.2f}",
            str(status["daemon_disk_avail_kb"]),
            f"{status['mem_used_kb']}/{status['mem_total_kb']}",
            str(status["daemon_version"]),
        ))  # fmt: skip
    shown = [tuple(one_line(cell) for cell in line) for line in lines]  # remote text
    widths = [max(len(line[i]) for line in shown) for i in range(len(shown[0]))]
    for line in shown:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )
    silent = sum(1 for row in rows if not row["answered"])
    print(f"{len(rows) - silent} of {len(rows)} factories answered in {answers.seconds:.1f} s",
          file=sys.stderr)  # fmt: skip
    return 0
