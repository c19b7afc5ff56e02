"""`make demo` (scripts/demo) runs a factory, shows ps while LMs run and finish, and stops."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmrunner import runner
from tests.integration.conftest import REPO

pytestmark = pytest.mark.slow


def test_demo_runs_and_stops_cleanly() -> None:
    env = {**os.environ, "LMRUNNER": str(REPO / ".venv" / "bin" / "lmrunner")}
    done = runner.run([REPO / "scripts" / "demo", "15"], env=env, timeout=180)
    out = done.stdout
    assert "--- lmrunner ps" in out
    assert "NAME" in out and "MACHINETYPE" in out
    # Which machinetypes run is chosen by shares and chance: any of the demo's will do.
    types = ("fake-work", "fake-nowork", "docker-work", "docker-nowork", "apptainer-work")
    assert any(t in out for t in (*types, "vm-work")), out
    # Some LM always ends within 15 s.
    assert any(" finished " in line for line in out.splitlines()), out
    assert "--- stopping the factory" in out


def test_a_demo_that_cannot_start_says_why_and_leaves_no_state(tmp_path: Path) -> None:
    bad = tmp_path / "demo.yaml"
    text = (REPO / "examples" / "demo.yaml").read_text()
    bad.write_text(text.replace("total_processors: 2", "total_processors: 999"))
    env = {**os.environ, "DEMO_CONFIG": str(bad), "TMPDIR": str(tmp_path),
           "LMRUNNER": str(REPO / ".venv" / "bin" / "lmrunner")}  # fmt: skip
    done = runner.run([REPO / "scripts" / "demo", "3"], env=env, timeout=60, ok_codes=(1,))
    assert "factory.total_processors" in done.stderr
    assert list(tmp_path.glob("lmrunner-demo.*")) == []  # the cleanup ran to its end
