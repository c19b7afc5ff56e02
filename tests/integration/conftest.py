"""Fixtures for tests against the real engines.

Each fixture skips (with the reason) when its engine is missing; under ``CI=true`` the top-level
conftest turns any such skip into a failure. Every test removes what it creates.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lmrunner.backends import make_backends
from lmrunner.backends.vm import AccelProbe, probe_accel
from lmrunner.config import Config
from lmrunner.factory import Factory, Tuning
from lmrunner.lifecycle import LmState
from lmrunner.lmcgroups import host_cgroups
from lmrunner.lmdisks import host_disks
from lmrunner.state import LmRecord, Store

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
def accel(qemu: str) -> AccelProbe:
    """KVM when the probe guest finishes under it within the timeout, else TCG (once per
    session)."""
    return probe_accel(qemu)


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
def lm_dir() -> Iterator[Path]:
    """A per-LM directory with the folders lmrunner binds into an LM.

    It lives in its own 0755 folder outside pytest's tree: pytest keeps that tree root-only
    (0700, reset by every new session), and LMs run by unprivileged accounts must reach it.
    """
    top = Path(tempfile.mkdtemp(prefix="lmrunner-lm-"))
    top.chmod(0o755)
    root = top / f"lm-{uuid.uuid4().hex[:8]}"
    for sub in ("machinefeatures", "jobfeatures", "joboutputs", "mnt"):
        (root / sub).mkdir(parents=True)
    (root / "machinefeatures" / "total_cpu").write_text("1")
    (root / "jobfeatures" / "allocated_cpu").write_text("1\n")
    yield root
    shutil.rmtree(top, ignore_errors=True)


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
    from lmrunner.factory import Factory
    from lmrunner.lmcgroups import host_cgroups
    from lmrunner.lmdisks import host_disks
    from lmrunner.loader import load_config
    from lmrunner.state import Store

    config = load_config(config_file)
    cgroups = host_cgroups(config.factory)
    names = {mt.backend.value for mt in config.machinetypes.values()}
    factory = Factory(
        config,
        Store(config.factory.state_dir),
        make_backends(names, config.factory, cgroups),
        cgroups=cgroups,
        disks=host_disks(config.factory),
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


def first(factory: Factory) -> LmRecord:
    """The factory's oldest LM."""
    return sorted(factory.store.recent(), key=lambda r: r.created)[0]


def ended(factory: Factory, uuid: str) -> bool:
    record = factory.store.get(uuid)
    return record is not None and not record.active


class Factories:
    """The factories one test makes on ``backend``, with the host's cgroups and short timings.

    ``make`` adopts what the state folder's earlier factories left; ``close`` removes every LM
    (LMs outlive factories by design; tests must not leave them), calls ``after_remove`` on each
    factory (a backend's own check or safety net), then closes the factories and their stores.
    With ``disks``, LMs get the host's per-LM filesystems (``factory.disk_method``).
    """

    def __init__(
        self,
        backend: str,
        after_remove: Callable[[Factory], None] | None = None,
        *,
        disks: bool = False,
        **tuning: Any,
    ) -> None:
        self.backend = backend
        self.after_remove = after_remove
        self.disks = disks
        self.tuning: dict[str, Any] = {"reconcile_seconds": 5, **tuning}
        self.made: list[Factory] = []

    def make(self, config: Config, **tuning: Any) -> Factory:
        cgroups = host_cgroups(config.factory)
        factory = Factory(
            config,
            Store(config.factory.state_dir),
            make_backends({self.backend}, config.factory, cgroups),
            tuning=Tuning(**{**self.tuning, **tuning}),
            load_average=lambda: (0.0, 0.0, 0.0),
            cgroups=cgroups,
            disks=host_disks(config.factory) if self.disks else None,
        )
        factory.adopt()
        self.made.append(factory)
        return factory

    def close(self) -> None:
        """Clean every factory, even when cleaning one fails; the first failure is raised."""
        with contextlib.ExitStack() as stack:
            for factory in self.made:
                stack.callback(factory.store.close)
                stack.callback(factory.close)
                if self.after_remove is not None:
                    stack.callback(self.after_remove, factory)
                stack.callback(factory.remove_all)


def start_daemon(config_file: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``lmrunner daemon --config config_file``, its stderr appended to ``log``."""
    with log.open("ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "lmrunner", "daemon", "--config", str(config_file)],
            stderr=err,
            cwd=REPO,
        )


def wait_running(state: Path, log: Path, timeout: float = 30.0) -> LmRecord:
    """The first LM that the store in ``state`` shows RUNNING, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if (state / "lmrunner.db").exists():
            store = Store(state, readonly=True)
            try:
                running = [r for r in store.active() if r.state is LmState.RUNNING]
            finally:
                store.close()
            if running:
                return running[0]
    raise AssertionError(f"no LM running within {timeout} s:\n{log.read_text()}")


def wait_ended(store: Store, uuid: str, log: Path, timeout: float = 60.0) -> LmRecord:
    """The record of LM ``uuid`` once it ended (with an outcome), within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = store.get(uuid)
        if record is not None and not record.active:
            break
        time.sleep(0.2)
    record = store.get(uuid)
    assert record is not None and record.outcome is not None, log.read_text()
    return record


#: A payload that lets a test kill its daemon, then ends with a 200 outcome.
SLEEP_THEN_200 = (
    "#!/bin/sh\nsleep 6\necho '200 Intended work completed ok' > $JOBOUTPUTS/shutdown_message\n"
)


@contextlib.contextmanager
def daemon_killed_and_restarted(
    config_file: Path, state: Path, log: Path
) -> Iterator[tuple[LmRecord, LmRecord]]:
    """Run a daemon until one LM of ``config_file`` (a ``SLEEP_THEN_200`` payload) runs, kill
    the daemon with SIGKILL and start a second one, which must finish that LM: its 200 outcome,
    and a single record of it (adopted, not started again).

    Yields the LM's record as the first daemon left it and as the second one ended it. At exit
    the second daemon is stopped with SIGTERM; after a body without error, the daemons' log
    must hold no traceback.
    """
    killed = start_daemon(config_file, log)
    try:
        running = wait_running(state, log)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    second = start_daemon(config_file, log)
    try:
        store = Store(state, readonly=True)
        try:
            record = wait_ended(store, running.uuid, log)
            assert record.outcome is not None
            assert record.outcome.message == "200 Intended work completed ok"
            assert [r.uuid for r in store.recent()].count(running.uuid) == 1
        finally:
            store.close()
        yield running, record
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(timeout=30)
        except subprocess.TimeoutExpired:
            second.kill()  # it must not outlive the test
            second.wait()
            raise
        finally:
            # The second daemon went on starting LMs, which outlive it by design: remove
            # them with their cgroups and disks (a mounted disk would outlive the test).
            remove_lms(config_file)
    assert "Traceback" not in log.read_text()
