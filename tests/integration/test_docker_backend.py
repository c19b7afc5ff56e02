"""The Docker backend on the real dockerd: limits, OOM, adoption after kill -9, dockerd restart.

The life-cycle scenarios shared with every backend are in tests/contract/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmrunner.config import Config
from lmrunner.factory import Factory
from lmrunner.lifecycle import LmState, OutcomeSource
from lmrunner.loader import load_config
from lmrunner.state import Store
from tests.integration.conftest import (
    REPO,
    SLEEP_THEN_200,
    Factories,
    daemon_killed_and_restarted,
    drive,
    ended,
    first,
)

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


def remove_containers(docker_client: Any, factory_id: str) -> None:
    """Remove every container labelled with ``factory_id``, on the given connection."""
    label = f"org.lmrunner.factory={factory_id}"
    for container in docker_client.containers.list(all=True, filters={"label": label}):
        container.remove(force=True)


@pytest.fixture
def factory_of(docker_client: Any, vcbusybox: Path) -> Iterator[Callable[[Config], Factory]]:
    # After remove_all, a safety net on a fresh connection (the factory's may have died with
    # dockerd).
    factories = Factories(
        "docker", after_remove=lambda f: remove_containers(docker_client, f.store.factory_id)
    )
    yield factories.make
    factories.close()


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
    config = make_config(tmp_path, SLEEP_THEN_200)
    log = tmp_path / "daemon.log"
    state = tmp_path / "state"
    try:
        with daemon_killed_and_restarted(config, state, log) as (running, done):
            container_id = running.handle.data["id"] if running.handle else None
            assert done.handle is not None and done.handle.data["id"] == container_id  # adopted
            # The daemon records the end first, then removes the container: give it a moment.
            deadline = time.monotonic() + 15
            while docker_client.containers.list(all=True, filters={"id": container_id}):
                assert time.monotonic() < deadline, "the finished LM's container was not removed"
                time.sleep(0.2)
    finally:
        # The second daemon went on starting LMs, which outlive it by design: remove them.
        remove_containers(docker_client, Store(state, readonly=True).factory_id)


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
        "Stopped from outside lmrunner (exit status 143: SIGTERM, by the host or an admin)",
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
