"""The Apptainer backend without apptainer: argv, env file, validation, records, exits, orphans.

The engine, the supervisor, the subprocess runner, the cgroup controller and the host's
processes are fakes (the psutil scan of the real ones is tested on this test's own processes);
the real engine is exercised by tests/integration/test_apptainer_backend.py.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import uuid as uuid_mod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import psutil
import pytest

from lmrunner import runner
from lmrunner.backends.apptainer import (
    PLACEMENT,
    ApptainerBackend,
    LmPaths,
    build_argv,
    driver,
    env_file_text,
    labels_in_environ,
    needs_env_hook,
    orphans,
    parse_version,
    validate,
)
from lmrunner.backends.base import (
    LABEL_FACTORY,
    LABEL_NAME,
    LABEL_UUID,
    EngineState,
    Health,
    LmCgroup,
    MachineSpec,
)
from lmrunner.cgroups.base import CgroupRef, Usage
from lmrunner.config import FactoryConfig
from lmrunner.errors import (
    BackendError,
    CommandError,
    MachineNotFound,
    SpecError,
    StartError,
)
from lmrunner.model import Handle, Limits, Mount
from lmrunner.process import ProcessId, identify, shell_status
from lmrunner.spec import image as spec_image

#: An account for the LMs: not root, and one the test process may chown to.
OWNER = (54321, 54321) if os.getuid() == 0 else (os.getuid(), os.getgid())


# --- fakes --------------------------------------------------------------------------------------


class FakeSupervisor:
    """Records spawns; ``exit(key)`` plays the waiting thread (status file, then notify)."""

    def __init__(self, *, fail: bool = False, adoptable: bool = True) -> None:
        self.fail = fail
        self.adoptable = adoptable
        self.spawned: list[dict[str, Any]] = []
        self.adopted: list[tuple[str, ProcessId]] = []
        self.notify: Callable[[str], None] | None = None
        self.closed = False

    def spawn(self, key: str, argv: Sequence[str | Path], **kwargs: Any) -> ProcessId:
        if self.fail:
            raise CommandError(tuple(map(str, argv)), None, "", "cannot start: no such file")
        self.spawned.append({"key": key, "argv": [str(a) for a in argv], **kwargs})
        return ProcessId(4242, 777)

    def adopt(self, key: str, process: ProcessId) -> bool:
        self.adopted.append((key, process))
        return self.adoptable

    def watch(self, notify: Callable[[str], None]) -> None:
        self.notify = notify

    def close(self) -> None:
        self.closed = True

    def exit(self, key: str, code: int | None, status_file: Path) -> None:
        status_file.write_text(json.dumps({"exit_code": code, "ended_at": 1000.0}))
        assert self.notify is not None
        self.notify(key)


class FakeCgroups:
    version = 1

    def __init__(self, oom_kills: int = 0) -> None:
        self.oom_kills = oom_kills
        self.calls: list[tuple[str, Any]] = []

    def signal(self, ref: CgroupRef, signum: int) -> int:
        self.calls.append(("signal", signum))
        return 3

    def kill(self, ref: CgroupRef, *, timeout: float = 10.0) -> None:
        self.calls.append(("kill", ref.name))

    def usage(self, ref: CgroupRef) -> Usage:
        return Usage(1.0, 0, None, self.oom_kills, 0, 0.0)


def fake_run(stdout: str = "apptainer version 1.4.5\n", error: Exception | None = None) -> Any:
    calls: list[tuple[list[str], dict[str, Any]]] = []

    def run(argv: Sequence[str | Path], **kwargs: Any) -> runner.Completed:
        calls.append(([str(a) for a in argv], kwargs))
        if error is not None:
            raise error
        if "pull" in [str(a) for a in argv]:
            Path(argv[-2]).write_text("SIF")  # the partial file apptainer would write
        return runner.Completed(tuple(map(str, argv)), 0, stdout, "", 0.01)

    run.calls = calls  # type: ignore[attr-defined]
    return run


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    root = tmp_path / "image"
    (root / ".singularity.d" / "env").mkdir(parents=True)
    (root / "bin").mkdir()
    return root


@pytest.fixture
def lm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "machines" / "lm"
    for sub in ("machinefeatures", "jobfeatures", "joboutputs"):
        (directory / sub).mkdir(parents=True)
    (directory / "user_data").write_text("#!/bin/sh\n")
    for path in [directory, *directory.parents]:
        if path == tmp_path.parent:
            break
        path.chmod(0o755)
    # pytest's own folders above tmp_path are its user's alone (0700): the reachability check
    # looks from tmp_path down.
    monkeypatch.setattr(
        validate,
        "_folders_above",
        lambda path: [p for p in reversed(path.parents) if p.is_relative_to(tmp_path)],
    )
    return directory


def make_spec(lm_dir: Path, image: str, **changes: Any) -> MachineSpec:
    uuid = changes.pop("uuid", str(uuid_mod.uuid4()))
    values: dict[str, Any] = {
        "uuid": uuid,
        "name": "lm-00.example.com",
        "machinetype": "sc",
        "image": image,
        "command": ("/user_data",),
        "limits": Limits(1, 2**30, 0, 0, None),
        "mounts": (
            Mount(lm_dir / "user_data", PLACEMENT.user_data),
            Mount(lm_dir / "machinefeatures", PLACEMENT.machinefeatures),
            Mount(lm_dir / "jobfeatures", PLACEMENT.jobfeatures),
            Mount(lm_dir / "joboutputs", PLACEMENT.joboutputs, read_only=False),
        ),
        "env": {"JOBOUTPUTS": "/tmp/joboutputs", "ODD": "a b,c$HOME'q"},
        "labels": {LABEL_FACTORY: "factory-1", LABEL_NAME: "lm-00.example.com", LABEL_UUID: uuid},
        "directory": lm_dir,
        "owner": OWNER,
        "stop_grace_seconds": 5,
    }
    values.update(changes)
    return MachineSpec(**values)


def make_backend(
    tmp_path: Path,
    *,
    supervisor: FakeSupervisor | None = None,
    run: Any = None,
    cgroups: Any = None,
    which: Callable[[str], str | None] = lambda name: f"/opt/bin/{name}",
    sc_user: str = "lmrunner-sc",
    processes: driver.ProcessLister = lambda uid: [],
) -> ApptainerBackend:
    factory = FactoryConfig(space="sc.example.com", state_dir=tmp_path / "state", sc_user=sc_user)
    return ApptainerBackend(
        factory,
        cgroups,
        supervisor=supervisor or FakeSupervisor(),  # type: ignore[arg-type]
        run=run or fake_run(),
        which=which,
        processes=processes,
        search_dirs=(),
    )


@pytest.fixture
def process_state(monkeypatch: pytest.MonkeyPatch) -> dict[int, ProcessId]:
    """The live processes the backend's identity checks see (pid -> identity)."""
    live: dict[int, ProcessId] = {}
    monkeypatch.setattr(driver, "alive", lambda p: live.get(p.pid) == p)
    monkeypatch.setattr("lmrunner.process.identify", lambda pid: live.get(pid))
    return live


