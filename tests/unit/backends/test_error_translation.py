"""No engine, SDK or OS exception leaves a backend: every protocol method raises only lmrunner's
errors (chained from the cause, naming the LM), and ``probe`` never raises at all.

The errors injected are the real types: docker.errors.APIError with a 500 response, NotFound,
requests.ConnectionError, urllib3's ProtocolError (a stream cut off), OSError, an answer that is
not JSON; for Apptainer and VMs, handles and record files that are corrupt or an older
version's, and a QEMU that answers QMP with nonsense.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import pwd
import shutil
import socket
import threading
import uuid as uuid_mod
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import docker.errors
import pytest
import requests
import urllib3.exceptions

from lmrunner import process, untrusted
from lmrunner.backends import apptainer, vm
from lmrunner.backends import docker as docker_backend
from lmrunner.backends.apptainer import ApptainerBackend, LmPaths, labels_in_environ
from lmrunner.backends.base import (
    LABEL_FACTORY,
    LABEL_NAME,
    LABEL_UUID,
    EngineState,
    Handle,
    Health,
    MachineSpec,
    Probe,
)
from lmrunner.backends.docker import DockerBackend
from lmrunner.backends.fake import FakeBackend
from lmrunner.config import FactoryConfig
from lmrunner.errors import (
    BackendError,
    BackendUnavailable,
    MachineNotFound,
    SpecError,
    StartError,
)
from lmrunner.model import ETC_PLACEMENT, MIB, Limits, Mount
from lmrunner.process import ProcessId

UUID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
NAME = "factory-00.example.com"
CONTAINER = "c0ffee" * 10


def make_spec(directory: Path, image: str, **changes: Any) -> MachineSpec:
    values: dict[str, Any] = {
        "uuid": UUID,
        "name": NAME,
        "machinetype": "mt",
        "image": image,
        "command": ("/user_data",),
        "limits": Limits(1, 512 * MIB, 0, 0, None),
        "mounts": (Mount(directory / "joboutputs", ETC_PLACEMENT.joboutputs, read_only=False),),
        "env": {},
        "labels": {LABEL_FACTORY: "f1", LABEL_NAME: NAME, LABEL_UUID: UUID},
        "directory": directory,
        "owner": (os.getuid(), os.getgid()),
        "stop_grace_seconds": 5,
    }
    values.update(changes)
    return MachineSpec(**values)


def caused_by(
    err: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]
) -> bool:
    """Whether ``kind`` is in the ``raise ... from`` chain of ``err``."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, kind):
            return True
        cause = cause.__cause__
    return False


def outcomes(calls: Mapping[str, Callable[[], object]]) -> dict[str, Exception | None]:
    """Each call's exception (None when it returned)."""
    found: dict[str, Exception | None] = {}
    for name, call in calls.items():
        try:
            call()
        except Exception as err:
            found[name] = err
        else:
            found[name] = None
    return found


def assert_only_lmrunner_errors(found: Mapping[str, Exception | None], names_lm: bool) -> None:
    """validate: SpecError; start: StartError (or SpecError); the rest: BackendError; with the
    LM named in what recover, inspect, stop and destroy raise."""
    for method, err in found.items():
        if err is None:
            continue
        allowed: tuple[type[Exception], ...] = {
            "validate": (SpecError,),
            "start": (StartError, SpecError),
        }.get(method, (BackendError,))
        assert isinstance(err, allowed), f"{method} let out {type(err).__name__}: {err}"
        if names_lm and method in ("recover", "inspect", "stop", "kill", "destroy"):
            assert UUID in str(err), f"{method}: {err} does not name the LM"


# --- Docker ---------------------------------------------------------------------------------------


def response(status: int) -> requests.Response:
    made = requests.Response()
    made.status_code = status
    made.reason = {404: "Not Found", 409: "Conflict", 500: "Internal Server Error"}[status]
    made.url = f"http+docker://localhost/v1.43/containers/{CONTAINER}/json"
    return made


