"""The daemon killed with SIGKILL at ten points of a churning run loses and duplicates nothing.

A real ``lmrunner daemon`` process runs fake LMs (their engine is files plus time, so they live on
while the daemon is dead, like real ones). It is killed at random moments, sometimes left dead
while LMs end, and restarted. Afterwards every LM is recorded exactly once with an outcome, no
engine object is left without a record, and no slot ever held two LMs.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmrunner.lifecycle import LmState
from lmrunner.state import Store

pytestmark = pytest.mark.slow

CONFIG = """\
factory:
  space: churn.example.com
  hostname: churn.example.com
  state_dir: {state}
  total_processors: 2
  disk_gb_per_processor: 0.1
machinetypes:
  quick:
    backend: fake
    image: "fake:seconds=0.4;message=200 Intended work completed ok"
    target_share: 1
    fizzle_seconds: 0
  slow:
    backend: fake
    image: "fake:seconds=1.3;message=200 Intended work completed ok"
    target_share: 1
    fizzle_seconds: 0
  silent:
    backend: fake
    image: "fake:seconds=0.8;exit=0"
    target_share: 1
    fizzle_seconds: 0
"""


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lmrunner",
                "daemon",
                "--config",
                str(config),
                "--reconcile",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def test_sigkill_at_ten_points_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "lmrunner.yaml"
    config.write_text(CONFIG.format(state=state))
    log = tmp_path / "daemon.log"
    rng = random.Random(20261122)
    for _ in range(10):
        daemon = start_daemon(config, log)
        time.sleep(rng.uniform(0.3, 1.5))
        assert daemon.poll() is None, log.read_text()[-2000:]  # it was running when killed
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        time.sleep(rng.choice([0.0, 0.0, 0.7]))  # sometimes LMs end while nobody watches
    # A last, clean run: drain, let every LM end, then stop.
    daemon = start_daemon(config, log)
    time.sleep(1.0)
    subprocess.run([sys.executable, "-m", "lmrunner", "drain", "--config", str(config)], check=True,
                   capture_output=True)  # fmt: skip
    store = Store(state, readonly=True)
    deadline = time.monotonic() + 30
    while store.active() and time.monotonic() < deadline:
        time.sleep(0.2)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0

    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    records = store.recent()
    assert len(records) >= 20, "the run should have churned through many LMs"
    assert store.active() == []
    uuids = [r.uuid for r in records]
    assert len(uuids) == len(set(uuids))
    for record in records:
        assert record.state in (LmState.FINISHED, LmState.FAILED)
        assert record.outcome is not None, record
        assert record.finished is not None
    # No engine object outlived its record.
    engine = state / "fake-engine"
    leftovers = [json.loads(f.read_text())["uuid"] for f in engine.glob("*.json")]
    assert leftovers == []
    # Slots never overlapped: intervals of LMs in the same slot are disjoint.
    by_slot: dict[int, list[tuple[float, float]]] = {}
    for record in records:
        assert record.finished is not None
        by_slot.setdefault(record.slot, []).append((record.created, record.finished))
    for intervals in by_slot.values():
        intervals.sort()
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert start >= end - 0.05, intervals
    outcomes: dict[str, int] = {}
    for record in records:
        assert record.outcome is not None
        outcomes[record.outcome.message] = outcomes.get(record.outcome.message, 0) + 1
    print(f"{len(records)} LMs over 11 daemon runs: {outcomes}")
    store.close()
