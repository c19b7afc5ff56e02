"""``lmrunner stop|kill|drain|undrain|logs``: act on LMs and the factory."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lmrunner import untrusted
from lmrunner.cli.common import common_options, daemon_pid, open_store
from lmrunner.errors import LmrunnerError
from lmrunner.lmdisks import outputs_root
from lmrunner.state import LmRecord, Store


def add_parser(sub: Any) -> None:
    for action, text in (
        ("stop", "stop an LM gracefully (then kill after its grace period)"),
        ("kill", "kill an LM at once"),
    ):
        parser: argparse.ArgumentParser = sub.add_parser(
            action, parents=[common_options()], help=text
        )
        parser.add_argument("name", help="the LM's name (see lmrunner ps)")
        if action == "stop":
            parser.add_argument(
                "--grace",
                type=float,
                default=None,
                metavar="SECONDS",
                help="grace period (default: the machinetype's stop_grace_seconds)",
            )
        parser.set_defaults(run=run_stop, action=action)
    for action, text in (
        ("drain", "start no new LMs (running ones continue)"),
        ("undrain", "start LMs again after drain"),
    ):
        parser = sub.add_parser(action, parents=[common_options()], help=text)
        parser.set_defaults(run=run_drain, action=action)
    parser = sub.add_parser("logs", parents=[common_options()], help="show the logs an LM left")
    parser.add_argument("name", help="the LM's name (see lmrunner ps)")
    parser.set_defaults(run=run_logs)


def find(store: Store, name: str) -> LmRecord:
    record = store.by_name(name)
    if record is None:
        names = sorted({r.name for r in store.active()})
        raise LmrunnerError(f"no LM named {name!r} (active: {', '.join(names) or 'none'})")
    return record


def run_stop(args: argparse.Namespace) -> int:
    store = open_store(args, readonly=False)
    try:
        record = find(store, args.name)
        if not record.active:
            raise LmrunnerError(f"{record.name} is not active ({record.state.value})")
        store.add_request(record.uuid, args.action, getattr(args, "grace", None))
        if daemon_pid(store) is None:
            print(
                f"lmrunner: {args.action} of {record.name} queued; no daemon runs on "
                f"{store.path.parent}, it acts when started",
                file=sys.stderr,
            )
        else:
            print(f"{args.action} requested for {record.name}")
    finally:
        store.close()
    return 0


def run_drain(args: argparse.Namespace) -> int:
    store = open_store(args, readonly=False)
    try:
        store.set_meta("draining", "1" if args.action == "drain" else None)
    finally:
        store.close()
    print("draining: no new LMs" if args.action == "drain" else "not draining")
    return 0


def run_logs(args: argparse.Namespace) -> int:
    store = open_store(args)
    try:
        record = find(store, args.name)
    finally:
        store.close()
    shown = 0
    # The engine's logs (the LM directory's own) first, then what the payload left; all of it
    # written by the payload, so read without following links and only so much of each.
    logs = [(record.directory, n) for n in untrusted.names(record.directory) if n.endswith(".log")]
    root = outputs_root(record.directory)  # on the LM's own filesystem while it is mounted
    outputs = [(root, f"joboutputs/{n}") for n in untrusted.names(root, "joboutputs")]
    for where, name in [*logs, *outputs]:
        path = where / name
        try:
            got = untrusted.read(where, name, untrusted.LOG_LIMIT, tail=True)
        except (untrusted.UntrustedFileError, OSError) as err:
            print(f"==> {path} <==\n(not shown: {err})")
            continue
        if got is None:
            continue  # gone meanwhile
        print(f"==> {path} <==")
        if got.truncated:
            print(f"… truncated: its last {untrusted.LOG_LIMIT // 1024} KiB")
        sys.stdout.write(got.text())
        shown += 1
    if shown == 0:
        print(f"lmrunner: {record.name} left no logs in {record.directory}", file=sys.stderr)
    return 0
