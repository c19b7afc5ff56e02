"""lmrunner.spec without a Factory: plan (the record, its limits resolved once), build (the LM's
folder and the MachineSpec the backend gets), owner and image."""

from __future__ import annotations

import os
import pwd
import uuid as uuid_mod
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from lmrunner import payload, spec
from lmrunner.backends.base import LABEL_FACTORY, LABEL_NAME, LABEL_UUID, NoOptions
from lmrunner.backends.docker import DockerOptions
from lmrunner.backends.vm.plan import VmOptions
from lmrunner.config import Config
from lmrunner.errors import LmrunnerError
from lmrunner.lifecycle import LmState
from lmrunner.model import Limits
from lmrunner.slots import StartDecision
from tests.unit.test_factory import HOST, T0, Env, QuietFake

MIB = 1 << 20
DECISION = StartDecision("alpha", 2, T0 + 3600, "test")
OWNER = (os.getuid(), os.getgid())


class ScUserFake(QuietFake):
    runs_as_sc_user: ClassVar[bool] = True


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = Env(tmp_path)
    yield made
    made.close()


def config(env: Env, factory: dict[str, Any] | None = None, **alpha: Any) -> Config:
    return env.config(
        cpus=4,
        factory={"hs06_per_processor": 10.0, **(factory or {})},
        max_processors=2,
        **alpha,
    )


def files_dir(env: Env) -> Path:
    folder = env.state_dir / "machinetypes" / "alpha" / "files"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --- plan ----------------------------------------------------------------------------------------


def test_plan_makes_the_record_and_nothing_else(env: Env) -> None:
    made = config(env)
    planned = spec.plan(made, DECISION, env.backend, 3, T0 + 0.7)
    record = planned.record
    name = f"{HOST.split('.')[0]}-03.example.com"
    assert str(uuid_mod.UUID(record.uuid, version=4)) == record.uuid
    assert (record.name, record.machinetype, record.backend, record.slot) == (
        name,
        "alpha",
        "fake",
        3,
    )
    assert (record.processors, record.shutdown_time, record.created) == (2, T0 + 3600, T0 + 0.7)
    assert record.limits == Limits(
        processors=2,
        memory_bytes=2 * 2048 * MIB,
        swap_bytes=0,
        disk_bytes=2 * 40 * 10**9,
        hs06=20.0,
        pids=2 * 4096,
    )
    assert record.limits == payload.limits_for(made, made.machinetypes["alpha"], 2)
    assert record.hs06 == 20.0
    assert record.directory == (env.state_dir / "machines" / f"{T0}_alpha_{name}_{record.uuid[:8]}")
    assert record.state is LmState.CREATING
    assert (record.started, record.finished, record.handle, record.cgroup) == (None,) * 4
    assert (planned.identity.name, planned.identity.uuid, planned.identity.machinetype) == (
        name,
        record.uuid,
        "alpha",
    )
    assert planned.mt is made.machinetypes["alpha"]
    # Nothing exists yet: no folder, no row.
    assert not record.directory.exists()
    assert env.store.recent() == []


def test_each_plan_is_a_new_lm(env: Env) -> None:
    made = config(env)
    first = spec.plan(made, DECISION, env.backend, 0, float(T0)).record
    second = spec.plan(made, DECISION, env.backend, 0, float(T0)).record
    assert first.name == second.name
    assert first.uuid != second.uuid
    assert first.directory != second.directory


def test_without_hs06_per_processor_shares_count_one_per_processor(env: Env) -> None:
    made = env.config(cpus=4, max_processors=2)
    record = spec.plan(made, DECISION, env.backend, 0, float(T0)).record
    assert record.limits.hs06 is None
    assert record.hs06 == 2.0


def test_hs06_per_processor_zero_is_zero_everywhere(env: Env) -> None:
    made = config(env, factory={"hs06_per_processor": 0.0})
    record = spec.plan(made, DECISION, env.backend, 0, float(T0)).record
    assert record.limits.hs06 == 0.0
    assert record.hs06 == 0.0


