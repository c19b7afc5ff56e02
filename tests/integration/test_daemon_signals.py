"""The daemon process: SIGHUP reloads (a bad file keeps the old configuration), SIGTERM exits
leaving LMs running."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmrunner.state import Store
from tests.integration.conftest import remove_lms

pytestmark = pytest.mark.slow

CONFIG = """\
factory:
  space: signals.example.com
  hostname: signals.example.com
  state_dir: {state}
  total_processors: 1
  disk_gb_per_processor: 0.1
machinetypes:
  long:
    backend: fake
    image: "fake:seconds=600"
    target_share: {share}
"""


def wait_for(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not met")


def test_sighup_reloads_and_sigterm_leaves_lms_running(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "lmrunner.yaml"
    config.write_text(CONFIG.format(state=state, share=0))  # share 0: nothing starts
    log = tmp_path / "daemon.log"
    with log.open("wb") as err:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "lmrunner", "daemon", "--config", str(config)], stderr=err
        )
    try:
        wait_for(lambda: "backend=fake health=ok" in log.read_text())
        time.sleep(0.5)
        assert not (state / "lmrunner.db").exists() or not Store(state, readonly=True).active()

        config.write_text("factory: [this is not a mapping\n")
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused, keeping the running configuration" in log.read_text())

        config.write_text(CONFIG.format(state=state, share=1))
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in log.read_text())
        wait_for(lambda: len(Store(state, readonly=True).active()) == 1)

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    running = Store(state, readonly=True).active()
    assert len(running) == 1, "SIGTERM must leave running LMs running"
    assert "Traceback" not in log.read_text()
    remove_lms(config)
