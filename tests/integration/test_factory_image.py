"""The top-level Dockerfile packages lmrunner itself; the image runs `lmrunner --version`."""

from __future__ import annotations

from typing import Any

import pytest

import lmrunner
from lmrunner import runner
from tests.integration.conftest import REPO, TEST_LABEL

pytestmark = [pytest.mark.docker, pytest.mark.slow]

TAG = "lmrunner:integration-test"


def test_factory_image_builds_and_runs(docker_client: Any) -> None:
    runner.run([REPO / "scripts" / "build-image", TAG], timeout=900)
    try:
        output = docker_client.containers.run(
            TAG, ["--version"], remove=True, labels={TEST_LABEL: "image"}
        )
        assert output.decode().strip() == f"lmrunner {lmrunner.__version__}"
        help_text = docker_client.containers.run(TAG, remove=True, labels={TEST_LABEL: "image"})
        assert b"logical machines" in help_text
    finally:
        docker_client.images.remove(TAG, noprune=False)
