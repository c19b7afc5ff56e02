"""The ``lmrunner`` command line: one module per subcommand (``add_parser`` and ``run``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lmrunner import __version__
from lmrunner.cli import check, control, daemon, ps, reference, userdata, vacimport
from lmrunner.errors import ConfigError, LmrunnerError

DESCRIPTION = (
    "lmrunner fills this host's processors with logical machines (Docker containers, "
    "Apptainer containers and QEMU virtual machines) for vacuum-model sites."
)
SUBCOMMANDS = (daemon, ps, control, check, userdata, vacimport, reference)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="lmrunner", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"lmrunner {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lmrunner`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        status: int = args.run(args)
    except ConfigError as err:
        for line in err.errors:
            print(f"lmrunner: {line}", file=sys.stderr)
        return 1
    except LmrunnerError as err:
        print(f"lmrunner: {err}", file=sys.stderr)
        return 1
    return status
