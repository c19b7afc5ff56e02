"""lmrunner installed on the test bed exactly as docs/install.md says, and the service's state.

The doc's ``sh`` blocks run in order, as root, in an unpacked "release" folder (the wheel built
from the checkout in ``dist/``, the checkout's ``contrib/`` and ``examples/``), with pip pointed at
the run's wheel folder (the guest has no network). The one step the doc leaves to the admin,
editing the configuration, writes :data:`CONFIG` before the block that runs ``lmrunner check``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from tests.integration.daemons import Snapshot, snapshot_retrying

REPO = Path(os.environ.get("LMRUNNER_REPO", Path(__file__).resolve().parents[3]))
WHEELS = Path("/testbed/wheels")
VCBUSYBOX = Path(os.environ.get("VCBUSYBOX_OUT", REPO / "build" / "vcbusybox"))
STATE = Path("/var/lib/lmrunner")
CONFIG = Path("/etc/lmrunner/lmrunner.yaml")
UNIT = "lmrunner.service"
SKIP_MARK = "<!-- not in the test bed"
SLEEPER = '#!/bin/sh\nsleep 900\necho "200 slept" > "$JOBOUTPUTS/shutdown_message"\n'


def doc_blocks(text: str) -> list[str]:
    """The ``sh`` blocks of a Markdown text, in order, without those marked not to be run."""
    blocks = []
    for match in re.finditer(r"(?ms)^```sh\n(.*?)^```", text):
        before = text[: match.start()].rstrip().splitlines()
        if before and before[-1].startswith(SKIP_MARK):
            continue
        blocks.append(match.group(1))
    return blocks


def site_config(**machinetype_changes: Any) -> dict[str, Any]:
    """The test bed's configuration: one Docker and one Apptainer LM on its 2 processors."""
    sleeper = Path("/etc/lmrunner/user_data/sleeper")
    common = {"user_data": str(sleeper), "target_share": 1, "fizzle_seconds": 0,
              "stop_grace_seconds": 2, "accounting_fqan": "/test/Role=pilot"}  # fmt: skip
    machinetypes = {
        "dock": {"backend": "docker", "image": "docker://vcbusybox:latest", **common},
        "app": {
            "backend": "apptainer",
            "image": str(VCBUSYBOX / "apptainer" / "vcbusybox"),
            **common,
        },
    }
    for name, changes in machinetype_changes.items():
        machinetypes[name] = {**machinetypes[name], **changes}
    return {
        "factory": {
            "space": "testbed.example.com",
            "hostname": "lmrunner-guest.example.com",
            "state_dir": str(STATE),
            "total_processors": 2,
            "mb_per_processor": 256,
            "disk_gb_per_processor": 1,
        },
        "machinetypes": machinetypes,
    }


def write_config(config: dict[str, Any]) -> None:
    sleeper = Path("/etc/lmrunner/user_data/sleeper")
    sleeper.write_text(SLEEPER)
    sleeper.chmod(0o755)
    CONFIG.write_text(yaml.safe_dump(config))


def release_folder(top: Path) -> Path:
    """An unpacked release: the wheel in dist/, and the checkout's contrib/ and examples/."""
    release = top / "release"
    (release / "dist").mkdir(parents=True)
    for wheel in WHEELS.glob("vacuum_lmrunner-*.whl"):
        shutil.copy(wheel, release / "dist")
    for folder in ("contrib", "examples"):
        shutil.copytree(REPO / folder, release / folder)
    return release


def install_as_documented(top: Path) -> list[float]:
    """Run docs/install.md's blocks; returns each block's seconds."""
    release = release_folder(top)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELS)}
    took = []
    for block in doc_blocks((REPO / "docs" / "install.md").read_text()):
        if "lmrunner check" in block:  # the admin edits the configuration first
            write_config(site_config())
        started = time.monotonic()
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=release, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        took.append(time.monotonic() - started)
        assert done.returncode == 0, (
            f"docs/install.md block failed:\n{block}\n{done.stdout}\n{done.stderr}"
        )
    return took


def systemctl(*args: str, check: bool = True) -> str:
    done = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
    assert not check or done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def show(*properties: str) -> dict[str, str]:
    out = systemctl("show", "-p", ",".join(properties), UNIT)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(*matches: str, since_pid: int | None = None) -> list[dict[str, Any]]:
    """The service's journal entries (JSON), optionally only those of one daemon process."""
    import json

    argv = ["journalctl", "--no-pager", "-o", "json", "-u", UNIT, *matches]
    if since_pid is not None:
        argv.append(f"_PID={since_pid}")
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def messages(**kwargs: Any) -> list[str]:
    return [str(e.get("MESSAGE", "")) for e in journal(**kwargs)]


def store() -> Snapshot:
    snap = snapshot_retrying(STATE)
    assert snap is not None, "no store yet"
    return snap


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout:g} s: {what}")
