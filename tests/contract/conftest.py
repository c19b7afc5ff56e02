"""The contract suite: the same life-cycle scenarios against every backend whose engine is here.

Each backend contributes a :class:`Case` that says how to script a payload for it (a fake image,
or a user_data script for the real engines). The scenarios drive a real :class:`Factory` with a
real store, so they prove the backend *and* the core's use of it.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmrunner.backends import make_backends
from lmrunner.backends.base import Backend
from lmrunner.config import Config, load_config
from lmrunner.factory import Factory, Tuning
from lmrunner.state import Store


@dataclass(frozen=True)
class Behaviour:
    """What the payload of a contract LM does."""

    seconds: float = 30.0  # runs this long, then writes ``message`` and exits 0
    message: str | None = None
    ignore_term: bool = False  # keeps running after SIGTERM (then must be killed)


@dataclass(frozen=True)
class Case:
    backend: str
    machinetype: Callable[[Behaviour], dict[str, Any]]  # options of a machinetype doing that


def _fake_machinetype(b: Behaviour) -> dict[str, Any]:
    parts = [f"seconds={b.seconds}", f"ignore_term={int(b.ignore_term)}"]
    if b.message:
        parts.append(f"message={b.message}")
    return {"backend": "fake", "image": "fake:" + ";".join(parts)}


CASES = [Case("fake", _fake_machinetype)]


@pytest.fixture(params=CASES, ids=lambda case: case.backend)
def case(request: pytest.FixtureRequest) -> Case:
    value: Case = request.param
    return value


class Harness:
    """A factory on a temporary state directory, driven pass by pass."""

    def __init__(self, tmp_path: Path, case: Case) -> None:
        self.tmp_path = tmp_path
        self.case = case
        self.factories: list[Factory] = []

    def config(self, behaviour: Behaviour, **options: Any) -> Config:
        machinetype = {
            **self.case.machinetype(behaviour),
            "target_share": 1,
            "fizzle_seconds": 0,
            "stop_grace_seconds": 1,
            **options,
        }
        data = {
            "factory": {
                "space": "contract.example.com",
                "hostname": "factory.example.com",
                "state_dir": str(self.tmp_path / "state"),
                "total_processors": 1,
            },
            "machinetypes": {"contract": machinetype},
        }
        path = self.tmp_path / "lmrunner.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_config(path, cpus=1)

    def factory(self, config: Config) -> Factory:
        store = Store(config.factory.state_dir)
        backends: dict[str, Backend] = make_backends({self.case.backend}, config.factory.state_dir)
        factory = Factory(
            config,
            store,
            backends,
            tuning=Tuning(reconcile_seconds=5, idle_wait_seconds=0.5),
            load_average=lambda: (0.0, 0.0, 0.0),
        )
        factory.adopt()
        self.factories.append(factory)
        return factory

    def drive(self, factory: Factory, done: Callable[[], bool], timeout: float = 30.0) -> None:
        """Run passes (woken by the backend's exit events) until ``done()`` or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            factory.run_pass()
            if done():
                return
            try:
                uuid = factory.events.get(timeout=min(factory.next_wait(), 0.2))
                factory.events.put(uuid)
            except queue.Empty:
                pass
        raise AssertionError(f"condition not met within {timeout} s")

    def close(self) -> None:
        for factory in self.factories:
            factory.close()
            factory.store.close()


@pytest.fixture
def harness(tmp_path: Path, case: Case) -> Iterator[Harness]:
    made = Harness(tmp_path, case)
    yield made
    made.close()