@pytest.fixture
def signals(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    sent: list[tuple[str, int, int]] = []
    monkeypatch.setattr(os, "killpg", lambda pid, sig: sent.append(("pg", pid, sig)))
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append(("pid", pid, sig)))
    monkeypatch.setattr(os, "getpgid", lambda pid: pid if pid == 4242 else 1)

    def no_pidfd(pid: int) -> int:  # the fallback by identity, which os.kill above records
        raise OSError(38, "pidfd_open not here")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    return sent


# --- pure helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("apptainer version 1.4.5", ("apptainer", "1.4.5", (1, 4))),
        ("apptainer version 1.3.0-rc.2\n", ("apptainer", "1.3.0-rc.2", (1, 3))),
        ("singularity-ce version 3.11.4-jammy", ("singularity-ce", "3.11.4-jammy", (3, 11))),
        ("singularity version 3.8.7", ("singularity", "3.8.7", (3, 8))),
        ("something else", None),
    ],
)
def test_version_text_is_parsed(text: str, expected: Any) -> None:
    assert parse_version(text) == expected


def test_argv_contains_the_isolation_the_binds_and_the_command(lm_dir: Path) -> None:
    spec = make_spec(lm_dir, "/images/sc", command=("/user_data", "--flag"))
    paths = LmPaths(lm_dir)
    argv = build_argv("/bin/apptainer", spec, Path("/images/sc"), paths, hook=paths.env_hook)
    assert argv[:3] == ["/bin/apptainer", "--quiet", "exec"]
    for flag in ("--contain", "--pid", "--ipc", "--cleanenv", "--no-eval"):
        assert flag in argv
    assert argv[argv.index("--hostname") + 1] == "lm-00.example.com"
    assert argv[argv.index("--workdir") + 1] == str(lm_dir / "mnt" / "workdir")
    assert argv[argv.index("--env-file") + 1] == str(lm_dir / "apptainer.env")
    binds = [argv[i + 1] for i, a in enumerate(argv) if a == "--bind"]
    assert binds == [
        f"{lm_dir / 'user_data'}:/user_data:ro",
        f"{lm_dir / 'machinefeatures'}:/tmp/machinefeatures:ro",
        f"{lm_dir / 'jobfeatures'}:/tmp/jobfeatures:ro",
        f"{lm_dir / 'joboutputs'}:/tmp/joboutputs:rw",
        f"{paths.env_hook}:/.singularity.d/env/99-base.sh:ro",
    ]
    assert argv[-3:] == ["/images/sc", "/user_data", "--flag"]


def test_env_file_quotes_values_for_apptainers_shell() -> None:
    text = env_file_text({"B": "a b,c$HOME'q", "A": "plain"})
    assert text == "A=plain\nB='a b,c$HOME'\"'\"'q'\n"


