"""``lmrunner images``: the download cache of remote images, and which machinetypes use each."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from lmrunner.cli.common import common_options, load
from lmrunner.images import DownloadSettings, ImageCache, is_remote, size_text

SCHEMA = "lmrunner.images/1"


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "images",
        parents=[common_options()],
        help="list downloaded images (https:// root_image), their state and their machinetypes",
        description="Every remote image the configuration names or the cache holds: its state "
        "(ready, downloading, failed: why), size, sha256, when it was fetched and which "
        "machinetypes use it. --fetch downloads the configured ones now and waits.",
    )
    parser.add_argument("--json", action="store_true", help=f"print JSON (schema {SCHEMA})")
    parser.add_argument(
        "--fetch",
        action="store_true",
        help="download (or revalidate) every configured remote image now, waiting for each",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load(args, check_files=False)
    cache = ImageCache(config.factory.state_dir / "images", DownloadSettings.of(config.factory))
    users: dict[str, list[str]] = {}
    digests: dict[str, str | None] = {}
    for name, mt in sorted(config.machinetypes.items()):
        if is_remote(mt.image):
            users.setdefault(mt.image, []).append(name)
            digests[mt.image] = mt.image_digest
    failed = 0
    try:
        if args.fetch:
            for url in sorted(users):
                state = cache.wait(url, config.factory.download_timeout_seconds * 10, digests[url])
                failed += state.path is None
        rows = {row["url"]: row for row in cache.entries()}
    finally:
        cache.close()
    for url in users:
        rows.setdefault(url, {"url": url, "status": "not downloaded", "detail": ""})
    out = [{**rows[url], "machinetypes": users.get(url, [])} for url in sorted(rows)]
    if args.json:
        print(json.dumps({"schema": SCHEMA, "images": out}, indent=1))
        return 1 if failed else 0
    if not out:
        print("no remote images")
    now = time.time()
    for row in out:
        size = size_text(row["size"]) if row.get("size") is not None else "-"
        fetched = row.get("fetched")
        age = "-" if fetched is None else f"fetched {_ago(now - fetched)} ago"
        used = ", ".join(row["machinetypes"]) or "no machinetype (pruned when unused)"
        print(f"{row['url']}\n  {row['status']}, {size}, {age}; used by {used}")
        if row.get("detail"):
            print(f"  {row['detail']}")
    return 1 if failed else 0


def _ago(seconds: float) -> str:
    for unit, scale in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= scale:
            return f"{seconds / scale:.0f} {unit}"
    return f"{seconds:.0f} s"
