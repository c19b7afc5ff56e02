"""The ``lmrunner`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lmrunner import __version__

DESCRIPTION = (
    "lmrunner fills this host's processors with logical machines (Docker containers, "
    "Apptainer containers and QEMU virtual machines) for vacuum-model sites."
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="lmrunner", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"lmrunner {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lmrunner`` console script."""
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