def test_env_hook_only_for_directory_images_whose_env_folder_lacks_99_base(
    tmp_path: Path, image: Path
) -> None:
    assert needs_env_hook(image)
    (image / ".singularity.d" / "env" / "99-base.sh").write_text("")
    assert not needs_env_hook(image)
    bare = tmp_path / "bare"
    bare.mkdir()
    assert not needs_env_hook(bare)  # no /.singularity.d/env: apptainer injects the env itself
    sif = tmp_path / "x.sif"
    sif.write_text("")
    assert not needs_env_hook(sif)


def test_exit_status_maps_signals_like_a_shell() -> None:
    assert [shell_status(c) for c in (0, 3, -9, -15)] == [0, 3, 137, 143]


def test_labels_are_read_from_a_payload_and_from_apptainers_engine_config() -> None:
    uuid = str(uuid_mod.uuid4())
    plain = {"PATH": "/bin", "LMRUNNER_LM_UUID": uuid, "LMRUNNER_FACTORY": "f",
             "LMRUNNER_LM_NAME": "n", "LMRUNNER_BACKEND": "apptainer"}  # fmt: skip
    assert labels_in_environ(plain) == {
        "LMRUNNER_LM_UUID": uuid,
        "LMRUNNER_FACTORY": "f",
        "LMRUNNER_LM_NAME": "n",
        "LMRUNNER_BACKEND": "apptainer",
    }
    config = json.dumps(
        {"engineConfig": {"jsonConfig": {"apptainerEnv": {"LMRUNNER_LM_UUID": uuid,
                                                          "LMRUNNER_FACTORY": "f", "X": "y"}}}}
    )  # fmt: skip
    cut = len(config) // 2  # apptainer splits a long configuration into numbered chunks
    starter = {"ENGINE_CONFIG2": config[cut:], "ENGINE_CONFIG1": config[:cut],
               "ENGINE_CONFIG_CHUNKS": "2"}  # fmt: skip
    assert labels_in_environ(starter) == {
        "LMRUNNER_LM_UUID": uuid,
        "LMRUNNER_FACTORY": "f",
    }
    assert labels_in_environ({"PATH": "/bin", "HOME": "/"}) is None
    assert labels_in_environ({"ENGINE_CONFIG1": "{broken LMRUNNER_LM_UUID"}) is None
    # A chunk number int() would refuse ("²" is a digit to str.isdigit) is no chunk.
    assert labels_in_environ({"ENGINE_CONFIG\u00b2": config}) is None


def test_labels_are_valid_text_whatever_bytes_the_environment_held() -> None:
    # psutil decodes an environment as the file system does: bytes that are not UTF-8 become
    # lone surrogates, which could be neither logged nor stored.
    environ = {"LMRUNNER_LM_UUID": os.fsdecode(b"u\xff"), "LMRUNNER_LM_NAME": os.fsdecode(b"n")}
    assert labels_in_environ(environ) == {"LMRUNNER_LM_UUID": "u\ufffd", "LMRUNNER_LM_NAME": "n"}
    config = json.dumps({"LMRUNNER_LM_UUID": "u", "LMRUNNER_FACTORY": "f\ud800"})
    labels = labels_in_environ({"ENGINE_CONFIG1": config})
    assert labels is not None and labels["LMRUNNER_FACTORY"].startswith("f\ufffd")


# --- probe --------------------------------------------------------------------------------------


def test_probe_reports_binary_version_and_account(tmp_path: Path) -> None:
    backend = make_backend(tmp_path, sc_user="root")
    probe = backend.probe()
    assert probe.health is Health.UNAVAILABLE  # never root
    assert "must not be root" in probe.detail
    account = next(
        (p for p in pwd.getpwall() if p.pw_uid != 0), None
    )  # any unprivileged account of this host
    if account is None:
        pytest.skip("no unprivileged account on this host")
    probe = make_backend(tmp_path, sc_user=account.pw_name).probe()
    assert probe.health is Health.OK, probe
    assert probe.version == "1.4.5"
    assert "/opt/bin/apptainer" in probe.detail and account.pw_name in probe.detail


@pytest.mark.parametrize(
    ("which", "run", "expected"),
    [
        (lambda name: None, fake_run(), "neither apptainer nor singularity"),
        (None, fake_run(error=CommandError(("x",), 1, "", "boom")), "--version"),
        (None, fake_run("singularity version 3.8.7"), "lmrunner needs apptainer >= 1.0"),
        (None, fake_run("nonsense"), "unknown version"),
    ],
)
def test_probe_says_why_the_engine_is_unusable_and_never_raises(
    tmp_path: Path, which: Any, run: Any, expected: str
) -> None:
    kwargs: dict[str, Any] = {"run": run}
    if which is not None:
        kwargs["which"] = which
    probe = make_backend(tmp_path, **kwargs).probe()
    assert probe.health is Health.UNAVAILABLE
    assert expected in probe.detail


