"""Payloads read machine/job features inside a real container, in both ``mjf_env_style``s.

Shell payloads do ``cat $JOBFEATURES/allocated_cpu`` (style ``path``); Python 3 payloads such as
DIRAC do ``urlopen(os.environ["JOBFEATURES"] + "/allocated_cpu")``, which needs a URL (style
``file_url``). The LM directory is made by :func:`lmrunner.payload.prepare` and mounted where the
Docker backend's placement says, exactly as the backend will mount it.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest

from lmrunner.backends import PLACEMENTS
from lmrunner.loader import load_config
from lmrunner.payload import (
    Prepared,
    limits_for,
    lm_name,
    new_identity,
    prepare,
    update_shutdowntime,
)
from tests.integration.conftest import TEST_LABEL

pytestmark = [pytest.mark.docker, pytest.mark.slow]

PYTHON_IMAGE = "lmrunner-test-python3:bookworm"
DOCKERFILE = """\
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends python3 \\
 && rm -rf /var/lib/apt/lists/*
"""
READER = """\
import os, urllib.request
with urllib.request.urlopen(os.environ["JOBFEATURES"] + "/allocated_cpu") as reply:
    print("urlopen:" + reply.read().decode().strip())
try:
    print("open:" + open(os.environ["JOBFEATURES"] + "/allocated_cpu").read().strip())
except OSError as err:
    print("open-failed:" + type(err).__name__)
"""


@pytest.fixture(scope="session")
def python_image(docker_client: Any) -> str:
    """A Debian image with Python 3 (built once per machine; the base is seeded by bootstrap)."""
    try:
        docker_client.images.get(PYTHON_IMAGE)
    except Exception:  # docker.errors.ImageNotFound; the SDK's errors are not typed
        docker_client.images.build(
            fileobj=io.BytesIO(DOCKERFILE.encode()),
            tag=PYTHON_IMAGE,
            rm=True,
            labels={TEST_LABEL: "python3"},
        )
    return PYTHON_IMAGE


def prepare_lm(tmp_path: Path, style: str, processors: int = 2) -> Prepared:
    config_file = tmp_path / "lmrunner.yaml"
    config_file.write_text(
        f"factory:\n  space: space.example.com\n  state_dir: {tmp_path / 'state'}\n"
        f"  total_processors: {processors}\n  processors_per_superslot: {processors}\n"
        "machinetypes:\n  mjf:\n    backend: docker\n    image: docker://vcbusybox\n"
        f"    max_processors: {processors}\n    mjf_env_style: {style}\n"
    )
    config = load_config(config_file, hostname="factory.example.com", cpus=processors)
    mt = config.machinetypes["mjf"]
    lm = new_identity(lm_name(config.factory.hostname, 0), mt.name)
    now = int(time.time())
    return prepare(
        config, mt, lm, placement=PLACEMENTS["docker"], limits=limits_for(config, mt, processors),
        created=now, shutdown_time=now + 3600, lm_dir=tmp_path / "state" / "machines" / lm.name,
        owner=(0, 0),
    )  # fmt: skip


def run(client: Any, image: str, prepared: Prepared, command: list[str]) -> str:
    volumes = {
        str(m.source): {"bind": str(m.target), "mode": "ro" if m.read_only else "rw"}
        for m in prepared.mounts
    }
    output = client.containers.run(
        image, command, environment=dict(prepared.env), volumes=volumes, remove=True,
        labels={TEST_LABEL: "mjf"},
    )  # fmt: skip
    return str(output.decode())


def test_shell_payload_reads_mjf_with_path_style(
    docker_client: Any, vcbusybox: Path, tmp_path: Path
) -> None:
    prepared = prepare_lm(tmp_path, "path")
    assert prepared.env["JOBFEATURES"] == "/etc/jobfeatures"
    # Whole lines only: Docker may drop a last line without a newline from the logs.
    script = 'echo "$(cat $JOBFEATURES/allocated_cpu) $(cat $MACHINEFEATURES/total_cpu)"'
    assert run(docker_client, "vcbusybox:latest", prepared, ["sh", "-c", script]) == "2 2\n"


def test_python_payload_reads_mjf_with_urlopen_in_file_url_style(
    docker_client: Any, python_image: str, tmp_path: Path
) -> None:
    prepared = prepare_lm(tmp_path, "file_url")
    assert prepared.env["JOBFEATURES"] == "file:///etc/jobfeatures"
    out = run(docker_client, python_image, prepared, ["python3", "-c", READER])
    # urlopen works; plain open() does not with a URL: the trade-off docs/payload.md describes.
    assert out.splitlines() == ["urlopen:2", "open-failed:FileNotFoundError"]


def test_python_urlopen_fails_on_a_bare_path(
    docker_client: Any, python_image: str, tmp_path: Path
) -> None:
    prepared = prepare_lm(tmp_path, "path")
    out = run(docker_client, python_image, prepared,
              ["python3", "-c", "import os, urllib.request as u\ntry:\n"
               " u.urlopen(os.environ['JOBFEATURES'] + '/allocated_cpu')\n"
               "except ValueError as e:\n print('ValueError')"])  # fmt: skip
    assert out.strip() == "ValueError"


def test_lowered_shutdowntime_is_seen_inside_a_running_lm(
    docker_client: Any, vcbusybox: Path, tmp_path: Path
) -> None:
    prepared = prepare_lm(tmp_path, "path")
    volumes = {
        str(m.source): {"bind": str(m.target), "mode": "ro" if m.read_only else "rw"}
        for m in prepared.mounts
    }
    container = docker_client.containers.run(
        "vcbusybox:latest",
        ["sh", "-c", "while [ ! -e $JOBOUTPUTS/go ]; do sleep 0.1; done; "
         "cat $MACHINEFEATURES/shutdowntime; echo; cat $JOBFEATURES/shutdowntime_job; echo"],
        environment=dict(prepared.env), volumes=volumes, detach=True, labels={TEST_LABEL: "mjf"},
    )  # fmt: skip
    try:
        earlier = prepared.shutdown_time - 600
        assert update_shutdowntime(prepared.directory, earlier)
        (prepared.directory / "joboutputs" / "go").write_text("")
        container.wait(timeout=30)
        assert container.logs().decode().split() == [str(earlier), str(earlier)]
    finally:
        container.remove(force=True)
