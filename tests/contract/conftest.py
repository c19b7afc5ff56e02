"""The contract suite: the same life-cycle scenarios against every backend whose engine is here.

Each backend contributes a :class:`Case` that says how to script a payload for it (a fake image,
or a user_data script for the real engines). The scenarios drive a real :class:`Factory` with a
real store, so they prove the backend *and* the core's use of it.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmrunner.backends import make_backends
from lmrunner.backends.base import Backend
from lmrunner.config import Config
from lmrunner.factory import Factory, Tuning
from lmrunner.lmcgroups import host_cgroups
from lmrunner.loader import load_config
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
    #: options of a machinetype whose LMs behave so (files it needs go into the folder given)
    machinetype: Callable[[Behaviour, Path], dict[str, Any]]
    marks: tuple[Any, ...] = ()
    #: seconds one scenario step may take (a VM under TCG boots for ~10 s before its payload)
    timeout: float = 30.0
    #: grace of an operator stop sent right after the start: a VM must have booted far enough
    #: to hear the ACPI button and pass SIGTERM on
    stop_grace: float = 5.0


def _fake_machinetype(b: Behaviour, folder: Path) -> dict[str, Any]:
    parts = [f"seconds={b.seconds}", f"ignore_term={int(b.ignore_term)}"]
    if b.message:
        parts.append(f"message={b.message}")
    return {"backend": "fake", "image": "fake:" + ";".join(parts)}


def user_data_script(b: Behaviour) -> str:
    """A payload for the real engines (run by vcbusybox's /init)."""
    lines = ["#!/bin/sh"]
    if b.ignore_term:
        lines.append("trap '' TERM")
    lines.append(f"sleep {b.seconds} & wait $!")  # wait: a TERM interrupts it at once
    if b.ignore_term:
        lines.append("while sleep 1; do :; done")
    if b.message:
        lines.append(f'echo "{b.message}" > "$JOBOUTPUTS/shutdown_message"')
    return "\n".join(lines) + "\n"


def _docker_machinetype(b: Behaviour, folder: Path) -> dict[str, Any]:
    path = folder / "user_data"
    path.write_text(user_data_script(b))
    return {"backend": "docker", "image": "docker://vcbusybox:latest", "user_data": str(path)}


REPO = Path(__file__).resolve().parents[2]
#: How much slower than a development host this one is: scripts/test-v2-guest sets it for the
#: TCG guest, where Python and container start-up run many times slower. Deadlines and the
#: time the scenarios allow scale with it; what they assert does not change.
TIMESCALE = float(os.environ.get("LMRUNNER_TEST_TIMESCALE", "1"))
VCBUSYBOX_OUT = Path(os.environ.get("VCBUSYBOX_OUT", REPO / "build" / "vcbusybox"))


def _apptainer_machinetype(b: Behaviour, folder: Path) -> dict[str, Any]:
    path = folder / "user_data"
    path.write_text(user_data_script(b))
    path.chmod(0o755)
    image = VCBUSYBOX_OUT / "apptainer" / "vcbusybox"  # the sandbox directory (no unpacking)
    return {"backend": "apptainer", "image": str(image), "user_data": str(path)}


def _vm_machinetype(b: Behaviour, folder: Path) -> dict[str, Any]:
    path = folder / "user_data"
    path.write_text(user_data_script(b))
    vm = VCBUSYBOX_OUT / "vm"
    return {
        "backend": "vm",
        "image": str(vm / "vmlinuz"),
        "vm_initrd": str(vm / "initramfs.cpio.gz"),
        "user_data": str(path),
    }


CASES = [
    Case("fake", _fake_machinetype),
    Case("docker", _docker_machinetype, (pytest.mark.docker, pytest.mark.slow)),
    Case("apptainer", _apptainer_machinetype, (pytest.mark.apptainer, pytest.mark.slow)),
    Case("vm", _vm_machinetype, (pytest.mark.qemu, pytest.mark.slow), timeout=120.0, stop_grace=60),
]


@pytest.fixture(params=[pytest.param(c, marks=c.marks, id=c.backend) for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    value: Case = request.param
    if value.backend != "fake":
        backend = make_backends({value.backend}, _probe_factory())[value.backend]
        probe = backend.probe()
        backend.close()
        if probe.health.value != "ok":
            pytest.skip(f"{value.backend}: {probe.detail}")
    return value


def _probe_factory() -> Any:
    from lmrunner.config import FactoryConfig

    return FactoryConfig(space="probe.example.com", state_dir=Path("/nonexistent"))


class Harness:
    """A factory on a temporary state directory, driven pass by pass."""

    def __init__(self, tmp_path: Path, case: Case) -> None:
        self.tmp_path = tmp_path
        self.case = case
        self.factories: list[Factory] = []
        # LMs of unprivileged backends (Apptainer runs them as sc_user) must reach their
        # directories: pytest's own tmp root is 0700, so the state lives outside it.
        self.state_root = Path(tempfile.mkdtemp(prefix="lmrunner-contract-"))
        self.state_root.chmod(0o755)

    def config(self, behaviour: Behaviour, **options: Any) -> Config:
        folder = self.tmp_path / "machinetype"
        folder.mkdir(exist_ok=True)
        machinetype = {
            **self.case.machinetype(behaviour, folder),
            "target_share": 1,
            "fizzle_seconds": 0,
            "stop_grace_seconds": 1,
            **options,
        }
        data = {
            "factory": {
                "space": "contract.example.com",
                "hostname": "factory.example.com",
                "state_dir": str(self.state_root / "state"),
                "total_processors": 1,
            },
            "machinetypes": {"contract": machinetype},
        }
        path = self.tmp_path / "lmrunner.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_config(path, cpus=1)

    def factory(self, config: Config) -> Factory:
        store = Store(config.factory.state_dir)
        cgroups = host_cgroups(config.factory)
        backends: dict[str, Backend] = make_backends({self.case.backend}, config.factory, cgroups)
        factory = Factory(
            config,
            store,
            backends,
            tuning=Tuning(reconcile_seconds=5, idle_wait_seconds=0.5),
            load_average=lambda: (0.0, 0.0, 0.0),
            cgroups=cgroups,
        )
        factory.adopt()
        self.factories.append(factory)
        return factory

    def drive(
        self, factory: Factory, done: Callable[[], bool], timeout: float | None = None
    ) -> None:
        """Run passes (woken by the backend's exit events) until ``done()`` or time runs out."""
        timeout = (timeout or self.case.timeout) * TIMESCALE
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
            factory.remove_all()  # LMs outlive factories by design; tests must not leave them
            factory.close()
            factory.store.close()
        shutil.rmtree(self.state_root, ignore_errors=True)


@pytest.fixture
def harness(tmp_path: Path, case: Case) -> Iterator[Harness]:
    made = Harness(tmp_path, case)
    yield made
    made.close()