def test_probe_falls_back_to_singularity(tmp_path: Path) -> None:
    run = fake_run("apptainer version 1.2.0")
    backend = make_backend(
        tmp_path, run=run, which=lambda n: "/usr/bin/singularity" if n == "singularity" else None
    )
    backend.probe()
    assert run.calls[0][0] == ["/usr/bin/singularity", "--version"]


def test_probe_of_a_missing_account(tmp_path: Path) -> None:
    probe = make_backend(tmp_path, sc_user="no-such-account-here").probe()
    assert probe.health is Health.UNAVAILABLE
    assert "no-such-account-here" in probe.detail


# --- validate -----------------------------------------------------------------------------------


def test_validate_accepts_a_good_spec_and_registry_refs_without_a_registry(
    tmp_path: Path, lm_dir: Path, image: Path
) -> None:
    backend = make_backend(tmp_path)
    backend.validate(make_spec(lm_dir, str(image)))
    backend.validate(make_spec(lm_dir, "docker://registry.invalid/x:1"))  # a start error later
    backend.validate(make_spec(lm_dir, "oras://registry.invalid/x:1"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"owner": (0, 0)}, "never run as root"),
        ({"command": ()}, "empty container_command"),
        ({"env": {"BAD-NAME": "x"}}, "invalid environment variable names"),
        ({"image": "https://example.com/x.sif"}, "only a directory, a SIF file"),
        ({"image": "docker://"}, "empty image reference"),
        ({"image": "/no/such/image"}, "does not exist"),
        ({"image": "/dev/null"}, "neither a directory nor a SIF file"),
    ],
)
def test_validate_refuses_before_any_side_effect(
    tmp_path: Path, lm_dir: Path, image: Path, change: dict[str, Any], message: str
) -> None:
    backend = make_backend(tmp_path)
    changes = {"image": str(image), **change}
    spec = make_spec(lm_dir, changes.pop("image"), **changes)
    with pytest.raises(SpecError, match=message):
        backend.validate(spec)
    assert not backend.state_dir.exists()


def test_validate_refuses_binds_apptainer_cannot_express_or_find(
    tmp_path: Path, lm_dir: Path, image: Path
) -> None:
    backend = make_backend(tmp_path)
    odd = lm_dir / "a:b"
    odd.mkdir()
    with pytest.raises(SpecError, match="holds ':' or ','"):
        backend.validate(make_spec(lm_dir, str(image), mounts=(Mount(odd, PurePosixPath("/x")),)))
    missing = Mount(lm_dir / "nothing", PurePosixPath("/x"))
    with pytest.raises(SpecError, match=r"bind source .* does not exist"):
        backend.validate(make_spec(lm_dir, str(image), mounts=(missing,)))


def test_validate_names_the_folder_the_lm_account_cannot_pass(
    tmp_path: Path, lm_dir: Path, image: Path
) -> None:
    backend = make_backend(tmp_path)
    lm_dir.parent.chmod(0o700)  # owned by the test's account, not the LM's
    try:
        with pytest.raises(SpecError, match=f"{lm_dir.parent} is drwx------"):
            backend.validate(make_spec(lm_dir, str(image), owner=(54321, 54321)))
    finally:
        lm_dir.parent.chmod(0o755)


def test_relative_images_are_the_cores_to_resolve(tmp_path: Path, lm_dir: Path) -> None:
    """lmrunner.spec.image resolves relative names in the machinetype's files folder (one rule
    for every backend); a name still relative when it reaches the backend was not found."""
    with pytest.raises(SpecError, match="neither in its files folder nor an absolute path"):
        make_backend(tmp_path).validate(make_spec(lm_dir, "img"))


def test_the_spec_resolves_relative_images_in_the_files_folder(tmp_path: Path) -> None:
    files = tmp_path / "files"
    (files / "img").mkdir(parents=True)
    assert spec_image("img", files) == str(files / "img")
    assert spec_image("missing.sif", files) == "missing.sif"  # the backend says it is missing
    assert spec_image("docker://vcbusybox", files) == "docker://vcbusybox"


# --- start, inspect, stop, destroy ---------------------------------------------------------------


def started(
    tmp_path: Path, lm_dir: Path, image: Path, **kwargs: Any
) -> tuple[ApptainerBackend, FakeSupervisor, MachineSpec, Handle, list[str]]:
    supervisor = kwargs.pop("supervisor", FakeSupervisor())
    spec_changes = kwargs.pop("spec", {})
    backend = make_backend(tmp_path, supervisor=supervisor, **kwargs)
    told: list[str] = []
    backend.watch(told.append)
    spec = make_spec(lm_dir, str(image), **spec_changes)
    handle = backend.start(spec)
    return backend, supervisor, spec, handle, told