#: The errors the Docker SDK and its transport raise, made afresh for each call.
SDK_ERRORS: dict[str, Callable[[], Exception]] = {
    "api-500": lambda: docker.errors.APIError(
        "500 Server Error", response=response(500), explanation="driver failed"
    ),
    "not-found": lambda: docker.errors.NotFound(
        "404 Client Error", response=response(404), explanation=f"No such container: {CONTAINER}"
    ),
    "connection": lambda: requests.ConnectionError(
        "('Connection aborted.', FileNotFoundError(2, 'No such file or directory'))"
    ),
    "os-error": lambda: OSError(errno.ECONNRESET, "Connection reset by peer"),
    "stream-cut": lambda: urllib3.exceptions.ProtocolError("Response ended prematurely"),
    "not-json": lambda: requests.exceptions.JSONDecodeError("Expecting value", "<html>", 0),
    "bad-json": lambda: json.JSONDecodeError("Expecting value", "<html>", 0),
    "docker": lambda: docker.errors.DockerException("Error while fetching server API version"),
}
#: Every SDK call the backend makes, by the name the fakes below fail it under.
SDK_CALLS = (
    "connect", "version", "info", "images.get", "images.pull", "containers.create",
    "container.start", "containers.get", "containers.list", "container.labels",
    "container.kill", "container.logs", "container.logs.stream", "container.remove", "close",
)  # fmt: skip


class Engine:
    """Which SDK call fails, and with what."""

    def __init__(self, failing: Mapping[str, Callable[[], Exception]] | None = None) -> None:
        self.failing = dict(failing or {})
        self.calls: list[str] = []

    def call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.failing:
            raise self.failing[name]()


class FakeContainer:
    def __init__(self, engine: Engine, attrs: Any = None) -> None:
        self.engine = engine
        self.id = CONTAINER
        self.attrs = attrs if attrs is not None else {
            "State": {"Running": False, "Status": "exited", "ExitCode": 0, "OOMKilled": False,
                      "FinishedAt": "2026-01-01T00:00:00.123456789Z", "Error": ""}
        }  # fmt: skip
        self.chunks: list[bytes] = [b"payload-says-hello\n"]

    @property
    def labels(self) -> dict[str, str]:
        self.engine.call("container.labels")
        return {LABEL_UUID: UUID, LABEL_NAME: NAME, LABEL_FACTORY: "f1"}

    def start(self) -> None:
        self.engine.call("container.start")

    def kill(self, signal: str) -> None:
        self.engine.call("container.kill")

    def remove(self, force: bool) -> None:
        self.engine.call("container.remove")

    def logs(self, **kwargs: Any) -> Iterator[bytes]:
        assert kwargs["stream"] and not kwargs["follow"]  # bounded in memory, and finite
        self.engine.call("container.logs")
        return self._stream()

    def _stream(self) -> Iterator[bytes]:
        yield from self.chunks
        self.engine.call("container.logs.stream")  # a stream that breaks off at its end


class FakeContainers:
    def __init__(self, engine: Engine, container: FakeContainer) -> None:
        self.engine = engine
        self.container = container

    def get(self, container_id: str) -> FakeContainer:
        self.engine.call("containers.get")
        return self.container

    def list(self, **kwargs: Any) -> builtins.list[FakeContainer]:
        assert kwargs.get("ignore_removed") is True  # one removed meanwhile is no failure
        self.engine.call("containers.list")
        return [self.container]

    def create(self, image: str, command: builtins.list[str], **kwargs: Any) -> FakeContainer:
        self.engine.call("containers.create")
        return self.container


class FakeImages:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get(self, name: str) -> object:
        self.engine.call("images.get")
        if "images.pull" in self.engine.failing:  # absent, so that it is pulled
            raise docker.errors.ImageNotFound("No such image", response=response(404))
        return object()

    def pull(self, name: str) -> object:
        self.engine.call("images.pull")
        return object()


