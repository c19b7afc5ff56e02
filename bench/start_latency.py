#!/usr/bin/env python3
"""Start latency: from the start decision to the payload's first instruction, vs the raw engine.

Both sides run the same artefacts (the vcbusybox image, SIF/sandbox or VM kernel + initramfs);
the payload's first act writes ``$JOBOUTPUTS/first``. Per backend, ``bench/latency_<name>.py``
says how the raw engine is driven (see ``latency_common.py``):
  - raw: the bare engine (Docker SDK ``containers.run``, ``apptainer exec``, bare QEMU);
  - lmrunner: one factory pass (plan, prepare the LM directory, user_data, MJF, cgroup with limits,
    start through the backend), timed from the pass's start.
Runs alternate (raw, lmrunner, lmrunner with a disk, raw, ...) so noise hits all alike; medians
of ``--repeat`` runs, after one uncounted run of each side. "lmrunner with a disk" is the same
factory with the LM's own filesystem (``disk_method: loop``, made and mounted in the pass):
``disk_added_ms`` is what that costs a start (target: under 50 ms). A backend may name more raw
commands (``EXTRA_RAW``), timed in the same alternation and reported as ``ratio_vs_<name>``.
Targets: docker and vm within 10 % of raw, apptainer within 20 ms. The last line of stdout is
one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import queue
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lmrunner.backends import make_backends
from lmrunner.factory import Factory, Tuning
from lmrunner.layout import outputs_root
from lmrunner.lmcgroups import host_cgroups
from lmrunner.lmdisks import host_disks
from lmrunner.loader import load_config
from lmrunner.state import Store

BACKENDS = ("docker", "apptainer", "vm")


def lmrunner_run(factory: Factory, first_seen: Callable[[Path], float]) -> float:
    from latency_common import boottime

    before = {r.uuid for r in factory.store.recent()}
    started = boottime()
    report = factory.run_pass()
    new = [r for r in factory.store.recent() if r.uuid not in before]
    assert len(new) == 1, (report, factory.store.recent(2))
    seen = first_seen(outputs_root(new[0].directory) / "joboutputs" / "first")
    factory.store.set_meta("draining", "1")  # let it finish without starting the next one
    deadline = time.monotonic() + 300
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
    parser.add_argument("--backend", default="docker", choices=BACKENDS)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    engine = importlib.import_module(f"latency_{args.backend}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        folder.chmod(0o755)  # as a real state directory: LM accounts reach their LM's folder
        user_data = folder / "user_data"
        user_data.write_text(engine.PAYLOAD)
        user_data.chmod(0o755)
        machinetype = {
            **engine.machinetype(folder, user_data),
            "target_share": 1,
            "fizzle_seconds": 0,
        }
        factories = {}
        for side, method in (("lmrunner", "none"), ("disk", "loop")):
            config_file = folder / f"lmrunner-{side}.yaml"
            config_file.write_text(
                yaml.safe_dump(
                    {
                        "factory": {
                            "space": "bench.example.com",
                            "hostname": "bench.example.com",
                            "state_dir": str(folder / f"state-{side}"),
                            "total_processors": 1,
                            "disk_gb_per_processor": 10,
                            "disk_method": method,
                        },
                        "machinetypes": {"bench": machinetype},
                    }
                )
            )
            config = load_config(config_file, cpus=1)
            cgroups = host_cgroups(config.factory)
            factories[side] = Factory(
                config,
                Store(config.factory.state_dir),
                make_backends({args.backend}, config.factory, cgroups),
                cgroups=cgroups,
                tuning=Tuning(reconcile_seconds=3600),
                load_average=lambda: (0.0, 0.0, 0.0),
                disks=host_disks(config.factory),
            )
            factories[side].adopt()
        factory, with_disk = factories["lmrunner"], factories["disk"]
        assert with_disk.lm_disks.method is not None, "no loop devices here"
        # The first run of each side pays for cold caches (and lmrunner's one-time work, such as
        # unpacking a VM kernel): reported, not counted.
        extras: dict[str, Callable[[Path], float]] = getattr(engine, "EXTRA_RAW", {})
        first = {
            "raw": engine.raw_run(folder / "warmup"),
            "lmrunner": lmrunner_run(factory, engine.first_seen),
            "disk": lmrunner_run(with_disk, engine.first_seen),
            **{name: run(folder / f"{name}-warmup") for name, run in extras.items()},
        }
        raw, ours, disk = [], [], []
        more: dict[str, list[float]] = {name: [] for name in extras}
        for index in range(args.repeat):
            raw.append(engine.raw_run(folder / f"raw{index}"))
            ours.append(lmrunner_run(factory, engine.first_seen))
            disk.append(lmrunner_run(with_disk, engine.first_seen))
            line = (
                f"run {index}: raw {raw[-1] * 1000:.0f} ms, lmrunner {ours[-1] * 1000:.0f} ms, "
                f"with a disk {disk[-1] * 1000:.0f} ms"
            )
            for name, run in extras.items():
                more[name].append(run(folder / f"{name}{index}"))
                line += f", {name} {more[name][-1] * 1000:.0f} ms"
            print(line, flush=True)
        factory.close()
        with_disk.close()
    result = {
        "benchmark": "start_latency",
        "backend": args.backend,
        "repeat": args.repeat,
        "raw_ms_median": statistics.median(raw) * 1000,
        "lmrunner_ms_median": statistics.median(ours) * 1000,
        "difference_ms": (statistics.median(ours) - statistics.median(raw)) * 1000,
        "ratio": statistics.median(ours) / statistics.median(raw),
        "raw_ms": [round(x * 1000, 1) for x in raw],
        "lmrunner_ms": [round(x * 1000, 1) for x in ours],
        "disk_ms_median": statistics.median(disk) * 1000,
        "disk_added_ms": (statistics.median(disk) - statistics.median(ours)) * 1000,
        "disk_ratio": statistics.median(disk) / statistics.median(raw),
        "disk_ms": [round(x * 1000, 1) for x in disk],
        "first_run_ms": {side: round(value * 1000, 1) for side, value in first.items()},
    }
    for name, values in more.items():  # other raw commands (latency_<backend>.EXTRA_RAW)
        result[f"{name}_ms_median"] = statistics.median(values) * 1000
        result[f"ratio_vs_{name}"] = statistics.median(ours) / statistics.median(values)
        result[f"{name}_ms"] = [round(x * 1000, 1) for x in values]
    print(json.dumps(result))
    sys.exit(0)


if __name__ == "__main__":
    main()