def test_start_runs_apptainer_as_the_lm_account_in_its_cgroup(
    tmp_path: Path, lm_dir: Path, image: Path
) -> None:
    cpu = tmp_path / "cgroup" / "cpu" / "lm-x"
    cpu.mkdir(parents=True)
    (cpu / "tasks").write_text("")
    ref = CgroupRef(1, "lm-x", (("cpu", str(cpu)),))
    cgroup = LmCgroup(ref, (cpu / "tasks",), "/lmrunner/lm-x")  # as the v1 driver gives them
    backend, supervisor, spec, handle, _ = started(tmp_path, lm_dir, image, spec={"cgroup": cgroup})
    call = supervisor.spawned[0]
    assert call["key"] == spec.uuid
    assert call["user"] == OWNER
    assert call["procs_files"] == (cpu / "tasks",)
    assert call["status_file"] == lm_dir / "apptainer-exit.json"
    assert call["log_file"] == lm_dir / "apptainer.log"
    assert call["cwd"] == lm_dir / "mnt" / "workdir"
    assert call["env"]["APPTAINER_TMPDIR"] == str(lm_dir / "mnt" / "apptainer-tmp")
    assert "LMRUNNER" not in json.dumps(call["env"])  # labels go into the LM, not the engine
    assert call["argv"][0] == "/opt/bin/apptainer"
    assert call["argv"][-2:] == [str(image), "/user_data"]
    # The per-LM folders belong to the LM's account; the env file holds env and labels.
    for folder in (lm_dir / "mnt" / "workdir", lm_dir / "mnt" / "apptainer-tmp"):
        assert (folder.stat().st_uid, folder.stat().st_mode & 0o777) == (OWNER[0], 0o700)
    env_file = (lm_dir / "apptainer.env").read_text()
    assert "JOBOUTPUTS=/tmp/joboutputs\n" in env_file
    assert f"LMRUNNER_LM_UUID={spec.uuid}\n" in env_file
    assert "LMRUNNER_FACTORY=factory-1\n" in env_file
    assert "LMRUNNER_BACKEND=apptainer\n" in env_file
    assert (lm_dir / "apptainer.env").stat().st_mode & 0o777 == 0o600
    assert (lm_dir / "apptainer-env-hook.sh").read_text() == ""  # the image lacks 99-base.sh
    assert handle.data == {
        "pid": 4242,
        "start_ticks": 777,
        "directory": str(lm_dir),
        "cgroup": ref.to_json(),
    }
    record = json.loads((backend.state_dir / f"{spec.uuid}.json").read_text())
    assert record["labels"][LABEL_UUID] == spec.uuid and record["pid"] == 4242


def test_a_failed_spawn_is_a_start_error_leaving_nothing(
    tmp_path: Path, lm_dir: Path, image: Path
) -> None:
    backend = make_backend(tmp_path, supervisor=FakeSupervisor(fail=True))
    with pytest.raises(StartError, match="cannot start /opt/bin/apptainer"):
        backend.start(make_spec(lm_dir, str(image)))
    assert not (lm_dir / "mnt" / "workdir").exists()
    assert not (lm_dir / "apptainer.env").exists()
    assert backend.list_owned() == []


def test_registry_images_are_pulled_once_into_the_cache(
    tmp_path: Path, lm_dir: Path, image: Path
) -> None:
    run = fake_run()
    backend = make_backend(tmp_path, run=run)
    ref = "docker://registry.example.com/sc:1"
    other = lm_dir.parent / "other"
    other.mkdir()
    backend.start(make_spec(lm_dir, ref))
    backend.start(make_spec(other, ref))
    pulls = [argv for argv, _ in run.calls if "pull" in argv]
    assert len(pulls) == 1 and pulls[0][-1] == ref
    cached = list((backend.state_dir / "images").glob("*.sif"))
    assert len(cached) == 1 and cached[0].stat().st_mode & 0o777 == 0o644


def test_an_unreachable_registry_is_a_clear_start_error(
    tmp_path: Path, lm_dir: Path, image: Path
) -> None:
    error = CommandError(
        ("apptainer", "pull"), 255, "", "FATAL:   lookup registry.invalid: no such host"
    )
    backend = make_backend(tmp_path, run=fake_run(error=error))
    with pytest.raises(StartError) as caught:
        backend.start(make_spec(lm_dir, "docker://registry.invalid/nothing:1"))
    message = str(caught.value)
    assert "docker://registry.invalid/nothing:1 is not here and cannot be pulled" in message
    assert "no such host" in message
    assert not list((backend.state_dir / "images").iterdir())  # no partial image kept


def test_inspect_follows_the_process_and_its_recorded_exit(
    tmp_path: Path, lm_dir: Path, image: Path, process_state: dict[int, ProcessId]
) -> None:
    backend, supervisor, spec, handle, told = started(tmp_path, lm_dir, image)
    process_state[4242] = ProcessId(4242, 777)
    assert backend.inspect(spec.uuid, handle).state is EngineState.RUNNING
    del process_state[4242]
    # Ended, but its waiting thread has not recorded it yet: still ours to report later.
    assert backend.inspect(spec.uuid, handle).state is EngineState.RUNNING
    supervisor.exit(spec.uuid, 3, lm_dir / "apptainer-exit.json")
    assert told == [spec.uuid]
    status = backend.inspect(spec.uuid, handle)
    assert (status.state, status.exit_code, status.oom_killed) == (EngineState.EXITED, 3, False)
    assert status.ended_at == 1000.0 and status.engine_fault is None