class FakeClient:
    def __init__(self, engine: Engine, container: FakeContainer) -> None:
        self.engine = engine
        self.containers = FakeContainers(engine, container)
        self.images = FakeImages(engine)

    def version(self) -> dict[str, str]:
        self.engine.call("version")
        return {"ApiVersion": "1.43", "Version": "24.0.7"}

    def info(self) -> dict[str, str]:
        self.engine.call("info")
        return {"CgroupDriver": "cgroupfs"}

    def close(self) -> None:
        self.engine.call("close")


def docker_with(engine: Engine, container: FakeContainer | None = None) -> DockerBackend:
    made = container or FakeContainer(engine)

    def connect() -> FakeClient:
        engine.call("connect")
        return FakeClient(engine, made)

    return DockerBackend(client_factory=connect)


def docker_calls(backend: DockerBackend, spec: MachineSpec, handle: Handle) -> dict[str, Any]:
    return {
        "validate": lambda: backend.validate(spec),
        "start": lambda: backend.start(spec),
        "recover": lambda: backend.recover(UUID, handle),
        "inspect": lambda: backend.inspect(UUID, handle),
        "stop": lambda: backend.stop(UUID, handle),
        "kill": lambda: backend.stop(UUID, handle, force=True),
        "destroy": lambda: backend.destroy(UUID, handle),
        "list_owned": backend.list_owned,
        "memory_overhead": backend.memory_overhead,
        "close": backend.close,
    }


@pytest.mark.parametrize("error", sorted(SDK_ERRORS))
@pytest.mark.parametrize("failing", SDK_CALLS)
def test_no_docker_sdk_error_leaves_the_backend(tmp_path: Path, failing: str, error: str) -> None:
    engine = Engine({failing: SDK_ERRORS[error]})
    backend = docker_with(engine)
    probe = backend.probe()  # never raises
    assert isinstance(probe, Probe)
    if failing in ("connect", "version", "info"):
        assert probe.health is Health.UNAVAILABLE and probe.detail.startswith("unavailable: ")
    spec = make_spec(tmp_path, "docker://vcbusybox:latest")
    handle = Handle(1, {"id": CONTAINER, "directory": str(tmp_path)})
    found = outcomes(docker_calls(backend, spec, handle))
    assert_only_lmrunner_errors(found, names_lm=True)
    injected = type(SDK_ERRORS[error]())
    for method, err in found.items():
        if err is not None:
            assert caused_by(err, injected), f"{method}: {err!r} is not chained from the cause"
    if found["start"] is not None:
        assert NAME in str(found["start"]), found["start"]
    if failing == "connect" and error != "not-found":
        assert found["start"] is not None and NAME in str(found["start"])
        assert isinstance(found["list_owned"], BackendUnavailable)


def test_stop_passes_a_conflict_but_no_server_error(tmp_path: Path) -> None:
    conflict = Engine({"container.kill": lambda: docker.errors.APIError("409", response(409))})
    docker_with(conflict).stop(UUID, Handle(1, {"id": CONTAINER}))  # not running: no error
    broken = Engine({"container.kill": SDK_ERRORS["api-500"]})
    with pytest.raises(BackendError, match=f"cannot signal the container of LM {UUID}") as caught:
        docker_with(broken).stop(UUID, Handle(1, {"id": CONTAINER}), force=True)
    assert isinstance(caught.value.__cause__, docker.errors.APIError)


def test_destroy_tells_a_removal_that_failed_and_takes_a_gone_container_as_done(
    tmp_path: Path,
) -> None:
    handle = Handle(1, {"id": CONTAINER, "directory": str(tmp_path)})
    with pytest.raises(BackendError, match=f"cannot remove the container of LM {UUID}"):
        docker_with(Engine({"container.remove": SDK_ERRORS["connection"]})).destroy(UUID, handle)
    docker_with(Engine({"container.remove": SDK_ERRORS["not-found"]})).destroy(UUID, handle)
    docker_with(Engine({"containers.get": SDK_ERRORS["not-found"]})).destroy(UUID, handle)


