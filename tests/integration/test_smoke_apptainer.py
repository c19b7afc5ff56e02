"""Smoke test of the bootstrap's private Apptainer and the vcbusybox Apptainer images."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from lmrunner import runner
from tests.integration.conftest import write_user_data

pytestmark = pytest.mark.apptainer

PAYLOAD = """#!/bin/sh
echo "uid=$(id -u) mf=$MACHINEFEATURES jf=$JOBFEATURES cpu=$(cat $MACHINEFEATURES/total_cpu)" \
  > "$JOBOUTPUTS/payload.txt"
"""


def run_sc(apptainer: str, image: Path, lm_dir: Path, account: str, exit_code: int = 0) -> None:
    """Run vcbusybox as Vac placed Apptainer LMs, as ``account``; it must exit ``exit_code``."""
    user = pwd.getpwnam(account)
    for writable in (lm_dir / "joboutputs", lm_dir / "mnt"):
        os.chown(writable, user.pw_uid, user.pw_gid)
    argv: list[str | Path] = [
        "runuser", "-u", account, "--",
        apptainer, "--silent", "exec", "--contain", "--pid", "--pwd", "/tmp",
        "--workdir", lm_dir / "mnt",
        "--bind", f"{lm_dir / 'machinefeatures'}:/tmp/machinefeatures:ro",
        "--bind", f"{lm_dir / 'jobfeatures'}:/tmp/jobfeatures:ro",
        "--bind", f"{lm_dir / 'joboutputs'}:/tmp/joboutputs",
        "--bind", f"{lm_dir / 'user_data'}:/user_data:ro",
        image, "/init", "/user_data",
    ]  # fmt: skip
    runner.run(argv, timeout=60, ok_codes=(exit_code,))


@pytest.mark.parametrize("account", ["root", "unprivileged"])
def test_directory_image_runs_payload(
    apptainer: str, vcbusybox: Path, lm_dir: Path, sc_user: str, account: str
) -> None:
    name = sc_user if account == "unprivileged" else "root"
    write_user_data(lm_dir, PAYLOAD)
    run_sc(apptainer, vcbusybox / "apptainer" / "vcbusybox", lm_dir, name)
    uid = pwd.getpwnam(name).pw_uid
    out = (lm_dir / "joboutputs" / "payload.txt").read_text().strip()
    assert out == f"uid={uid} mf=/tmp/machinefeatures jf=/tmp/jobfeatures cpu=1"
    message = (lm_dir / "joboutputs" / "shutdown_message").read_text()
    assert message.strip() == "200 Intended work completed ok"


def test_sif_image_runs_payload(
    apptainer: str, vcbusybox: Path, lm_dir: Path, sc_user: str
) -> None:
    sif = vcbusybox / "apptainer" / "vcbusybox.sif"
    if not sif.exists():
        pytest.skip(f"{sif} not built (mksquashfs missing when images/vcbusybox/build ran)")
    write_user_data(lm_dir, "#!/bin/sh\nexit 4\n")
    run_sc(apptainer, sif, lm_dir, sc_user, exit_code=4)
    message = (lm_dir / "joboutputs" / "shutdown_message").read_text()
    assert message.strip() == "700 Payload exited with status 4"