def test_a_recycled_pid_is_not_the_lm(
    tmp_path: Path, lm_dir: Path, image: Path, process_state: dict[int, ProcessId]
) -> None:
    backend, supervisor, spec, handle, _ = started(tmp_path, lm_dir, image)
    supervisor.exit(spec.uuid, 0, lm_dir / "apptainer-exit.json")
    process_state[4242] = ProcessId(4242, 999)  # same pid, later start: another process
    assert backend.inspect(spec.uuid, handle).state is EngineState.EXITED


@pytest.mark.parametrize(
    ("code", "reported"),
    [(-9, 137), (137, 137), (-15, 143), (143, 143), (1, 1)],  # killed by a signal: 128 + N
)
def test_kills_are_reported_as_facts(
    tmp_path: Path, lm_dir: Path, image: Path, code: int, reported: int
) -> None:
    """The exit status as a shell shows it, and no verdict: whether a kill was the OOM killer's
    (the cgroup's counter) or the host's is the core's decision (lifecycle.decide_outcome)."""
    ref = CgroupRef(1, "lm-x", (("memory", str(tmp_path / "memory" / "lm-x")),))
    cgroup = LmCgroup(ref, (), None)
    backend, supervisor, spec, handle, _ = started(
        tmp_path, lm_dir, image, cgroups=FakeCgroups(1), spec={"cgroup": cgroup}
    )
    supervisor.exit(spec.uuid, code, lm_dir / "apptainer-exit.json")
    status = backend.inspect(spec.uuid, handle)
    assert (status.exit_code, status.oom_killed, status.engine_fault) == (reported, False, None)


def test_apptainers_own_failure_is_reported_with_its_fatal_line(
    tmp_path: Path, lm_dir: Path, image: Path
) -> None:
    backend, supervisor, spec, handle, _ = started(tmp_path, lm_dir, image)
    (lm_dir / "apptainer.log").write_text(
        "payload output\nFATAL:   stat /nothing: no such file or directory\n"
    )
    supervisor.exit(spec.uuid, 255, lm_dir / "apptainer-exit.json")
    status = backend.inspect(spec.uuid, handle)
    assert status.exit_code == 255
    assert status.detail == "stat /nothing: no such file or directory"
    assert status.engine_fault == (
        "Apptainer could not run the LM: stat /nothing: no such file or directory"
    )


def test_an_lm_that_ended_while_the_daemon_was_down_has_an_unknown_status(
    tmp_path: Path, lm_dir: Path, image: Path, process_state: dict[int, ProcessId]
) -> None:
    _, _, spec, handle, _ = started(tmp_path, lm_dir, image)
    fresh = make_backend(tmp_path, supervisor=FakeSupervisor(adoptable=False))
    with pytest.raises(MachineNotFound):
        fresh.recover(spec.uuid, handle)
    status = fresh.inspect(spec.uuid, handle)
    assert (status.state, status.exit_code) == (EngineState.EXITED, None)
    assert "not watching" in status.detail


def test_recover_adopts_by_pid_and_start_time(tmp_path: Path, lm_dir: Path, image: Path) -> None:
    _, _, spec, handle, _ = started(tmp_path, lm_dir, image)
    supervisor = FakeSupervisor()
    make_backend(tmp_path, supervisor=supervisor).recover(spec.uuid, handle)
    assert supervisor.adopted == [(spec.uuid, ProcessId(4242, 777))]


def test_stop_signals_the_whole_cgroup(tmp_path: Path, lm_dir: Path, image: Path) -> None:
    cgroups = FakeCgroups()
    ref = CgroupRef(1, "lm-x", (("cpu", str(tmp_path / "cpu" / "lm-x")),))
    backend, _, spec, handle, _ = started(
        tmp_path, lm_dir, image, cgroups=cgroups, spec={"cgroup": LmCgroup(ref, (), None)}
    )
    backend.stop(spec.uuid, handle)
    backend.stop(spec.uuid, handle, force=True)
    assert cgroups.calls == [("signal", signal.SIGTERM), ("kill", "lm-x")]


def test_without_a_cgroup_stop_signals_the_process_group_of_the_same_process(
    tmp_path: Path,
    lm_dir: Path,
    image: Path,
    process_state: dict[int, ProcessId],
    signals: list[tuple[str, int, int]],
) -> None:
    backend, _, spec, handle, _ = started(tmp_path, lm_dir, image)
    process_state[4242] = ProcessId(4242, 777)
    backend.stop(spec.uuid, handle)
    assert signals == [("pg", 4242, signal.SIGTERM)]
    process_state[4242] = ProcessId(4242, 1)  # the pid now names another process
    backend.stop(spec.uuid, handle)
    assert signals == [("pg", 4242, signal.SIGTERM)]


