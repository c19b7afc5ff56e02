"""``lmrunner user-data MACHINETYPE``: the user_data an LM of that type would get right now."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from lmrunner.backends import PLACEMENTS
from lmrunner.cli.common import common_options, load
from lmrunner.payload import (
    lm_name,
    make_proxy,
    new_identity,
    read_template,
    render_user_data,
    template_values,
)


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "user-data",
        parents=[common_options()],
        help="print the templated user_data an LM of a machinetype would get now",
        description="Render the machinetype's user_data template exactly as a new LM of that "
        "type would get it now (with a preview LM name and uuid), without starting anything. "
        "Secrets (proxies, file contents, options named like passwords or keys) are masked.",
    )
    parser.add_argument("machinetype", help="name of the machinetype")
    parser.add_argument(
        "--show-secrets", action="store_true", help="show secrets (and make the x509 proxy)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load(args)
    mt = config.machinetypes.get(args.machinetype)
    if mt is None:
        known = ", ".join(config.machinetypes) or "none"
        print(
            f"lmrunner: no machinetype {args.machinetype!r} (configured: {known})", file=sys.stderr
        )
        return 1
    lm = new_identity(lm_name(config.factory.hostname, 0), mt.name)
    shutdown = int(time.time()) + mt.max_wallclock_seconds
    proxy = make_proxy(config, mt, shutdown) if args.show_secrets else None
    if mt.user_data_proxy and proxy is None:
        proxy = "(x509 proxy)"  # a stand-in: making a proxy needs the key, so only when shown
    template, url = read_template(config, mt)
    values = template_values(
        config, mt, lm, PLACEMENTS[mt.backend.value], user_data_url=url, proxy_pem=proxy
    )
    shown = values.values if args.show_secrets else values.masked()
    sys.stdout.write(render_user_data(template, shown))
    return 0