@pytest.mark.parametrize(
    "data",
    [{}, {"id": 42}, {"id": ""}, {"id": None, "directory": "/nonexistent"}],
    ids=["no-id", "int-id", "empty-id", "none-id"],
)
def test_a_corrupt_docker_handle_is_a_backend_error(tmp_path: Path, data: dict[str, Any]) -> None:
    backend = docker_with(Engine())
    handle = Handle(1, data)
    found = outcomes(docker_calls(backend, make_spec(tmp_path, "docker://x"), handle))
    assert_only_lmrunner_errors(found, names_lm=True)
    for method in ("recover", "inspect", "stop", "kill", "destroy"):
        assert isinstance(found[method], BackendError)
        assert "its handle names no container" in str(found[method])


@pytest.mark.parametrize(
    "attrs",
    [{}, {"State": None}, {"State": "exited"}, ["State"]],
    ids=["no-state", "none", "text", "list"],
)
def test_an_inspect_answer_of_the_wrong_shape_is_a_backend_error(attrs: Any) -> None:
    engine = Engine()
    backend = docker_with(engine, FakeContainer(engine, attrs))
    with pytest.raises(BackendError, match=f"LM {UUID}: Docker tells no state"):
        backend.inspect(UUID, Handle(1, {"id": CONTAINER}))


def test_odd_state_values_are_not_taken_for_facts() -> None:
    engine = Engine()
    attrs = {"State": {"Running": False, "ExitCode": "137", "OOMKilled": "yes", "Error": 5}}
    status = docker_with(engine, FakeContainer(engine, attrs)).inspect(UUID, Handle(1, {"id": "x"}))
    assert (status.state, status.exit_code, status.oom_killed, status.detail) == (
        EngineState.EXITED, None, False, "5")  # fmt: skip