def test_destroy_is_idempotent_and_removes_what_the_backend_made(
    tmp_path: Path, lm_dir: Path, image: Path, process_state: dict[int, ProcessId]
) -> None:
    cgroups = FakeCgroups()
    ref = CgroupRef(1, "lm-x", (("cpu", str(tmp_path / "cpu" / "lm-x")),))
    backend, supervisor, spec, handle, _ = started(
        tmp_path, lm_dir, image, cgroups=cgroups, spec={"cgroup": LmCgroup(ref, (), None)}
    )
    supervisor.exit(spec.uuid, 0, lm_dir / "apptainer-exit.json")
    (lm_dir / "apptainer.log").write_text("x" * 100)
    backend.destroy(spec.uuid, handle)
    backend.destroy(spec.uuid, handle)
    assert cgroups.calls == [("kill", "lm-x"), ("kill", "lm-x")]
    assert not (lm_dir / "mnt" / "workdir").exists()
    assert not (lm_dir / "mnt" / "apptainer-tmp").exists()
    assert not (lm_dir / "apptainer.env").exists()
    assert (lm_dir / "apptainer.log").exists()  # kept for `lmrunner logs`
    assert backend.inspect(spec.uuid, handle).state is EngineState.MISSING
    assert backend.list_owned() == []


def test_destroy_keeps_only_the_tail_of_a_huge_log(
    tmp_path: Path, lm_dir: Path, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(driver, "LOG_LIMIT_BYTES", 10)
    backend, supervisor, spec, handle, _ = started(tmp_path, lm_dir, image)
    supervisor.exit(spec.uuid, 0, lm_dir / "apptainer-exit.json")
    (lm_dir / "apptainer.log").write_text("head...." + "0123456789")
    backend.destroy(spec.uuid, handle)
    assert (lm_dir / "apptainer.log").read_text() == "0123456789"


def test_a_cgroup_that_will_not_empty_is_a_backend_error(
    tmp_path: Path, lm_dir: Path, image: Path
) -> None:
    class Stuck(FakeCgroups):
        def kill(self, ref: CgroupRef, *, timeout: float = 10.0) -> None:
            from lmrunner.errors import CgroupError

            raise CgroupError("lm-x still has processes [1] after 10 s")

    ref = CgroupRef(1, "lm-x", (("cpu", str(tmp_path / "cpu" / "lm-x")),))
    backend, _, spec, handle, _ = started(
        tmp_path, lm_dir, image, cgroups=Stuck(), spec={"cgroup": LmCgroup(ref, (), None)}
    )
    with pytest.raises(BackendError, match="still has processes"):
        backend.stop(spec.uuid, handle, force=True)


# --- list_owned and orphans ---------------------------------------------------------------------


class FakeHost:
    """The host's processes as ``orphans.processes_of`` gives them: (uid, identity, environment)."""

    def __init__(self) -> None:
        self.table: list[tuple[int, ProcessId, dict[str, str]]] = []
        self.asked: list[int] = []

    def add(self, pid: int, uid: int, environ: Mapping[str, str], ticks: int = 5) -> ProcessId:
        process = ProcessId(pid, ticks)
        self.table.append((uid, process, dict(environ)))
        return process

    def __call__(self, uid: int) -> list[tuple[ProcessId, dict[str, str]]]:
        self.asked.append(uid)
        return [(process, environ) for owner, process, environ in self.table if owner == uid]


def test_list_owned_reports_records_and_orphan_processes_of_sc_user_only(
    tmp_path: Path,
    lm_dir: Path,
    image: Path,
    monkeypatch: pytest.MonkeyPatch,
    process_state: dict[int, ProcessId],
    signals: list[tuple[str, int, int]],
) -> None:
    sc_uid = 4711
    monkeypatch.setattr(pwd, "getpwnam", lambda name: type("pw", (), {"pw_uid": sc_uid})())
    host = FakeHost()
    backend, _, spec, _, _ = started(tmp_path, lm_dir, image, processes=host)
    orphan = str(uuid_mod.uuid4())
    labels = {"LMRUNNER_LM_UUID": orphan, "LMRUNNER_FACTORY": "factory-1",
              "LMRUNNER_LM_NAME": "lm-01.example.com", "LMRUNNER_BACKEND": "apptainer"}  # fmt: skip
    appinit = host.add(300, sc_uid, {"ENGINE_CONFIG1": json.dumps({"e": labels})})
    payload = host.add(301, sc_uid, {**labels, "PATH": "/bin"})
    host.add(302, sc_uid, {"PATH": "/bin"})  # sc_user's, not lmrunner's
    host.add(303, 0, labels)  # carries the labels, but not sc_user's
    host.add(304, sc_uid, {**labels, "LMRUNNER_LM_UUID": "../../etc"})  # not a uuid
    host.add(305, sc_uid, {**labels, "LMRUNNER_BACKEND": "vm"})  # another backend's
    host.add(306, sc_uid, {k: v for k, v in labels.items() if k != "LMRUNNER_FACTORY"})
    owned = {o.uuid: o for o in backend.list_owned()}
    assert host.asked == [sc_uid]
    assert set(owned) == {spec.uuid, orphan}
    assert (owned[spec.uuid].name, owned[spec.uuid].factory) == ("lm-00.example.com", "factory-1")
    found = owned[orphan]
    assert (found.name, found.factory) == ("lm-01.example.com", "factory-1")
    assert found.handle.data == {"orphan": True, "pids": [[300, 5], [301, 5]]}
    # Destroying the orphan kills exactly its processes, still the same ones.
    process_state.update({300: appinit, 301: payload})
    monkeypatch.setattr(os, "getpgid", lambda pid: 1)

    def killed(pid: int, sig: int) -> None:
        signals.append(("pid", pid, sig))
        process_state.pop(pid, None)

    monkeypatch.setattr(os, "kill", killed)
    backend.destroy(orphan, found.handle)
    assert sorted(signals) == [("pid", 300, signal.SIGKILL), ("pid", 301, signal.SIGKILL)]


def test_root_processes_are_never_scanned_for_orphans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pwd, "getpwnam", lambda name: type("pw", (), {"pw_uid": 0})())
    host = FakeHost()
    assert make_backend(tmp_path, processes=host).list_owned() == []
    assert host.asked == []


