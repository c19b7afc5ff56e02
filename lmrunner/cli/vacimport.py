"""``lmrunner import-vac-conf``: convert a Vac site's INI configuration to lmrunner YAML."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lmrunner.vacconf import convert_vac_conf, default_vac_files


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "import-vac-conf",
        help="convert Vac's vac.conf (and vac.d) to lmrunner YAML on stdout",
        description="Convert Vac's INI configuration, deprecated names and [vacuum_pipe] "
        "sections included, to lmrunner YAML on stdout. Every option that cannot be carried "
        "over is listed on stderr with the reason, and so is every one carried over with a "
        "difference (an option lmrunner does not act on, Vac's disk size 0, an http:// URL). "
        "The output passes `lmrunner check`.",
    )
    parser.add_argument(
        "files",
        nargs="*",
        type=Path,
        help="Vac files in reading order (default: /etc/vac.d/*.conf, /etc/vac.conf, "
        "/var/run/vac.conf)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    files = list(args.files) or default_vac_files()
    if not files:
        print(
            "lmrunner: no Vac configuration found (/etc/vac.conf, /etc/vac.d/*.conf)",
            file=sys.stderr,
        )
        return 1
    result = convert_vac_conf(files)
    sys.stdout.write(result.yaml_text)
    for line in result.dropped:
        print(f"lmrunner: not carried over: {line}", file=sys.stderr)
    for line in result.warnings:
        print(f"lmrunner: warning: {line}", file=sys.stderr)
    return 0
