"""The Docker backend on the real dockerd: limits, OOM, adoption after kill -9, dockerd restart.

The life-cycle scenarios shared with every backend are in tests/contract/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmrunner.backends import make_backends
from lmrunner.config import Config, load_config
from lmrunner.factory import Factory, Tuning, host_cgroups
from lmrunner.lifecycle import LmState, OutcomeSource
from lmrunner.state import LmRecord, Store
from tests.integration.conftest import REPO, drive

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def make_config(tmp_path: Path, script: str, **options: Any) -> Path:
    user_data = tmp_path / "user_data"
    user_data.write_text(script)
    factory = {
        "space": "docker.example.com",
        "hostname": "dockertest.example.com",
        "state_dir": str(tmp_path / "state"),
        "total_processors": 1,
        **options.pop("factory", {}),
    }
    machinetype = {
        "backend": "docker",
        "image": "docker://vcbusybox:latest",
        "user_data": str(user_data),
        "target_share": 1,
        "fizzle_seconds": 0,
        "stop_grace_seconds": 2,
        **options,
    }
    path = tmp_path / "lmrunner.yaml"
    path.write_text(yaml.safe_dump({"factory": factory, "machinetypes": {"dc": machinetype}}))
    return path


@pytest.fixture
def factory_of(docker_client: Any, vcbusybox: Path) -> Iterator[Callable[[Config], Factory]]:
    made: list[Factory] = []

    def make(config: Config) -> Factory:
        store = Store(config.factory.state_dir)
        cgroups = host_cgroups(config.factory)
        factory = Factory(
            config,
            store,
            make_backends({"docker"}, config.factory, cgroups),
            tuning=Tuning(reconcile_seconds=5),
            load_average=lambda: (0.0, 0.0, 0.0),
            cgroups=cgroups,
        )
        factory.adopt()
        made.append(factory)
        return factory

    yield make
    for factory in made:
        factory.remove_all()  # LMs outlive factories by design; tests must not leave them
        # A safety net on a fresh connection (the factory's may have died with dockerd).
        label = f"org.lmrunner.factory={factory.store.factory_id}"
        for container in docker_client.containers.list(all=True, filters={"label": label}):
            container.remove(force=True)
        factory.close()
        factory.store.close()


def first(factory: Factory) -> LmRecord:
    return sorted(factory.store.recent(), key=lambda r: r.created)[0]


def ended(factory: Factory, uuid: str) -> bool:
    record = factory.store.get(uuid)
    return record is not None and not record.active


def test_memory_hog_is_oom_killed_and_recorded_as_oom(
    tmp_path: Path, factory_of: Callable[[Config], Factory]
) -> None:
    # 64 MiB per processor; the payload's shell doubles a string until the kernel kills it.
    script = '#!/bin/sh\nx=0123456789\nwhile :; do x="$x$x"; done\n'
    config = load_config(make_config(tmp_path, script, factory={"mb_per_processor": 64}), cpus=1)
    factory = factory_of(config)
    drive(factory, lambda: bool(factory.store.recent()))
    lm = first(factory)
    drive(factory, lambda: ended(factory, lm.uuid))
    done = factory.store.get(lm.uuid)
    assert done is not None and done.outcome is not None
    assert done.outcome.source is OutcomeSource.OOM, done.outcome
    assert done.outcome.code == 700


def test_two_busy_loops_in_a_one_processor_lm_use_one_cpu(
    tmp_path: Path, factory_of: Callable[[Config], Factory], docker_client: Any
) -> None:
    script = "#!/bin/sh\n(while :; do :; done) & (while :; do :; done) & sleep 60\n"
    factory = factory_of(load_config(make_config(tmp_path, script), cpus=1))
    drive(factory, lambda: bool(factory.store.active()))
    record = factory.store.active()[0]
    assert record.handle is not None
    container = docker_client.containers.get(record.handle.data["id"])
    time.sleep(1.0)  # let both loops run

    def cpu_ns() -> int:
        return int(container.stats(stream=False)["cpu_stats"]["cpu_usage"]["total_usage"])

    start, started = cpu_ns(), time.monotonic()
    time.sleep(4.0)
    used = (cpu_ns() - start) / 1e9 / (time.monotonic() - started)
    print(f"two busy loops in a 1-processor LM: {used:.2f} CPUs")
    assert 0.7 < used < 1.15
    # The container sits in its LM's cgroup, which holds the limits and counts its usage.
    cgroup_parent = container.attrs["HostConfig"]["CgroupParent"]
    assert cgroup_parent == f"/lmrunner/lm-{record.uuid}"
    assert container.attrs["HostConfig"]["NanoCpus"] == 1_000_000_000
    assert container.attrs["HostConfig"]["SecurityOpt"] == ["no-new-privileges"]
    assert container.attrs["HostConfig"]["Privileged"] is False
    assert "NET_RAW" not in (container.attrs["HostConfig"]["CapAdd"] or [])


def test_daemon_killed_with_sigkill_adopts_its_container(
    tmp_path: Path, docker_client: Any, vcbusybox: Path
) -> None:
    script = (
        "#!/bin/sh\nsleep 6\necho '200 Intended work completed ok' > $JOBOUTPUTS/shutdown_message\n"
    )
    config = make_config(tmp_path, script)
    log = tmp_path / "daemon.log"
    state = tmp_path / "state"

    def daemon() -> subprocess.Popen[bytes]:
        with log.open("ab") as err:
            return subprocess.Popen(
                [sys.executable, "-m", "lmrunner", "daemon", "--config", str(config)], stderr=err
            )

    first_daemon = daemon()
    deadline = time.monotonic() + 30
    running: list[LmRecord] = []
    while time.monotonic() < deadline and not running:
        time.sleep(0.2)
        if (state / "lmrunner.db").exists():
            running = [
                r for r in Store(state, readonly=True).active() if r.state is LmState.RUNNING
            ]
    assert running, log.read_text()
    container_id = running[0].handle.data["id"] if running[0].handle else None
    first_daemon.send_signal(signal.SIGKILL)
    first_daemon.wait()
    second = daemon()
    try:
        deadline = time.monotonic() + 60
        store = Store(state, readonly=True)
        while time.monotonic() < deadline:
            record = store.get(running[0].uuid)
            if record is not None and not record.active:
                break
            time.sleep(0.2)
        record = store.get(running[0].uuid)
        assert record is not None and record.outcome is not None, log.read_text()
        assert record.outcome.message == "200 Intended work completed ok"
        assert record.handle is not None and record.handle.data["id"] == container_id  # adopted
        # Exactly one record for that LM, and its container is gone.
        assert [r.uuid for r in store.recent()].count(running[0].uuid) == 1
        # The daemon records the end first, then removes the container: give it a moment.
        deadline = time.monotonic() + 15
        while docker_client.containers.list(all=True, filters={"id": container_id}):
            assert time.monotonic() < deadline, "the finished LM's container was not removed"
            time.sleep(0.2)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
        # The second daemon went on starting LMs, which outlive it by design: remove them.
        factory_id = Store(state, readonly=True).factory_id
        label = f"org.lmrunner.factory={factory_id}"
        for container in docker_client.containers.list(all=True, filters={"label": label}):
            container.remove(force=True)
    assert "Traceback" not in log.read_text()


def test_dockerd_restart_ends_lms_with_a_site_outcome_and_the_factory_carries_on(
    tmp_path: Path, factory_of: Callable[[Config], Factory], docker_client: Any
) -> None:
    script = "#!/bin/sh\nsleep 600\n"
    factory = factory_of(load_config(make_config(tmp_path, script), cpus=1))
    drive(factory, lambda: bool(factory.store.active()))
    lm = factory.store.active()[0]
    pid = int(
        subprocess.run(
            ["pgrep", "-x", "dockerd"], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.2)
    # Start it again the way bootstrap does (no systemd here).
    subprocess.run(
        [REPO / "scripts" / "bootstrap"],
        check=True,
        capture_output=True,
        env={
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/bin",
            "LMRUNNER_BOOTSTRAP_SKIP": "packages apptainer kernel account venv images baseimage",
        },
    )
    docker_client.ping()
    drive(factory, lambda: ended(factory, lm.uuid), timeout=90)
    done = factory.store.get(lm.uuid)
    assert done is not None and done.outcome is not None
    assert (done.outcome.code, done.outcome.source) == (500, OutcomeSource.LOST), done.outcome
    # dockerd stops its containers (SIGTERM) before it closes its event stream: whether lmrunner
    # handles that exit before or after noticing the outage, the outcome names the site.
    assert done.outcome.text in (
        "Docker daemon restarted while the LM ran",
        "Stopped from outside lmrunner (exit status 143: dockerd or an admin)",
    ), done.outcome
    # The factory goes on starting LMs on the restarted daemon.
    drive(factory, lambda: any(r.state is LmState.RUNNING for r in factory.store.active()))


def test_image_that_cannot_be_pulled_is_a_clear_start_failure(
    tmp_path: Path, factory_of: Callable[[Config], Factory]
) -> None:
    path = make_config(tmp_path, "#!/bin/sh\n", image="docker://registry.invalid/nothing:1")
    factory = factory_of(load_config(path, cpus=1))
    factory.run_pass()
    record = first(factory)
    assert record.state is LmState.FAILED
    assert record.outcome is not None and record.outcome.source is OutcomeSource.START_FAILED
    assert "registry.invalid/nothing:1 is not here and cannot be pulled" in record.outcome.text


def test_lm_sees_its_hostname_binds_and_environment_and_its_log_is_kept(
    tmp_path: Path, factory_of: Callable[[Config], Factory]
) -> None:
    script = (
        "#!/bin/sh\necho payload-says-hello\n"
        'echo "$(hostname) $JOBFEATURES $(cat $JOBFEATURES/allocated_cpu)" > $JOBOUTPUTS/seen\n'
        "touch /scratch/x && echo scratch-writable >> $JOBOUTPUTS/seen\n"
        "touch /user_data 2>/dev/null || echo user_data-read-only >> $JOBOUTPUTS/seen\n"
        "touch /etc/jobfeatures/x 2>/dev/null || echo jobfeatures-read-only >> $JOBOUTPUTS/seen\n"
    )
    factory = factory_of(load_config(make_config(tmp_path, script, tmp_binds=["/scratch"]), cpus=1))
    drive(factory, lambda: bool(factory.store.recent()))
    lm = first(factory)
    drive(factory, lambda: ended(factory, lm.uuid))
    seen = (lm.directory / "joboutputs" / "seen").read_text().split("\n")
    assert seen[0] == f"{lm.name} /etc/jobfeatures 1"
    assert seen[1:4] == ["scratch-writable", "user_data-read-only", "jobfeatures-read-only"]
    # destroy() kept what the container printed before removing it.
    assert "payload-says-hello" in (lm.directory / "container.log").read_text()
    done = factory.store.get(lm.uuid)
    assert done is not None and done.outcome is not None
    assert done.outcome.message == "200 Intended work completed ok"
