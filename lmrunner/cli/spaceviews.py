"""``lmrunner ps --space`` and ``lmrunner machinetypes --space``: the LMs and machinetypes of
every factory of the space, as they answer VacQuery (Vac's ``vac machines`` and ``vac
machinetypes``), Vac factories included.

One round, bounded by ``udp_timeout_seconds`` (``--timeout``); factories that did not answer
are listed as such, so a partial view never passes for a whole one. In a space with a secret,
replies that came unsigned (Vac's) are marked ``"signed": false``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from lmrunner.cli.common import load
from lmrunner.cli.ps import duration
from lmrunner.vacquery import client, protocol, space
from lmrunner.yamlsrc import one_line

PS_SCHEMA = "lmrunner.ps.space/1"
MACHINETYPES_SCHEMA = "lmrunner.machinetypes.space/1"
EMPTY = "Shut down"


def _factories(answers: client.Answers, names: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "factory": name,
            "answered": bool(answers.replies.get(name)),
            "signed": bool(answers.replies.get(name)) and answers.verified(name),
        }
        for name in names
    ]


def _document(
    schema: str, config_space: str, answers: client.Answers, names: list[str]
) -> dict[str, Any]:
    return {
        "schema": schema,
        "space": config_space,
        "generated": time.time(),
        "seconds": round(answers.seconds, 3),
        "factories": _factories(answers, names),
    }


def _print_table(lines: list[tuple[str, ...]]) -> None:
    # Every cell came over the network (a payload's shutdown_message, a Vac factory's names):
    # escape what a terminal would act on.
    lines = [tuple(one_line(cell) for cell in line) for line in lines]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def _footer(answers: client.Answers, names: list[str]) -> str:
    silent = [name for name in names if not answers.replies.get(name)]
    text = f"{len(names) - len(silent)} of {len(names)} factories answered"
    if silent:
        text += f" (no answer: {one_line(', '.join(silent))})"
    return f"{text} in {answers.seconds:.1f} s"


def ps(args: argparse.Namespace) -> int:
    """Every LM of the space; with ``--all`` empty and shut-down slots too."""
    config = load(args, check_files=False)
    names = space.members(config)
    answers = space.ask(config, protocol.MACHINES_QUERY, names, timeout=args.timeout,
                        client_name="ps")  # fmt: skip
    lms = []
    for name in names:
        for reply in sorted(answers.replies.get(name, {}).values(), key=lambda r: r["machine"]):
            if reply["state"] == EMPTY and not args.all:
                continue
            lms.append(_lm(name, reply))
    if args.quiet:
        print("".join(f"{lm['name']}\n" for lm in lms), end="")
        return 0
    if args.json:
        document = _document(PS_SCHEMA, config.factory.space, answers, names)
        document["lms"] = lms
        print(json.dumps(document))
        return 0
    lines: list[tuple[str, ...]] = [
        ("FACTORY", "NAME", "MACHINETYPE", "MODEL", "STATE", "PROCS", "UPTIME", "CPU%", "HS06",
         "SHUTDOWN MESSAGE"),
    ]  # fmt: skip
    now = time.time()
    for lm in lms:
        started = lm["started"]
        lines.append((
            lm["factory"], lm["name"], lm["machinetype"] or "-", lm["machine_model"] or "-",
            lm["state"], f"{lm['processors']:g}",
            "-" if started is None else duration(now - started),
            f"{lm['cpu_percentage']:.1f}", f"{lm['hs06']:g}",
            (lm["shutdown_message"] or "-")[:40],
        ))  # fmt: skip
    _print_table(lines)
    running = [lm for lm in lms if lm["state"] != EMPTY]
    print(f"{len(running)} LMs using {sum(lm['processors'] for lm in running):g} processors; "
          + _footer(answers, names))  # fmt: skip
    return 0


def _lm(factory: str, reply: dict[str, Any]) -> dict[str, Any]:
    """One slot of a ``machine_status`` reply, in ``ps --json``'s names where they match."""
    return {
        "factory": factory,
        "name": reply["machine"],
        "uuid": reply["uuid"],
        "machinetype": reply["machinetype"],
        "machine_model": reply["machine_model"],
        "state": reply["state"],
        "processors": reply["num_processors"],
        "created": reply["created_time"],
        "started": reply["started_time"],
        "heartbeat": reply["heartbeat_time"],
        "cpu_seconds": reply["cpu_seconds"],
        "cpu_percentage": reply["cpu_percentage"],
        "hs06": reply["hs06"],
        "shutdown_message": reply["shutdown_message"],
        "shutdown_time": reply["shutdown_time"],
        "software": reply["daemon_version"],
    }


def machinetypes(args: argparse.Namespace) -> int:
    """Each machinetype over the space: what runs of it where, and its latest end anywhere."""
    config = load(args, check_files=False)
    names = space.members(config)
    answers = space.ask(config, protocol.MACHINETYPES_QUERY, names, timeout=args.timeout,
                        client_name="machinetypes")  # fmt: skip
    types: dict[str, dict[str, Any]] = {}
    for name in names:
        for reply in answers.replies.get(name, {}).values():
            row = types.setdefault(reply["machinetype"], {
                "machinetype": reply["machinetype"], "running_lms": 0, "running_processors": 0,
                "running_hs06": 0.0, "num_before_fizzle": 0, "factories": [],
                "last_shutdown_message": None, "last_shutdown_time": None,
                "last_shutdown_machine": None, "last_abort": None,
            })  # fmt: skip
            row["running_lms"] += reply["running_machines"]
            row["running_processors"] += reply["running_processors"]
            row["running_hs06"] += reply["running_hs06"]
            row["num_before_fizzle"] += reply["num_before_fizzle"]
            row["factories"].append({
                "factory": name, "running_lms": reply["running_machines"],
                "running_processors": reply["running_processors"],
                "shutdown_message": reply["shutdown_message"],
                "shutdown_time": reply["shutdown_time"],
            })  # fmt: skip
            when = reply["shutdown_time"]
            if when is not None and (row["last_shutdown_time"] is None
                                     or when > row["last_shutdown_time"]):  # fmt: skip
                row["last_shutdown_message"] = reply["shutdown_message"]
                row["last_shutdown_time"] = when
                row["last_shutdown_machine"] = reply["shutdown_machine"]
            code = space.abort_code(reply["shutdown_message"])
            last = row["last_abort"]
            if code is not None and when is not None and (last is None or when > last["time"]):
                row["last_abort"] = {"code": code, "message": reply["shutdown_message"],
                                     "time": when, "factory": name}  # fmt: skip
    rows = [types[key] for key in sorted(types)]
    if args.json:
        document = _document(MACHINETYPES_SCHEMA, config.factory.space, answers, names)
        document["machinetypes"] = rows
        print(json.dumps(document))
        return 0
    lines: list[tuple[str, ...]] = [
        ("MACHINETYPE", "FACTORIES", "LMS", "PROCS", "HS06", "LAST ABORT"),
    ]
    now = time.time()
    for row in rows:
        abort = row["last_abort"]
        shown = "-"
        if abort is not None:
            shown = (f"{abort['message'][:30]} on {abort['factory']} "
                     f"{duration(now - abort['time'])} ago")  # fmt: skip
        lines.append((
            row["machinetype"], str(len(row["factories"])), str(row["running_lms"]),
            f"{row['running_processors']:g}", f"{row['running_hs06']:g}", shown,
        ))  # fmt: skip
    _print_table(lines)
    print(_footer(answers, names))
    return 0