def test_the_log_is_kept_atomically_and_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(docker_backend, "LOG_LIMIT_BYTES", 1000)
    engine = Engine()
    container = FakeContainer(engine)
    container.chunks = [bytes([65 + i % 26]) * 300 for i in range(40)]  # 12 000 bytes
    (tmp_path / "container.log").write_text("an earlier daemon's")
    docker_with(engine, container).destroy(UUID, Handle(1, {"id": "x", "directory": str(tmp_path)}))
    kept = (tmp_path / "container.log").read_bytes()
    assert kept == b"".join(container.chunks)[-1000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["container.log"]  # no temporary file
    assert engine.calls[-1] == "container.remove"


def test_a_log_that_cannot_be_kept_does_not_keep_the_container(tmp_path: Path) -> None:
    engine = Engine({"container.logs.stream": SDK_ERRORS["stream-cut"]})
    handle = Handle(1, {"id": "x", "directory": str(tmp_path)})
    docker_with(engine).destroy(UUID, handle)
    assert "container.remove" in engine.calls
    assert not (tmp_path / "container.log").exists()  # nothing torn either


@pytest.mark.parametrize(
    ("event", "uuid"),
    [
        ({"status": "die", "Actor": {"Attributes": {LABEL_UUID: UUID}}}, UUID),
        ({"status": "start", "Actor": {"Attributes": {LABEL_UUID: UUID}}}, None),
        ({"status": "die", "Actor": None}, None),
        ({"status": "die", "Actor": {"Attributes": ["x"]}}, None),
        ({"status": "die", "Actor": {"Attributes": {LABEL_UUID: 7}}}, None),
        (["die"], None),
        ("die", None),
    ],
)
def test_events_of_any_shape_never_stop_the_watcher(event: Any, uuid: str | None) -> None:
    assert docker_backend._ended_uuid(event) == uuid


def test_the_docker_probe_never_raises_even_on_a_surprise() -> None:
    class Odd:
        def version(self) -> object:
            raise RuntimeError("surprise")

    probe = DockerBackend(client_factory=Odd).probe()
    assert probe.health is Health.UNAVAILABLE and "surprise" in probe.detail

    class Strange:
        def version(self) -> object:
            return ["not", "a", "mapping"]

    probe = DockerBackend(client_factory=Strange).probe()
    assert probe.health is Health.UNAVAILABLE and "API 0.0 older than 1.40" in probe.detail


# --- Apptainer --------------------------------------------------------------------------------


class NullSupervisor:
    def spawn(self, key: str, argv: Any, **kwargs: Any) -> ProcessId:
        raise AssertionError("not started in these tests")

    def adopt(self, key: str, pid: ProcessId) -> bool:
        return True

    def watch(self, notify: Callable[[str], None]) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LM process is alive (the identity checks never see this host's)."""
    monkeypatch.setattr(apptainer.driver, "alive", lambda p: False)
    monkeypatch.setattr("lmrunner.process.identify", lambda pid: None)
    monkeypatch.setattr(process, "alive", lambda p: False)


def apptainer_backend(
    tmp_path: Path, processes: apptainer.driver.ProcessLister = lambda uid: []
) -> ApptainerBackend:
    factory = FactoryConfig(space="sc.example.com", state_dir=tmp_path / "state",
                            sc_user="lmrunner-sc")  # fmt: skip
    return ApptainerBackend(
        factory,
        None,
        supervisor=NullSupervisor(),  # type: ignore[arg-type]
        which=lambda name: None,
        processes=processes,
        search_dirs=(),
    )


def lm_calls(backend: Any, handle: Handle) -> dict[str, Callable[[], object]]:
    return {
        "recover": lambda: backend.recover(UUID, handle),
        "inspect": lambda: backend.inspect(UUID, handle),
        "stop": lambda: backend.stop(UUID, handle),
        "kill": lambda: backend.stop(UUID, handle, force=True),
        "destroy": lambda: backend.destroy(UUID, handle),
        "list_owned": backend.list_owned,
    }


@pytest.mark.parametrize(
    "data",
    [
        {"pid": "not-a-pid", "start_ticks": 1},
        {"pid": [4242], "start_ticks": 7},
        {"pid": 4242, "start_ticks": {"x": 1}},
        {"pid": 4242, "start_ticks": 7, "directory": 42},
        {"orphan": True, "pids": 7},
        {"orphan": True, "pids": [["a", "b"]]},
        {"orphan": True, "pids": [[1]]},
    ],
    ids=["text-pid", "list-pid", "dict-ticks", "int-directory", "int-pids", "text-pids", "short"],
)
@pytest.mark.usefixtures("no_processes")
def test_a_corrupt_apptainer_handle_is_a_backend_error(
    tmp_path: Path, data: dict[str, Any]
) -> None:
    backend = apptainer_backend(tmp_path)
    backend.state_dir.mkdir(parents=True)
    (backend.state_dir / f"{UUID}.json").write_text(json.dumps({"uuid": UUID, "labels": {}}))
    found = outcomes(lm_calls(backend, Handle(1, data)))
    assert_only_lmrunner_errors(found, names_lm=True)
    raised = [err for err in found.values() if err is not None]
    assert raised, "the corrupt handle went unnoticed"
    told = [err for err in raised if not isinstance(err, MachineNotFound)]  # no process named
    assert all(caused_by(err, (ValueError, TypeError)) for err in told), told


#: Record files as a crash, a hand edit or an older version may leave them.
BAD_RECORDS: dict[str, bytes | None] = {
    "not-json": b"{not json",
    "a-list": b"[]",
    "labels-int": b'{"labels": 5, "pid": 1, "start_ticks": 1, "directory": null, "cgroup": null}',
    "pid-text": b'{"labels": {}, "pid": "x", "start_ticks": 1, "directory": null, "cgroup": null}',
    "directory-int": b'{"labels": {}, "directory": 7}',
    "not-utf8": b"\xff\xfe\x00garbage",
    "a-folder": None,  # a directory where the file should be
}


@pytest.mark.parametrize("content", sorted(BAD_RECORDS))
@pytest.mark.usefixtures("no_processes")
def test_a_corrupt_apptainer_record_is_never_a_raw_error(tmp_path: Path, content: str) -> None:
    backend = apptainer_backend(tmp_path)
    record = backend.state_dir / f"{UUID}.json"
    record.parent.mkdir(parents=True)
    data = BAD_RECORDS[content]
    if data is None:
        record.mkdir()
    else:
        record.write_bytes(data)
    owned = backend.list_owned()  # an unreadable record is skipped (and logged)
    assert all(isinstance(o.uuid, str) for o in owned)
    for entry in owned:  # what it did list must not break the next calls either
        assert_only_lmrunner_errors(outcomes(lm_calls(backend, entry.handle)), names_lm=True)
    found = outcomes(lm_calls(backend, Handle(1, {})))  # a handle of an older version: no data
    assert_only_lmrunner_errors(found, names_lm=True)
    if data is not None:
        assert found["destroy"] is None and not record.exists()  # destroy still cleans up
    else:
        assert isinstance(found["destroy"], BackendError)
        assert caused_by(found["destroy"], OSError)


def test_labels_nested_beyond_any_engine_config_are_no_labels() -> None:
    deep = "[" * 900 + '{"x": "LMRUNNER_LM_UUID"}' + "]" * 900
    for config in ("[" * 100_000 + "LMRUNNER_LM_UUID", deep):
        environ = {"NOTE": "LMRUNNER_LM_UUID", "ENGINE_CONFIG1": config}
        assert labels_in_environ(environ) is None


@pytest.mark.usefixtures("no_processes")
def test_a_payload_process_with_hostile_labels_breaks_no_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sc_uid = 4711
    monkeypatch.setattr(pwd, "getpwnam", lambda name: type("pw", (), {"pw_uid": sc_uid}))
    hostile = [
        {"ENGINE_CONFIG1": "[" * 100_000 + "LMRUNNER_LM_UUID"},
        {"ENGINE_CONFIG\u00b2": "LMRUNNER_LM_UUID", "ENGINE_CONFIG\u0663": "x"},  # not ASCII digits
        {"LMRUNNER_LM_UUID": "\udcff", "LMRUNNER_BACKEND": "apptainer", "LMRUNNER_FACTORY": "f"},
    ]
    backend = apptainer_backend(
        tmp_path, lambda uid: [(ProcessId(300 + i, 1), env) for i, env in enumerate(hostile)]
    )
    assert backend.list_owned() == []


@pytest.mark.usefixtures("no_processes")
def test_destroy_removes_the_payloads_folders_without_following_its_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    removed: list[Path] = []
    real = untrusted.remove_tree

    def remove_tree(path: Path) -> None:
        removed.append(path)
        real(path)

    monkeypatch.setattr(untrusted, "remove_tree", remove_tree)
    outside = tmp_path / "host"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    paths = LmPaths(tmp_path / "lm")
    for folder in (paths.workdir, paths.tmpdir):
        folder.mkdir(parents=True)
    (paths.workdir / "escape").symlink_to(outside)  # planted by the payload
    (paths.workdir / "file").symlink_to(outside / "precious")
    backend = apptainer_backend(tmp_path)
    backend.destroy(UUID, Handle(1, {"directory": str(paths.directory)}))
    assert removed == [paths.workdir, paths.tmpdir]
    assert not paths.workdir.exists() and not paths.tmpdir.exists()
    assert (outside / "precious").read_text() == "keep"


def test_an_apptainer_path_that_cannot_be_looked_at_is_a_spec_error(tmp_path: Path) -> None:
    backend = apptainer_backend(tmp_path)
    spec = make_spec(tmp_path, "/" + "a" * 5000, owner=(4711, 4711))  # ENAMETOOLONG
    with pytest.raises(SpecError, match="File name too long"):
        backend.validate(spec)


def test_the_apptainer_probe_never_raises_even_on_a_surprise(tmp_path: Path) -> None:
    def which(name: str) -> str | None:
        raise RuntimeError("surprise")

    backend = apptainer_backend(tmp_path)
    backend._which = which
    probe = backend.probe()
    assert probe.health is Health.UNAVAILABLE and "surprise" in probe.detail


# --- VM -------------------------------------------------------------------------------------------


def vm_backend(tmp_path: Path, accel: str = "tcg") -> vm.VmBackend:
    factory = FactoryConfig(space="vm.example.com", state_dir=tmp_path / "state", vm_accel=accel)
    return vm.VmBackend(factory, supervisor=NullSupervisor())  # type: ignore[arg-type]


def write_record(backend: vm.VmBackend, data: bytes | None) -> Path:
    vm_dir = backend.root / UUID
    vm_dir.mkdir(parents=True)
    if data is None:
        (vm_dir / vm.RECORD).mkdir()
    else:
        (vm_dir / vm.RECORD).write_bytes(data)
    return vm_dir


VM_BAD_RECORDS: dict[str, bytes | None] = {
    "not-json": b"{not json",
    "a-list": b"[]",
    "another-lm": json.dumps({"uuid": str(uuid_mod.uuid4())}).encode(),
    "no-uuid": b'{"pid": 4242}',  # an older version's
    "not-utf8": b"\xff\xfe\x00garbage",
    "a-folder": None,
}


@pytest.mark.parametrize("content", sorted(VM_BAD_RECORDS))
@pytest.mark.usefixtures("no_processes")
def test_a_corrupt_vm_record_is_a_backend_error_where_it_is_needed(
    tmp_path: Path, content: str
) -> None:
    backend = vm_backend(tmp_path)
    vm_dir = write_record(backend, VM_BAD_RECORDS[content])
    handle = Handle(1, {"pid": None, "start_ticks": None, "vm_dir": str(vm_dir)})
    assert backend.list_owned() == []  # skipped, logged
    found = outcomes(lm_calls(backend, handle))
    assert_only_lmrunner_errors(found, names_lm=True)
    for method in ("recover", "inspect"):  # they need the record: corrupt is not missing
        assert isinstance(found[method], BackendError)
        assert not isinstance(found[method], MachineNotFound)
    # stop and destroy work from the handle: the LM can still be killed and removed
    assert (found["stop"], found["kill"], found["destroy"]) == (None, None, None)
    assert not vm_dir.exists()
    assert backend.inspect(UUID, handle).state is EngineState.MISSING


@pytest.mark.parametrize(
    "data",
    [
        {"pid": "x", "start_ticks": 1},
        {"pid": 4242, "start_ticks": [1]},
        {"pid": 4242j, "start_ticks": 1},
    ],
    ids=["text-pid", "list-ticks", "complex-pid"],
)
@pytest.mark.usefixtures("no_processes")
def test_a_corrupt_vm_handle_is_a_backend_error(tmp_path: Path, data: dict[str, Any]) -> None:
    backend = vm_backend(tmp_path)
    write_record(backend, json.dumps({"uuid": UUID, "labels": {}, "pid": None}).encode())
    found = outcomes(lm_calls(backend, Handle(1, data)))
    assert_only_lmrunner_errors(found, names_lm=True)
    for method in ("recover", "inspect", "stop", "kill", "destroy"):
        assert isinstance(found[method], BackendError), method


@pytest.mark.parametrize("uuid", ["", ".", "..", "../vm", "0A1B2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D"])
def test_a_vm_uuid_is_never_a_path(tmp_path: Path, uuid: str) -> None:
    backend = vm_backend(tmp_path)
    backend.root.mkdir(parents=True)
    (backend.root / "accel.json").write_text("{}")
    for call in (backend.destroy, backend.inspect, backend.recover, backend.stop):
        with pytest.raises(BackendError, match="not an LM uuid"):
            call(uuid, Handle(1, {}))
    assert (backend.root / "accel.json").exists()  # destroy("") did not remove the vm root


def serve_qmp(vm_dir: Path, last_answer: bytes) -> Callable[[], None]:
    """A QMP socket that greets, takes qmp_capabilities, then answers ``last_answer``."""
    fd = os.open(vm_dir, os.O_PATH | os.O_DIRECTORY)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"/proc/self/fd/{fd}/{vm.QMP_SOCKET}")
    server.listen(1)
    greeting = b'{"QMP": {"version": {}, "capabilities": []}}\r\n'

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            try:  # one command at a time, each sent whole (with or without a newline)
                conn.sendall(greeting)
                conn.recv(65536)
                conn.sendall(b'{"return": {}}\r\n')
                conn.recv(65536)
                conn.sendall(last_answer)
            except OSError:  # the backend hung up first (the endless answer)
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def close() -> None:
        server.close()
        os.close(fd)
        thread.join(timeout=5)

    return close


@pytest.mark.parametrize(
    "answer",
    [
        b'{"error": "not an object"}\r\n',
        b'{"error": ["x"]}\r\n',
        b"[1, 2]\r\n",
        b"{" + b"x" * (vm.QMP_LINE_LIMIT + 10),  # endless: never held whole
        b"",  # QEMU hung up
    ],
    ids=["error-text", "error-list", "not-object", "endless", "hang-up"],
)
def test_a_qmp_answer_of_any_shape_is_a_backend_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: bytes
) -> None:
    backend = vm_backend(tmp_path)
    vm_dir = write_record(backend, json.dumps({"uuid": UUID, "labels": {}}).encode())
    monkeypatch.setattr(process, "alive", lambda p: p == ProcessId(4242, 77))
    close = serve_qmp(vm_dir, answer)
    try:
        with pytest.raises(BackendError, match=f"LM {UUID}: cannot press the power button"):
            backend.stop(UUID, Handle(1, {"pid": 4242, "start_ticks": 77}))
    finally:
        close()


