#!/usr/bin/env python3
"""Core benchmark: the factory's pass, ``lmrunner ps`` and the daemon's memory at N LMs.

Uses the fake backend, so only lmrunner's own costs are measured. For each N (default 100, 1000,
5000) it fills a fresh state directory with N running fake LMs, then measures (median of
``--repeat`` runs):
  - ``pass_ms``: one ``Factory.run_pass()`` with every LM active (no start possible: the factory
    is full), including a full reconcile (every LM inspected) every time;
  - ``ps_ms`` / ``ps_json_ms``: wall time of ``lmrunner ps`` / ``ps --json`` as a new process;
  - ``rss_mib``: the resident memory of that in-process factory after the passes.
The package's bytecode is compiled first, as ``pip install`` does (a development tree run with
PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module on each ``ps``: +50-70 ms).
Targets (issue 4): ps under 150 ms and a pass under 100 ms at 1000 LMs, cost growing linearly.
The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import compileall
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from lmrunner.backends.base import Handle
from lmrunner.backends.fake import FakeBackend
from lmrunner.factory import Factory, Tuning
from lmrunner.lifecycle import LmState
from lmrunner.loader import load_config
from lmrunner.model import Limits
from lmrunner.state import LmRecord, Store

CONFIG = """\
factory:
  space: bench.example.com
  hostname: bench.example.com
  state_dir: {state}
machinetypes:
  a: {{backend: fake, image: "fake:seconds=86000", target_share: 1}}
  b: {{backend: fake, image: "fake:seconds=86000", target_share: 2}}
"""


def fill(state: Path, count: int) -> None:
    """N running fake LMs: records in the store and entries in the fake engine."""
    store = Store(state)
    engine = state / "fake-engine"
    engine.mkdir(parents=True)
    now = time.time()
    limits = Limits(
        processors=1, memory_bytes=2 << 30, swap_bytes=0, disk_bytes=40 * 10**9, hs06=None
    )
    records = []
    if True:
        for slot in range(count):
            uuid = f"00000000-0000-4000-8000-{slot:012d}"
            name = f"bench-{slot:02d}.example.com"
            record = LmRecord(
                uuid=uuid, name=name, machinetype="ab"[slot % 2], backend="fake", slot=slot,
                processors=1, limits=limits, hs06=1.0, shutdown_time=int(now) + 86400,
                directory=state / "machines" / name, created=now, state=LmState.RUNNING,
                started=now, handle=Handle(1, {"uuid": uuid}),
            )  # fmt: skip
            records.append(record)
            script = {"seconds": 86000.0, "message": None, "exit": 0, "oom": False,
                      "ignore_term": False, "term_seconds": 0.2, "fail_start": False}  # fmt: skip
            entry = {"uuid": uuid, "name": name, "labels": {}, "started": now, "script": script,
                     "joboutputs": str(state / "machines" / name / "joboutputs"),
                     "stop_at": None, "killed_at": None}  # fmt: skip
            (engine / f"{uuid}.json").write_text(json.dumps(entry))
    store.insert_many(records)
    store.close()


def timed(argv: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def measure(count: int, repeat: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        config_file = Path(tmp) / "lmrunner.yaml"
        config_file.write_text(CONFIG.format(state=state))
        config = load_config(config_file, cpus=1)
        config = replace(config, factory=replace(config.factory, total_processors=count))
        fill(state, count)
        store = Store(state)
        backend = FakeBackend(state / "fake-engine")
        factory = Factory(config, store, {"fake": backend}, tuning=Tuning(reconcile_seconds=3600),
                          load_average=lambda: (0.0, 0.0, 0.0))  # fmt: skip
        passes = []
        for _ in range(repeat):
            started = time.perf_counter()
            report = factory.run_pass()
            passes.append(time.perf_counter() - started)
            assert not report.started and not report.finished, report
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        store.close()
        base = [sys.executable, "-m", "lmrunner", "ps", "--state-dir", str(state)]
        return {
            "pass_ms": statistics.median(passes) * 1000,
            "ps_ms": timed(base, repeat),
            "ps_json_ms": timed([*base, "--json"], repeat),
            "rss_mib": rss,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import lmrunner.backends
    import lmrunner.cgroups

    for package in (lmrunner, lmrunner.backends, lmrunner.cgroups):  # three source folders
        for folder in package.__path__:
            compileall.compile_dir(folder, quiet=1)
    results = {}
    for count in args.counts:
        results[str(count)] = measure(count, args.repeat)
        figures = ", ".join(f"{k} {v:.1f}" for k, v in results[str(count)].items())
        print(f"{count} LMs: {figures}", flush=True)
    print(json.dumps({"benchmark": "core", "repeat": args.repeat, "results": results}))


if __name__ == "__main__":
    main()