def test_limits_are_computed_once_and_shared_by_record_folder_and_spec(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = config(env)
    computed: list[Limits] = []
    prepared: list[Limits] = []
    real_limits_for, real_prepare = payload.limits_for, payload.prepare

    def limits_for(*args: Any) -> Limits:
        computed.append(real_limits_for(*args))
        return computed[-1]

    def prepare(*args: Any, **kwargs: Any) -> payload.Prepared:
        prepared.append(kwargs["limits"])
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(payload, "limits_for", limits_for)
    monkeypatch.setattr(payload, "prepare", prepare)
    planned = spec.plan(made, DECISION, env.backend, 0, float(T0))
    machine = spec.build(made, planned, env.backend, factory_id="fid", owner=OWNER)
    assert len(computed) == 1
    assert planned.record.limits is computed[0]
    assert prepared == [computed[0]] and prepared[0] is computed[0]
    assert machine.limits is planned.record.limits


# --- build ---------------------------------------------------------------------------------------


def test_build_makes_the_folder_and_the_spec(env: Env) -> None:
    files = files_dir(env)
    (files / "root.img").write_text("image")
    made = config(
        env,
        image="root.img",
        container_command="/bin/pilot",
        capabilities=["SYS_ADMIN", "NET_ADMIN"],
        vm_initrd="initrd.img",
        vm_kernel_append="console=hvc0",
        vm_network="bridge:br-lm",
        stop_grace_seconds=45,
    )
    planned = spec.plan(made, DECISION, env.backend, 1, T0 + 0.9)
    record = planned.record
    machine = spec.build(made, planned, env.backend, factory_id="fid", owner=OWNER)

    assert (machine.uuid, machine.name, machine.machinetype) == (record.uuid, record.name, "alpha")
    assert machine.image == str(files / "root.img")
    assert machine.command == ("/bin/pilot",)
    assert machine.limits == record.limits
    assert machine.labels == {
        LABEL_FACTORY: "fid",
        LABEL_NAME: record.name,
        LABEL_UUID: record.uuid,
    }
    assert (machine.directory, machine.owner, machine.stop_grace_seconds) == (
        record.directory,
        OWNER,
        45,
    )
    assert machine.options == NoOptions()  # the fake backend declares none
    mt = made.machinetypes["alpha"]  # each backend's own, from the same checked machinetype
    assert DockerOptions.from_machinetype(mt, files) == DockerOptions(("SYS_ADMIN", "NET_ADMIN"))
    assert VmOptions.from_machinetype(mt, files) == VmOptions(
        vm_initrd=files / "initrd.img", vm_kernel_append="console=hvc0", vm_bridge="br-lm"
    )
    assert machine.cgroup is None  # made once the backend has validated the spec
    placement = env.backend.placement
    assert {(m.source, m.target, m.read_only) for m in machine.mounts} == {
        (record.directory / "user_data", placement.user_data, True),
        (record.directory / "machinefeatures", placement.machinefeatures, True),
        (record.directory / "jobfeatures", placement.jobfeatures, True),
        (record.directory / "joboutputs", placement.joboutputs, False),
    }
    # The MJF files announce the record's limits and times.
    job = record.directory / "jobfeatures"
    assert (job / "job_id").read_text() == record.uuid
    assert (job / "allocated_cpu").read_text() == "2\n"
    assert (job / "max_rss_bytes").read_text() == str(record.limits.memory_bytes)
    assert (job / "scratch_limit_bytes").read_text() == str(record.limits.disk_bytes)
    assert (job / "hs06_job").read_text() == "20"
    assert (job / "jobstart_secs").read_text() == str(T0)
    assert (job / "shutdowntime_job").read_text() == str(T0 + 3600)
    assert (record.directory / "machinefeatures" / "shutdowntime").read_text() == str(T0 + 3600)
    assert (record.directory / "joboutputs").is_dir()


def test_build_with_the_default_engine_options(env: Env) -> None:
    made = config(env)
    planned = spec.plan(made, DECISION, env.backend, 0, float(T0))
    machine = spec.build(made, planned, env.backend, factory_id="fid", owner=OWNER)
    assert machine.options == NoOptions()
    mt = made.machinetypes["alpha"]
    assert DockerOptions.from_machinetype(mt, files_dir(env)) == DockerOptions()
    assert VmOptions.from_machinetype(mt, files_dir(env)) == VmOptions(
        vm_initrd=None, vm_kernel_append="console=ttyS0 panic=-1", vm_bridge=None
    )
    assert machine.command == ("/user_data",)
    assert machine.image == made.machinetypes["alpha"].image  # a fake: reference, passed through


def test_an_absolute_initrd_is_kept(env: Env, tmp_path: Path) -> None:
    made = config(env, vm_initrd=str(tmp_path / "boot" / "initrd"))
    options = VmOptions.from_machinetype(made.machinetypes["alpha"], files_dir(env))
    assert options.vm_initrd == tmp_path / "boot" / "initrd"


def test_build_refuses_to_reuse_a_folder(env: Env) -> None:
    made = config(env)
    planned = spec.plan(made, DECISION, env.backend, 0, float(T0))
    planned.record.directory.mkdir(parents=True)
    with pytest.raises(FileExistsError):
        spec.build(made, planned, env.backend, factory_id="fid", owner=OWNER)


# --- owner ---------------------------------------------------------------------------------------


def test_the_factorys_own_account_unless_the_backend_runs_as_sc_user(env: Env) -> None:
    assert spec.owner(config(env), env.backend) == (os.getuid(), os.getgid())


def test_sc_user_is_looked_up(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def getpwnam(name: str) -> Any:
        asked.append(name)
        return SimpleNamespace(pw_uid=4321, pw_gid=8765)

    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    backend = ScUserFake(env.tmp_path / "engine")
    assert spec.owner(config(env, factory={"sc_user": "pilots"}), backend) == (4321, 8765)
    assert asked == ["pilots"]


def test_a_missing_sc_user_is_an_lmrunner_error(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def getpwnam(name: str) -> Any:
        raise KeyError(name)

    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    backend = ScUserFake(env.tmp_path / "engine")
    with pytest.raises(LmrunnerError, match=r"factory\.sc_user: no account 'nobody-here'"):
        spec.owner(config(env, factory={"sc_user": "nobody-here"}), backend)


# --- image ---------------------------------------------------------------------------------------


def test_image_resolution(tmp_path: Path) -> None:
    files = tmp_path / "files"
    (files / "sub").mkdir(parents=True)
    (files / "root.sif").write_text("")
    (files / "sub" / "disk.qcow2").write_text("")
    absolute = tmp_path / "elsewhere.img"
    absolute.write_text("")
    assert spec.image("docker://registry.example/pilot:1", files) == (
        "docker://registry.example/pilot:1"
    )
    assert spec.image("oras://registry.example/root.sif", files) == (
        "oras://registry.example/root.sif"
    )
    assert spec.image("root.sif", files) == str(files / "root.sif")
    assert spec.image("sub/disk.qcow2", files) == str(files / "sub" / "disk.qcow2")
    assert spec.image(str(absolute), files) == str(absolute)
    # Not a file here: an engine's own reference (a Docker image name), passed through.
    assert spec.image("centos:7", files) == "centos:7"
    assert spec.image("registry.example/pilot", files) == "registry.example/pilot"
    assert spec.image(str(tmp_path / "missing.img"), files) == str(tmp_path / "missing.img")