def test_without_pidfd_open_a_vm_is_killed_by_its_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pidfd(pid: int) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    monkeypatch.setattr(process, "alive", lambda p: p == ProcessId(4242, 77))
    backend = vm_backend(tmp_path)
    backend._kill(ProcessId(4242, 77))
    backend._kill(ProcessId(4242, 78))  # the pid is another process now: left alone
    assert killed == [(4242, 9)]


def test_a_vm_image_that_cannot_be_looked_at_is_a_spec_error(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "/" + "a" * 5000)  # ENAMETOOLONG
    with pytest.raises(SpecError, match="cannot look at it"):
        vm_backend(tmp_path).validate(spec)


def test_qemu_missing_or_broken_makes_the_vm_backend_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    backend = vm_backend(tmp_path, accel="auto")
    with pytest.raises(BackendUnavailable, match="qemu-system-x86_64 not found"):
        backend.memory_overhead()
    assert backend.probe().health is Health.UNAVAILABLE

    def surprise() -> tuple[str, str]:
        raise RuntimeError("surprise")

    monkeypatch.setattr(backend, "_qemu", surprise)
    probe = backend.probe()
    assert probe.health is Health.UNAVAILABLE and "surprise" in probe.detail


def test_a_shutdown_reason_of_the_wrong_type_is_no_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "alive", lambda p: False)
    backend = vm_backend(tmp_path)
    vm_dir = write_record(backend, json.dumps({"uuid": UUID, "labels": {}}).encode())
    (vm_dir / vm.SHUTDOWN).write_text(json.dumps({"reason": ["guest-shutdown"]}))
    (vm_dir / vm.EXIT).write_text(json.dumps({"exit_code": 0, "ended_at": 1.0}))
    status = backend.inspect(UUID, Handle(1, {"pid": 4242, "start_ticks": 77}))
    assert (status.state, status.exit_code) == (EngineState.EXITED, 0)


# --- the fake ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    ["{not json", "[]", "{}", '{"uuid": 1, "script": 5, "started": "x"}'],
    ids=["not-json", "list", "empty", "wrong-types"],
)
def test_a_corrupt_fake_entry_is_a_backend_error(tmp_path: Path, entry: str) -> None:
    backend = FakeBackend(tmp_path / "engine")
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / f"{UUID}.json").write_text(entry)
    found = outcomes(lm_calls(backend, Handle(1, {"uuid": UUID})))
    assert_only_lmrunner_errors(found, names_lm=True)
    assert found["destroy"] is None


def test_a_fake_lm_without_joboutputs_does_not_start(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "fake:seconds=1", mounts=(Mount(tmp_path, PurePosixPath("/x")),))
    with pytest.raises(StartError, match="no joboutputs mount"):
        FakeBackend(tmp_path / "engine").start(spec)
