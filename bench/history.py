#!/usr/bin/env python3
"""History and operations benchmark: a store with a long past, metrics and the status page.

Figures (medians of ``--repeat``):
  - ``machinetypes_ms`` / ``ps_ms``: wall time of ``lmrunner machinetypes`` / ``lmrunner ps``
    as new processes, on a store holding ``--finished`` ended LMs (default 500 000, half a year
    of a busy host) and ``--running`` running ones; target (issue 18): machinetypes < 150 ms;
  - ``db_bytes`` before and after pruning to ``history_days`` 30 (and ``prune_s``, the time the
    pruner took, ``prune_batches``): the store stops growing;
  - ``page_ms``: rendering the status page at ``--running`` LMs (default 1000; target < 100 ms);
  - ``scrape_ms``, ``scrape_cpu_ms``: one /metrics scrape over HTTP at those LMs, wall and the
    daemon process's CPU; ``pass_ms`` and ``pass_ms_metrics``: a factory pass without and with
    the metrics observer (target: within 5 %), alternated.
The fake backend is used: only lmrunner's own costs are measured. The last line of stdout is
one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import requests
from core import CONFIG, fill, timed

from lmrunner.backends.fake import FakeBackend
from lmrunner.factory import Factory, Tuning
from lmrunner.loader import load_config
from lmrunner.metrics import Metrics, Sources
from lmrunner.prune import Pruner
from lmrunner.serve import Endpoint
from lmrunner.state import Store
from lmrunner.statuspage import StatusPage

DAY = 86400.0


def add_history(state: Path, finished: int, now: float) -> None:
    """``finished`` ended LMs over the last 180 days, cleaned and accounted, copied in SQL from
    one running LM's row (the fastest way to a big store; every column is a real one)."""
    db = sqlite3.connect(state / "lmrunner.db")
    columns = [row[1] for row in db.execute("PRAGMA table_info(lms)")]
    changed = {
        "uuid": "printf('f%07d-0000-4000-8000-000000000000', n)",
        "name": "printf('old-%07d.example.com', n)",
        "machinetype": "CASE n % 2 WHEN 0 THEN 'a' ELSE 'b' END",
        "slot": "n % 64",
        "created": f"{now - 180 * DAY} + n * {180 * DAY / max(finished, 1)}",
        "started": f"{now - 180 * DAY} + n * {180 * DAY / max(finished, 1)} + 5",
        "finished": f"{now - 180 * DAY} + n * {180 * DAY / max(finished, 1)} + 3600",
        "state": "'finished'",
        "cleaned": "1",
        "handle": "NULL",
        "cgroup": "NULL",
        "disk": "NULL",
        "outcome": '\'{"code": 200, "text": "Intended work completed ok", "source": "payload"}\'',
        "cpu_seconds": "3000.0",
    }
    select = ", ".join(changed.get(c, c) for c in columns)
    template = db.execute("SELECT uuid FROM lms LIMIT 1").fetchone()[0]
    with db:
        db.execute(
            f"INSERT INTO lms ({', '.join(columns)}) "
            f"WITH RECURSIVE seq(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM seq WHERE n < ?) "
            f"SELECT {select} FROM seq, lms WHERE lms.uuid = ?",
            (finished - 1, template),
        )
        acc_columns = [row[1] for row in db.execute("PRAGMA table_info(accounting)")]
        values = {
            "uuid": "uuid", "name": "name", "machinetype": "machinetype", "backend": "backend",
            "fqan": "NULL", "vo": "NULL", "processors": "processors", "hs06": "hs06",
            "created": "created", "started": "started", "finished": "finished",
            "wall_seconds": "3595.0", "cpu_seconds": "cpu_seconds",
            "memory_peak_bytes": "NULL", "oom_kills": "0", "outcome_code": "200",
            "outcome_text": "'Intended work completed ok'", "outcome_source": "'payload'",
            "flags": "''", "memory_limit_bytes": "NULL", "apel_written": "1",
            "disk_peak_bytes": "NULL",
        }  # fmt: skip
        db.execute(
            f"INSERT INTO accounting ({', '.join(acc_columns)}) SELECT "
            f"{', '.join(values[c] for c in acc_columns)} FROM lms WHERE state = 'finished'"
        )
    db.close()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        config_file = Path(tmp) / "lmrunner.yaml"
        config_file.write_text(CONFIG.format(state=state))
        config = load_config(config_file, cpus=1)
        config = replace(config, factory=replace(config.factory,
                                                 total_processors=args.running))  # fmt: skip
        now = time.time()
        fill(state, args.running)
        started = time.perf_counter()
        add_history(state, args.finished, now)
        out["fill_s"] = time.perf_counter() - started
        out["db_bytes"] = (state / "lmrunner.db").stat().st_size
        base = ["--state-dir", str(state), "--config", str(config_file)]
        lmrunner = [sys.executable, "-m", "lmrunner"]
        out["machinetypes_ms"] = timed([*lmrunner, "machinetypes", *base], args.repeat)
        out["ps_ms"] = timed([*lmrunner, "ps", *base], args.repeat)

        store = Store(state)
        backend = FakeBackend(state / "fake-engine")
        metrics = Metrics(Sources(config=lambda: config, backends=lambda: ["fake"]))
        plain = Factory(config, store, {"fake": backend}, tuning=Tuning(reconcile_seconds=3600),
                        load_average=lambda: (0.0, 0.0, 0.0))  # fmt: skip
        watched = Factory(config, store, {"fake": backend}, observer=metrics,
                          tuning=Tuning(reconcile_seconds=3600),
                          load_average=lambda: (0.0, 0.0, 0.0))  # fmt: skip
        passes: dict[str, list[float]] = {"plain": [], "metrics": []}
        for _ in range(args.passes):  # alternated: a busy moment hits both
            for name, factory in (("plain", plain), ("metrics", watched)):
                began = time.perf_counter()
                factory.run_pass()
                if name == "metrics":
                    metrics.passed(time.perf_counter() - began, None)
                passes[name].append(time.perf_counter() - began)
        out["pass_ms"] = statistics.median(passes["plain"]) * 1000
        out["pass_ms_metrics"] = statistics.median(passes["metrics"]) * 1000
        out["pass_ratio"] = out["pass_ms_metrics"] / out["pass_ms"]

        page = StatusPage(lambda: config)
        renders = []
        for _ in range(args.repeat):
            began = time.perf_counter()
            body = page()
            renders.append(time.perf_counter() - began)
        out["page_ms"] = statistics.median(renders) * 1000
        out["page_bytes"] = len(body)

        endpoint = Endpoint("127.0.0.1:0", metrics).start()
        scrapes, cpu = [], []
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        for _ in range(args.repeat):
            began, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            response = requests.get(url, timeout=30)
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            scrapes.append(time.perf_counter() - began)
            cpu.append((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime))
            response.raise_for_status()
        endpoint.close()
        out["scrape_ms"] = statistics.median(scrapes) * 1000
        out["scrape_cpu_ms"] = statistics.median(cpu) * 1000
        out["scrape_bytes"] = len(response.content)

        pruned_config = replace(config, factory=replace(config.factory, history_days=30.0,
                                                        accounting_days=90.0))  # fmt: skip
        pruner = Pruner(lambda: pruned_config)
        began = time.perf_counter()
        lms, accounting = pruner.round(store)
        out["prune_s"] = time.perf_counter() - began
        out["pruned_lms"] = lms
        out["pruned_accounting"] = accounting
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        remaining = store.db.execute("SELECT COUNT(*) FROM lms").fetchone()[0]
        out["lms_after_prune"] = remaining
        store.close()
        out["db_bytes_after_prune"] = (state / "lmrunner.db").stat().st_size
        out["machinetypes_ms_after_prune"] = timed([*lmrunner, "machinetypes", *base],
                                                   args.repeat)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finished", type=int, default=500_000)
    parser.add_argument("--running", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--passes", type=int, default=31)
    args = parser.parse_args()
    subprocess.run([sys.executable, "-m", "compileall", "-q", "lmrunner", "backends", "cgroups"],
                   check=False)  # fmt: skip
    result = measure(args)
    for key, value in result.items():
        print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    targets = {
        "machinetypes_lt_150ms": result["machinetypes_ms"] < 150,
        "page_lt_100ms": result["page_ms"] < 100,
        "pass_within_5pct": result["pass_ratio"] <= 1.05,
    }
    print(json.dumps({"benchmark": "history", "finished": args.finished,
                      "running": args.running, "repeat": args.repeat, "results": result,
                      "targets": targets}))  # fmt: skip


if __name__ == "__main__":
    main()
