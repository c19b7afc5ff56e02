"""The modern-host test bed (scripts/test-systemd-guest): these tests run only inside its guest,
where systemd is PID 1, the hierarchy is pure cgroup v2 and dockerd keeps its default cgroup
driver. Anywhere else they skip (and under ``CI=true`` a skip fails the run)."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("LMRUNNER_IN_SYSTEMD_GUEST") == "1":
        return
    skip = pytest.mark.skip(reason="runs in the systemd test bed only (make test-systemd)")
    for item in items:
        if item.get_closest_marker("systemd_host") is not None:
            item.add_marker(skip)
