"""Unit tests run no subprocess: starting one fails the test (unless marked allow_subprocess)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _forbid_subprocess(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    if request.node.get_closest_marker("allow_subprocess") is None:

        def forbidden(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"unit test ran a subprocess: {args!r}; fake lmrunner.runner.run")

        monkeypatch.setattr("subprocess.Popen", forbidden)
    yield


@pytest.fixture(autouse=True)
def _private_host_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unit tests fake the KVM probe: its answers must never reach the host-wide cache."""
    monkeypatch.setenv("LMRUNNER_CACHE_DIR", str(tmp_path_factory.mktemp("host-cache")))
