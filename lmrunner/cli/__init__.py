"""The ``lmrunner`` command line: one module per subcommand (``add_parser`` and ``run``).

A subcommand's module is imported only when that subcommand runs, so quick commands such as
``lmrunner ps`` do not pay for the imports of others (requests, YAML, the Docker SDK).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lmrunner import __version__
from lmrunner.cli.common import GLOBAL_OPTIONS, common_options, global_defaults
from lmrunner.errors import ConfigError, LmrunnerError

DESCRIPTION = (
    "lmrunner fills this host's processors with logical machines (Docker containers, "
    "Apptainer containers and QEMU virtual machines) for vacuum-model sites."
)
#: command -> (module that defines it, one-line help for the listing)
COMMANDS: dict[str, tuple[str, str]] = {
    "daemon": ("daemon", "run the factory in the foreground"),
    "ps": ("ps", "list logical machines (running ones; --all for finished too)"),
    "machinetypes": ("machinetypes", "each machinetype's share, running LMs, backoff, outcome"),
    "factories": ("factories", "ask every factory of the space how it is (VacQuery)"),
    "health": ("health", "Nagios/NRPE check of this factory (exit 0/1/2/3, like check-vacd)"),
    "stop": ("control", "stop an LM gracefully (then kill after its grace period)"),
    "kill": ("control", "kill an LM at once"),
    "drain": ("control", "start no new LMs (running ones continue)"),
    "undrain": ("control", "start LMs again after drain"),
    "logs": ("control", "show the logs an LM left"),
    "accounting": (
        "accounting",
        "totals of finished LMs per machinetype and VO (wall, CPU, HS06 hours, flags)",
    ),
    "apel-sync": ("apelsync", "write APEL sync messages (job counts per month) into apel-outgoing"),
    "check": ("check", "validate the configuration and print the effective configuration"),
    "images": ("images", "list downloaded images (https:// root_image) and their state"),
    "user-data": ("userdata", "print the templated user_data an LM of a machinetype would get now"),
    "import-vac-conf": ("vacimport", "convert Vac's vac.conf (and vac.d) to lmrunner YAML"),
    "config-reference": ("reference", "print the configuration reference (Markdown)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(
        prog="lmrunner", description=DESCRIPTION, parents=[common_options()]
    )
    parser.add_argument("--version", action="version", version=f"lmrunner {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    loaded: set[str] = set()
    for name, (module, text) in COMMANDS.items():
        if module in loaded:
            continue
        if command is None or COMMANDS.get(command, ("",))[0] == module:
            importlib.import_module(f"lmrunner.cli.{module}").add_parser(sub)
            loaded.add(module)
        else:
            sub.add_parser(name, help=text)  # listed in --help; its module is not needed now
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lmrunner`` console script; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = _command(args_list)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(args_list)
    global_defaults(args)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        status: int = args.run(args)
    except ConfigError as err:
        for line in err.errors:
            print(f"lmrunner: {_printable(line)}", file=sys.stderr)
        return 1
    except LmrunnerError as err:
        print(f"lmrunner: {_printable(str(err))}", file=sys.stderr)
        return 1
    return status


def _command(args: Sequence[str]) -> str | None:
    """The subcommand's name: the first word that is neither an option nor a global option's
    value (``lmrunner --config X ps`` runs ``ps``)."""
    words = iter(args)
    for word in words:
        if word in GLOBAL_OPTIONS:
            next(words, None)  # its value
        elif not word.startswith("-"):
            return word
    return None


def _printable(text: str) -> str:
    """One line for stderr, whatever the names and values it quotes hold."""
    from lmrunner.yamlsrc import one_line  # imports YAML: only when something failed

    return one_line(text)
