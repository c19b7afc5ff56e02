"""scripts/bootstrap refuses other systems with one clear message naming what is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmrunner import runner

pytestmark = pytest.mark.allow_subprocess

BOOTSTRAP = Path(__file__).resolve().parents[2] / "scripts" / "bootstrap"


def test_other_distribution_is_refused_before_anything_is_installed(tmp_path: Path) -> None:
    os_release = tmp_path / "os-release"
    os_release.write_text('ID=fedora\nVERSION_ID="40"\n')
    env = {**os.environ, "LMRUNNER_OS_RELEASE": str(os_release), "LMRUNNER_DEPS": str(tmp_path)}
    done = runner.run(["bash", BOOTSTRAP], env=env, ok_codes=(1,), timeout=30)
    assert "Debian 12 (this is fedora 40)" in done.stderr
    assert done.stderr.startswith("bootstrap: error: ")
    assert done.stdout == ""  # refused before any step ran
    assert list(tmp_path.iterdir()) == [os_release]
