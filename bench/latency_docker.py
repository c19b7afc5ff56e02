"""Docker side of ``bench/start_latency.py``: the vcbusybox image through the raw Docker SDK."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from latency_common import UPTIME_PAYLOAD, boottime, uptime_in_file

IMAGE = "vcbusybox:latest"
PAYLOAD = UPTIME_PAYLOAD
first_seen = uptime_in_file


@functools.cache
def _client() -> Any:
    import docker

    return docker.from_env()


def machinetype(folder: Path, user_data: Path) -> dict[str, Any]:
    return {"backend": "docker", "image": f"docker://{IMAGE}", "user_data": str(user_data)}


def raw_run(folder: Path) -> float:
    """``containers.run(image, ..., detach=True)``, as lean as the API allows."""
    out = folder / "raw"
    out.mkdir(parents=True)
    started = boottime()
    container = _client().containers.run(
        IMAGE,
        ["sh", "-c", "cat /proc/uptime > /out/first"],
        volumes={str(out): {"bind": "/out", "mode": "rw"}},
        detach=True,
    )
    seen = uptime_in_file(out / "first")
    container.wait(timeout=60)
    container.remove(force=True)
    return seen - started
