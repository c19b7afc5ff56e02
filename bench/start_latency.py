#!/usr/bin/env python3
"""Start latency: from the start decision to the payload's first instruction, vs the raw engine.

For ``--backend docker`` both sides run the same vcbusybox image, whose payload's first act is to
write the kernel's uptime clock into its joboutputs (``/proc/uptime``: CLOCK_BOOTTIME, shared by
host and containers, 10 ms resolution):
  - raw: the Docker SDK's ``containers.run(image, ..., detach=True)``, as lean as the API allows;
  - lmrunner: one factory pass (plan, prepare the LM directory, user_data, MJF, create and start
    the container with limits, labels and mounts), timed from the pass's start.
Runs alternate (raw, lmrunner, raw, ...) so noise hits both alike; medians of ``--repeat`` runs.
Target (issue 5): lmrunner within 10 % of raw. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from lmrunner.backends import make_backends
from lmrunner.config import load_config
from lmrunner.factory import Factory, Tuning
from lmrunner.state import Store

IMAGE = "vcbusybox:latest"
PAYLOAD = '#!/bin/sh\ncat /proc/uptime > "$JOBOUTPUTS/first"\n'


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def first_instruction(path: Path, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        if text.strip():
            return float(text.split()[0])
        time.sleep(0.005)
    raise TimeoutError(f"the payload never wrote {path}")


def raw_run(client: Any, folder: Path) -> float:
    out = folder / "raw"
    out.mkdir(parents=True)
    started = boottime()
    container = client.containers.run(
        IMAGE,
        ["sh", "-c", "cat /proc/uptime > /out/first"],
        volumes={str(out): {"bind": "/out", "mode": "rw"}},
        detach=True,
    )
    seen = first_instruction(out / "first")
    container.wait(timeout=60)
    container.remove(force=True)
    return seen - started


def lmrunner_run(factory: Factory) -> float:
    before = {r.uuid for r in factory.store.recent()}
    started = boottime()
    report = factory.run_pass()
    new = [r for r in factory.store.recent() if r.uuid not in before]
    assert len(new) == 1, (report, factory.store.recent(2))
    seen = first_instruction(new[0].directory / "joboutputs" / "first")
    factory.store.set_meta("draining", "1")  # let it finish without starting the next one
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # let it finish, so the next pass starts exactly one
        record = factory.store.get(new[0].uuid)
        if record is not None and not record.active:
            break
        with contextlib.suppress(queue.Empty):
            factory.events.put(factory.events.get(timeout=0.2))  # the pass handles it
        factory.run_pass()
    factory.store.set_meta("draining", None)
    return seen - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="docker", choices=["docker"])
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    import docker

    client = docker.from_env()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        user_data = folder / "user_data"
        user_data.write_text(PAYLOAD)
        config_file = folder / "lmrunner.yaml"
        config_file.write_text(
            yaml.safe_dump(
                {
                    "factory": {
                        "space": "bench.example.com",
                        "hostname": "bench.example.com",
                        "state_dir": str(folder / "state"),
                        "total_processors": 1,
                    },
                    "machinetypes": {
                        "bench": {
                            "backend": args.backend,
                            "image": f"docker://{IMAGE}",
                            "user_data": str(user_data),
                            "target_share": 1,
                            "fizzle_seconds": 0,
                        }
                    },
                }
            )
        )
        config = load_config(config_file, cpus=1)
        factory = Factory(
            config,
            Store(config.factory.state_dir),
            make_backends({args.backend}, config.factory),
            tuning=Tuning(reconcile_seconds=3600),
            load_average=lambda: (0.0, 0.0, 0.0),
        )
        factory.adopt()
        raw_run(client, folder / "warmup")  # the first container of a run pays for cold caches
        raw, ours = [], []
        for index in range(args.repeat):
            raw.append(raw_run(client, folder / f"raw{index}"))
            ours.append(lmrunner_run(factory))
            print(
                f"run {index}: raw {raw[-1] * 1000:.0f} ms, lmrunner {ours[-1] * 1000:.0f} ms",
                flush=True,
            )
        factory.close()
    result = {
        "benchmark": "start_latency",
        "backend": args.backend,
        "repeat": args.repeat,
        "raw_ms_median": statistics.median(raw) * 1000,
        "lmrunner_ms_median": statistics.median(ours) * 1000,
        "ratio": statistics.median(ours) / statistics.median(raw),
        "raw_ms": [round(x * 1000, 1) for x in raw],
        "lmrunner_ms": [round(x * 1000, 1) for x in ours],
    }
    print(json.dumps(result))
    sys.exit(0)


if __name__ == "__main__":
    main()
