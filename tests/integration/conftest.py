"""Fixtures for tests against the real engines.

Each fixture skips (with the reason) when its engine is missing; under ``CI=true`` the top-level
conftest turns any such skip into a failure. Every test removes what it creates.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmrunner.backends.vm import AccelProbe, probe_accel

REPO = Path(__file__).resolve().parents[2]
VCBUSYBOX_OUT = Path(os.environ.get("VCBUSYBOX_OUT", REPO / "build" / "vcbusybox"))
SC_USER = os.environ.get("LMRUNNER_TEST_SC_USER", "lmrunner-sc")
#: Label on every Docker object a test creates, so a crashed run's leftovers can be found.
TEST_LABEL = "org.lmrunner.test"


@pytest.fixture(scope="session")
def vcbusybox() -> Path:
    """The vcbusybox build output (images/vcbusybox/build, run by scripts/bootstrap)."""
    if not (VCBUSYBOX_OUT / "rootfs" / "init").exists():
        pytest.skip(f"vcbusybox not built in {VCBUSYBOX_OUT}: run scripts/bootstrap")
    return VCBUSYBOX_OUT


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    """A Docker SDK client connected to a daemon that answers."""
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except docker.errors.DockerException as err:
        pytest.skip(f"no Docker daemon answers: {err}")
    yield client
    for container in client.containers.list(all=True, filters={"label": TEST_LABEL}):
        container.remove(force=True)
    client.close()


@pytest.fixture(scope="session")
def apptainer() -> str:
    """Path of the apptainer (or singularity) program."""
    found = shutil.which("apptainer") or shutil.which("singularity")
    if found is None:
        pytest.skip("apptainer/singularity not on PATH: run scripts/bootstrap")
    return found


@pytest.fixture(scope="session")
def qemu() -> str:
    found = shutil.which("qemu-system-x86_64")
    if found is None:
        pytest.skip("qemu-system-x86_64 not on PATH: run scripts/bootstrap")
    return found


@pytest.fixture(scope="session")
def vm_artefacts(vcbusybox: Path) -> tuple[Path, Path]:
    kernel, initrd = vcbusybox / "vm" / "vmlinuz", vcbusybox / "vm" / "initramfs.cpio.gz"
    if not (kernel.exists() and initrd.exists()):
        pytest.skip(f"vcbusybox VM artefacts missing in {vcbusybox / 'vm'}: run scripts/bootstrap")
    return kernel, initrd


@pytest.fixture(scope="session")
def accel(qemu: str, vm_artefacts: tuple[Path, Path]) -> AccelProbe:
    """KVM when a probe guest boots under it within the timeout, else TCG (once per session)."""
    return probe_accel(qemu, *vm_artefacts)


@pytest.fixture(scope="session")
def sc_user() -> str:
    """The unprivileged account that runs Apptainer LMs."""
    try:
        import pwd

        pwd.getpwnam(SC_USER)
    except KeyError:
        pytest.skip(f"account {SC_USER} missing: run scripts/bootstrap")
    return SC_USER


@pytest.fixture
def lm_dir(tmp_path: Path) -> Path:
    """A per-LM directory with the folders lmrunner binds into an LM."""
    root = tmp_path / f"lm-{uuid.uuid4().hex[:8]}"
    for sub in ("machinefeatures", "jobfeatures", "joboutputs", "mnt"):
        (root / sub).mkdir(parents=True)
    (root / "machinefeatures" / "total_cpu").write_text("1")
    (root / "jobfeatures" / "allocated_cpu").write_text("1\n")
    # tmp_path's parents are root-only (0700); LMs run by unprivileged accounts must reach it.
    for parent in [root, *root.parents]:
        if parent == Path(tmp_path.anchor) or parent == Path("/tmp"):
            break
        parent.chmod(parent.stat().st_mode | 0o755)
    return root


def write_user_data(lm_dir: Path, script: str) -> Path:
    """Write an executable user_data script into ``lm_dir``."""
    path = lm_dir / "user_data"
    path.write_text(script)
    path.chmod(0o755)
    return path


def remove_lms(config_file: Path) -> int:
    """Kill and remove every LM a test's daemon left running, with its cgroup (LMs outlive
    their daemon by design; tests must not leave them)."""
    from lmrunner.backends import make_backends
    from lmrunner.config import load_config
    from lmrunner.factory import Factory, host_cgroups
    from lmrunner.state import Store

    config = load_config(config_file)
    cgroups = host_cgroups(config.factory)
    names = {mt.backend.value for mt in config.machinetypes.values()}
    factory = Factory(
        config,
        Store(config.factory.state_dir),
        make_backends(names, config.factory, cgroups),
        cgroups=cgroups,
    )
    try:
        return factory.remove_all()
    finally:
        factory.close()
        factory.store.close()


#: scripts/test-v2-guest sets it: everything runs many times slower in the TCG guest.
TIMESCALE = float(os.environ.get("LMRUNNER_TEST_TIMESCALE", "1"))


def drive(factory: Any, done: Any, timeout: float = 60.0) -> None:
    """Run a factory's passes, woken by its backends' exit events, until ``done()``."""
    import contextlib
    import queue
    import time

    deadline = time.monotonic() + timeout * TIMESCALE
    while time.monotonic() < deadline:
        factory.run_pass()
        if done():
            return
        with contextlib.suppress(queue.Empty):
            factory.events.put(factory.events.get(timeout=min(factory.next_wait(), 0.5)))
    raise AssertionError(f"not done within {timeout * TIMESCALE} s")
