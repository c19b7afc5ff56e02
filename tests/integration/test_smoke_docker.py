"""Smoke test of the bootstrap's Docker engine and the vcbusybox OCI image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import TEST_LABEL, write_user_data

pytestmark = pytest.mark.docker

PAYLOAD = """#!/bin/sh
echo "host=$(hostname) mf=$MACHINEFEATURES jf=$JOBFEATURES cpu=$(cat $MACHINEFEATURES/total_cpu)" \
  > "$JOBOUTPUTS/payload.txt"
exit ${EXIT_CODE:-0}
"""


def run_lm(client: Any, lm_dir: Path, *, env: dict[str, str] | None = None, **extra: Any) -> int:
    """Run vcbusybox as Vac placed Docker LMs, wait for it, and return its exit code."""
    volumes = {
        str(lm_dir / "user_data"): {"bind": "/user_data", "mode": "ro"},
        str(lm_dir / "machinefeatures"): {"bind": "/etc/machinefeatures", "mode": "ro"},
        str(lm_dir / "jobfeatures"): {"bind": "/etc/jobfeatures", "mode": "ro"},
        str(lm_dir / "joboutputs"): {"bind": "/var/spool/joboutputs", "mode": "rw"},
        **extra.pop("volumes", {}),
    }
    container = client.containers.run(
        "vcbusybox:latest",
        ["/user_data"],
        hostname="lm-smoke.example.org",
        volumes=volumes,
        environment=env or {},
        labels={TEST_LABEL: "smoke"},
        detach=True,
        **extra,
    )
    try:
        result = container.wait(timeout=60)
        return int(result["StatusCode"])
    finally:
        container.remove(force=True)


def test_payload_writes_into_bound_joboutputs(
    docker_client: Any, vcbusybox: Path, lm_dir: Path
) -> None:
    write_user_data(lm_dir, PAYLOAD)
    assert run_lm(docker_client, lm_dir) == 0
    out = (lm_dir / "joboutputs" / "payload.txt").read_text()
    assert (
        out.strip() == "host=lm-smoke.example.org mf=/etc/machinefeatures jf=/etc/jobfeatures cpu=1"
    )
    message = (lm_dir / "joboutputs" / "shutdown_message").read_text()
    assert message.strip() == "200 Intended work completed ok"


def test_failing_payload_gets_700(docker_client: Any, vcbusybox: Path, lm_dir: Path) -> None:
    write_user_data(lm_dir, PAYLOAD)
    assert run_lm(docker_client, lm_dir, env={"EXIT_CODE": "3"}) == 3
    message = (lm_dir / "joboutputs" / "shutdown_message").read_text()
    assert message.strip() == "700 Payload exited with status 3"


def test_payload_message_is_kept(docker_client: Any, vcbusybox: Path, lm_dir: Path) -> None:
    write_user_data(lm_dir, '#!/bin/sh\necho "300 No more work" > "$JOBOUTPUTS/shutdown_message"\n')
    assert run_lm(docker_client, lm_dir) == 0
    assert (lm_dir / "joboutputs" / "shutdown_message").read_text().strip() == "300 No more work"


def test_payload_runs_inside_cernvm_style_root(
    docker_client: Any, vcbusybox: Path, lm_dir: Path, tmp_path: Path
) -> None:
    # A stand-in for /cvmfs/cernvm-prod.cern.ch/cvm4: its own /etc marks which root is seen.
    cvm = tmp_path / "cvmfs" / "cernvm-prod.cern.ch" / "cvm4"
    (cvm / "etc").mkdir(parents=True)
    (cvm / "etc" / "cernvm-release").write_text("CernVM stand-in 4\n")
    (cvm / "bin").mkdir()
    (cvm / "bin" / "busybox").write_bytes((vcbusybox / "rootfs" / "bin" / "busybox").read_bytes())
    (cvm / "bin" / "busybox").chmod(0o755)
    for applet in ("sh", "cat", "echo"):
        (cvm / "bin" / applet).symlink_to("busybox")
    write_user_data(
        lm_dir,
        '#!/bin/sh\ncat /etc/cernvm-release > "$JOBOUTPUTS/release"\n'
        'cat "$MACHINEFEATURES/total_cpu" > "$JOBOUTPUTS/cpu"\n',
    )
    code = run_lm(
        docker_client,
        lm_dir,
        env={"VCBUSYBOX_ROOT": "/cvmfs/cernvm-prod.cern.ch/cvm4"},
        volumes={str(tmp_path / "cvmfs"): {"bind": "/cvmfs", "mode": "ro"}},
        cap_add=["SYS_ADMIN"],  # mounting the CernVM root needs it, as with Vac's vcbusybox
    )
    assert code == 0
    assert (lm_dir / "joboutputs" / "release").read_text() == "CernVM stand-in 4\n"
    assert (lm_dir / "joboutputs" / "cpu").read_text() == "1"
    message = (lm_dir / "joboutputs" / "shutdown_message").read_text()
    assert message.strip() == "200 Intended work completed ok"


def test_cernvm_root_without_mount_rights_is_a_site_problem(
    docker_client: Any, vcbusybox: Path, lm_dir: Path, tmp_path: Path
) -> None:
    cvm = tmp_path / "cvmfs" / "cernvm-prod.cern.ch" / "cvm4"
    (cvm / "etc").mkdir(parents=True)
    write_user_data(lm_dir, "#!/bin/sh\nexit 0\n")
    code = run_lm(
        docker_client,
        lm_dir,
        env={"VCBUSYBOX_ROOT": "/cvmfs/cernvm-prod.cern.ch/cvm4"},
        volumes={str(tmp_path / "cvmfs"): {"bind": "/cvmfs", "mode": "ro"}},
    )
    assert code == 125
    message = (lm_dir / "joboutputs" / "shutdown_message").read_text()
    assert message.startswith("500 ")