# --- the host's processes through psutil ---------------------------------------------------------


def test_processes_of_names_this_process_by_pid_and_start_time() -> None:
    found = dict(orphans.processes_of(os.getuid()))
    me = identify(os.getpid())
    assert me is not None and me in found
    assert found[me] == psutil.Process().environ()
    assert orphans.processes_of(2**31 - 7) == []  # an account with no processes


@pytest.mark.allow_subprocess
def test_a_labelled_process_is_found_with_its_identity(tmp_path: Path) -> None:
    """End to end through psutil: a real process carrying an LM's labels in its environment."""
    uuid = str(uuid_mod.uuid4())
    env = {"PATH": "/usr/bin:/bin", "LMRUNNER_LM_UUID": uuid, "LMRUNNER_FACTORY": "f",
           "LMRUNNER_LM_NAME": "n", "LMRUNNER_BACKEND": "apptainer"}  # fmt: skip
    child = subprocess.Popen(["sleep", "30"], env=env)
    try:
        found = orphans.labelled(orphans.processes_of(os.getuid()), "apptainer")
        assert uuid in found
        labels, processes = found[uuid]
        assert labels == {k: v for k, v in env.items() if k.startswith("LMRUNNER_")}
        assert processes == [identify(child.pid)]
        assert orphans.labelled(orphans.processes_of(os.getuid()), "vm").get(uuid) is None
    finally:
        child.kill()
        child.wait()


class VanishingProcess:
    """A psutil.Process whose process misbehaves in one way while it is looked at."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def uids(self) -> Any:
        if self.pid == 1:
            raise psutil.NoSuchProcess(self.pid)
        if self.pid == 2:
            raise psutil.AccessDenied(self.pid)
        return type("uids", (), {"real": os.getuid()})()

    def environ(self) -> dict[str, str]:
        if self.pid == 3:
            raise psutil.ZombieProcess(self.pid)
        if self.pid == 4:
            raise FileNotFoundError(2, "gone, as psutil sometimes lets it through")
        return {"LMRUNNER_LM_UUID": "x"}

    def is_running(self) -> bool:
        return self.pid != 6  # 6: the pid names another process by now


def test_psutil_errors_stop_at_the_scan(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(psutil, "pids", lambda: [1, 2, 3, 4, 5, 6, 7])
    monkeypatch.setattr(psutil, "Process", VanishingProcess)
    live = {6: ProcessId(6, 60), 7: ProcessId(7, 70)}  # 5: ended before its identity was read
    monkeypatch.setattr(orphans, "identify", live.get)
    assert orphans.processes_of(os.getuid()) == [(ProcessId(7, 70), {"LMRUNNER_LM_UUID": "x"})]

    def unreadable() -> list[int]:
        raise PermissionError(13, "Permission denied", "/proc")

    monkeypatch.setattr(psutil, "pids", unreadable)
    assert orphans.processes_of(os.getuid()) == []
    assert "cannot list processes" in caplog.text


def test_watch_and_close(tmp_path: Path) -> None:
    supervisor = FakeSupervisor()
    backend = make_backend(tmp_path, supervisor=supervisor)
    told: list[str] = []
    backend.watch(told.append)
    assert supervisor.notify is not None
    supervisor.notify("u1")
    backend.close()
    supervisor.notify("u2")  # after close nothing reaches the core
    assert told == ["u1"] and supervisor.closed


def test_record_names_are_only_uuids(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    with pytest.raises(BackendError, match="not an LM uuid"):
        backend.inspect("../../etc/passwd", Handle(1, {}))
