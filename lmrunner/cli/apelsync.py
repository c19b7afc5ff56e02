"""``lmrunner apel-sync [YYYYMM ...]``: write APEL sync messages for ssmsend (Vac's apel-sync)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from lmrunner import apel
from lmrunner.cli.common import common_options, load
from lmrunner.errors import LmrunnerError


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "apel-sync",
        parents=[common_options()],
        help="write APEL sync messages (job counts per month) into apel-outgoing",
        description="For each month, count the job messages in <state_dir>/apel-archive and "
        "write an APEL sync message into <state_dir>/apel-outgoing for ssmsend. Needs "
        "factory.gocdb_sitename. Default month: the one containing now minus 24 hours.",
    )
    parser.add_argument("months", nargs="*", metavar="YYYYMM", help="months to sync")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    now = time.time()
    months = [apel.parse_month(text, now=now) for text in args.months]  # before any file
    config = load(args, check_files=False)
    try:
        paths = apel.write_sync(config.factory, months, now=now)
    except OSError as err:
        raise LmrunnerError(f"cannot write an APEL sync message: {err}") from err
    for path in paths:
        print(path)
    return 0
