"""The Apptainer backend: one LM is one supervised ``apptainer exec`` process.

A payload's daemonised grandchild (``setsid``) leaves its session and process group; only the
cgroup and the PID namespace (``--pid``: its init takes every process with it) still hold it.
So stops signal the whole cgroup, or without cgroups the apptainer process's group, whose
container init then ends the rest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from lmrunner import atomic, runner, untrusted
from lmrunner.backends.apptainer import image as images
from lmrunner.backends.apptainer import orphans, validate, version
from lmrunner.backends.apptainer.argv import build_argv, env_file_text, needs_env_hook, process_env
from lmrunner.backends.apptainer.orphans import BACKEND_ENV, LABEL_ENV
from lmrunner.backends.apptainer.paths import (
    NAME,
    LmPaths,
    fatal_line,
    is_uuid,
    keep_tail,
    remove,
    remove_quietly,
)
from lmrunner.backends.base import (
    LABEL_FACTORY,
    LABEL_NAME,
    EngineState,
    Handle,
    Health,
    MachineSpec,
    NoOptions,
    OptionsType,
    Owned,
    Probe,
    Status,
)
from lmrunner.cgroups.base import CgroupController, CgroupRef
from lmrunner.config import FactoryConfig
from lmrunner.errors import (
    BackendError,
    CgroupError,
    CommandError,
    LmrunnerError,
    MachineNotFound,
    SpecError,
    StartError,
)
from lmrunner.model import Placement
from lmrunner.process import ProcessId, Supervisor, alive, read_status, send_signal

LOG = logging.getLogger(__name__)

PLACEMENT = Placement(
    user_data=PurePosixPath("/user_data"),
    machinefeatures=PurePosixPath("/tmp/machinefeatures"),
    jobfeatures=PurePosixPath("/tmp/jobfeatures"),
    joboutputs=PurePosixPath("/tmp/joboutputs"),
)

HANDLE_VERSION = 1
#: What destroy keeps of the LM's output (the tail), like the Docker backend's container.log.
LOG_LIMIT_BYTES = 4 * 1024 * 1024
#: What the host and the data this backend keeps can raise: OSError from files, /proc and
#: signals; ValueError, TypeError and KeyError from a handle or record of the wrong shape (torn,
#: hand-edited, or an older version's); UntrustedFileError from a folder the LM's account writes.
HOST_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    ValueError,
    TypeError,
    KeyError,
    untrusted.UntrustedFileError,
)

#: Lists the live processes of a uid with their environments (:func:`orphans.processes_of`).
ProcessLister = Callable[[int], Iterable[tuple[ProcessId, Mapping[str, str]]]]


class ApptainerBackend:
    """Apptainer (or Singularity) containers as logical machines.

    No OSError, and no error of a corrupt handle or record, leaves a method of the protocol: each
    is raised again as a :class:`~lmrunner.errors.BackendError` naming the LM
    (:meth:`_host_errors`).
    """

    name: ClassVar[str] = NAME
    placement: ClassVar[Placement] = PLACEMENT
    options_type: ClassVar[OptionsType] = NoOptions
    runs_as_sc_user: ClassVar[bool] = True

    def __init__(
        self,
        factory: FactoryConfig,
        cgroups: CgroupController | None,
        *,
        supervisor: Supervisor | None = None,
        run: Callable[..., runner.Completed] = runner.run,
        which: Callable[[str], str | None] = shutil.which,
        processes: ProcessLister = orphans.processes_of,
        search_dirs: Sequence[Path] = version.FALLBACK_DIRS,
    ) -> None:
        """``supervisor``, ``run``, ``which``, ``processes`` (the host's processes of a uid) and
        ``search_dirs`` (where the engine is looked for when it is not on PATH) are replaced by
        fakes in unit tests."""
        self.factory = factory
        self.cgroups = cgroups
        #: Records (``<uuid>.json``) and the image cache; created at the first start.
        self.state_dir = factory.state_dir / NAME
        self._run = run
        self._which = which
        self._processes_of = processes
        self._search_dirs = tuple(search_dirs)
        self._supervisor = supervisor or Supervisor()
        self._lock = threading.Lock()
        self._notify: Callable[[str], None] | None = None
        #: Started by this daemon and not yet seen ending: a waiting thread records their exit.
        self._running: set[str] = set()
        self._supervisor.watch(self._exited)

    # --- the protocol ---------------------------------------------------------------------------

    def disk_overhead(self, disk_bytes: int) -> int:
        return 0  # the payload's files are all there is

    def memory_overhead(self) -> int:
        return 0  # the LM's processes are all there is

    def probe(self) -> Probe:
        try:
            return self._probe()
        except Exception as err:  # the contract: never raises; a surprise is a reason, logged
            LOG.exception("apptainer: the probe failed unexpectedly")
            return Probe(Health.UNAVAILABLE, None, f"unavailable: {type(err).__name__}: {err}")

    def _probe(self) -> Probe:
        binary = self._binary()
        if binary is None:
            places = ", ".join(str(d) for d in self._search_dirs)
            return Probe(
                Health.UNAVAILABLE, None, f"unavailable: neither apptainer nor singularity on "
                f"PATH or in {places}"
            )  # fmt: skip
        try:
            done = self._run([binary, "--version"], timeout=version.VERSION_TIMEOUT)
        except LmrunnerError as err:
            return Probe(Health.UNAVAILABLE, None, f"unavailable: {binary} --version: {err}")
        text = done.stdout.strip() or done.stderr.strip()
        parsed = version.parse_version(text)
        if parsed is None:
            return Probe(
                Health.UNAVAILABLE, None, f"unavailable: {binary}: unknown version {text!r}"
            )
        flavour, shown, number = parsed
        wanted = version.unmet_requirement(flavour, number)
        if wanted is not None:
            return Probe(Health.UNAVAILABLE, shown, f"unavailable: {text}; lmrunner needs {wanted}")
        try:
            account = pwd.getpwnam(self.factory.sc_user)
        except (KeyError, ValueError):  # ValueError: a name holding a NUL
            return Probe(
                Health.UNAVAILABLE, shown, f"unavailable: factory.sc_user {self.factory.sc_user!r} "
                "is no account on this host"
            )  # fmt: skip
        if account.pw_uid == 0:
            return Probe(Health.UNAVAILABLE, shown, "unavailable: factory.sc_user must not be root")
        return Probe(
            Health.OK,
            shown,
            f"{flavour} {shown} ({binary}); LMs run as {account.pw_name} (uid {account.pw_uid})",
        )

    def validate(self, spec: MachineSpec) -> None:
        where = f"apptainer: machinetype {spec.machinetype}"
        try:
            validate.check(where, spec)
        except OSError as err:  # a path that cannot even be looked at (too long, no access)
            raise SpecError(f"{where}: {err}") from err

    def start(self, spec: MachineSpec) -> Handle:
        with self._host_errors(f"cannot start {spec.name}", StartError):
            return self._start(spec)

    def _start(self, spec: MachineSpec) -> Handle:
        if not is_uuid(spec.uuid):  # it names the record: refused before any side effect
            raise StartError(self.name, f"cannot start {spec.name}: not an LM uuid: {spec.uuid!r}")
        record_file = self._record(spec.uuid)
        binary = self._binary()
        if binary is None:
            raise StartError(self.name, "neither apptainer nor singularity is installed")
        image = images.resolve(
            spec,
            binary,
            state_dir=self.state_dir,
            run=self._run,
        )
        paths = LmPaths(spec.directory)
        try:
            hook = self._prepare(spec, image, paths)
        except OSError as err:
            remove_quietly(paths)
            raise StartError(self.name, f"cannot prepare {paths.mnt}: {err}") from err
        argv = build_argv(binary, spec, image, paths, hook=hook)
        with self._lock:
            self._running.add(spec.uuid)  # before it can end
        try:
            process = self._supervisor.spawn(
                spec.uuid,
                argv,
                status_file=paths.status,
                log_file=paths.log,
                procs_files=spec.cgroup.procs_files if spec.cgroup else (),
                launcher=spec.cgroup.launcher if spec.cgroup else None,
                user=spec.owner,
                env=process_env(binary, spec, paths),
                cwd=paths.workdir,
            )
        except CommandError as err:
            with self._lock:
                self._running.discard(spec.uuid)
            remove_quietly(paths)
            raise StartError(self.name, f"cannot start {binary} for {spec.name}: {err}") from err
        data: dict[str, Any] = {
            "pid": process.pid,
            "start_ticks": process.start_ticks,
            "directory": str(spec.directory),
            "cgroup": spec.cgroup.ref.to_json() if spec.cgroup is not None else None,
        }
        record = {"uuid": spec.uuid, "labels": dict(spec.labels), "image": str(image), **data}
        try:
            self.state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            # No fsync: it must outlive a crashed daemon (the page cache does), and a crashed host
            # takes the LM with it. Written after the spawn, off the LM's start-up path.
            text = json.dumps(record)
            atomic.write_text(record_file, text, mode=0o600, durable=False)
        except OSError as err:  # nothing may be left behind: the LM goes with its record
            with contextlib.suppress(BackendError):
                self._kill(spec.uuid, Handle(HANDLE_VERSION, data))
            remove_quietly(paths)
            raise StartError(self.name, f"cannot record {spec.name}: {err}") from err
        return Handle(HANDLE_VERSION, data, {"pid": str(process.pid)})

    def recover(self, uuid: str, handle: Handle) -> None:
        with self._host_errors(f"cannot reattach to LM {uuid}"):
            process = _process(handle)
            if process is None or not self._supervisor.adopt(uuid, process):
                raise MachineNotFound(self.name, f"LM {uuid}: its apptainer process has ended")

    def inspect(self, uuid: str, handle: Handle) -> Status:
        with self._host_errors(f"cannot inspect LM {uuid}"):
            return self._inspect(uuid, handle)

    def _inspect(self, uuid: str, handle: Handle) -> Status:
        process = _process(handle)
        if process is not None and alive(process):
            return Status(EngineState.RUNNING)
        if not self._record(uuid).exists():
            return Status(EngineState.MISSING, detail="no apptainer LM with this uuid")
        directory = _directory(handle)
        paths = LmPaths(directory) if directory is not None else None
        status = read_status(paths.status) if paths is not None else None
        with self._lock:
            reaping = uuid in self._running
        if status is None and reaping:
            return Status(EngineState.RUNNING)  # it is exiting: its waiting thread will tell
        code = None if status is None else status.exit_code
        detail = "" if code is not None else "it ended while lmrunner was not watching"
        # 255 is also apptainer's own failure: its FATAL line tells (OOM kills are counted by
        # the core from the LM's cgroup, as for every backend).
        fatal = fatal_line(paths.log) if paths is not None and code == 255 else None
        return Status(
            EngineState.EXITED,
            exit_code=code,
            ended_at=None if status is None else status.ended_at,
            detail=fatal or detail,
            engine_fault=None if fatal is None else f"Apptainer could not run the LM: {fatal}",
        )

    def stop(self, uuid: str, handle: Handle, *, force: bool = False) -> None:
        with self._host_errors(f"cannot stop LM {uuid}"):
            self._stop(uuid, handle, force=force)

    def _stop(self, uuid: str, handle: Handle, *, force: bool) -> None:
        if force:
            self._kill(uuid, handle)
            return
        ref = _cgroup(handle)
        if ref is not None and self.cgroups is not None:
            try:
                self.cgroups.signal(ref, signal.SIGTERM)
            except CgroupError as err:
                raise BackendError(self.name, f"cannot signal LM {uuid}: {err}") from err
            return
        for process in self._processes(uuid, handle):
            _signal_group(process, signal.SIGTERM)

    def destroy(self, uuid: str, handle: Handle) -> None:
        with self._host_errors(f"cannot destroy LM {uuid}"):
            self._kill(uuid, handle)
            directory = _directory(handle) or self._recorded_directory(uuid)
            if directory is not None:
                paths = LmPaths(directory)
                remove(paths)
                keep_tail(paths.log, LOG_LIMIT_BYTES)
            self._record(uuid).unlink(missing_ok=True)

    def list_owned(self) -> list[Owned]:
        with self._host_errors("cannot list LMs"):
            return self._list_owned()

    def _list_owned(self) -> list[Owned]:
        owned: dict[str, Owned] = {}
        for file in sorted(self.state_dir.glob("*.json")):
            if not is_uuid(file.stem):
                continue
            try:
                record = json.loads(file.read_text())
                labels = dict(record["labels"])
                data = {k: record[k] for k in ("pid", "start_ticks", "directory", "cgroup")}
            except (OSError, ValueError, KeyError, TypeError) as err:
                LOG.warning("apptainer: unreadable record %s: %s", file, err)
                continue
            owned[file.stem] = Owned(
                file.stem,
                labels.get(LABEL_NAME, ""),
                labels.get(LABEL_FACTORY, ""),
                Handle(HANDLE_VERSION, data, {"pid": str(data["pid"])}),
            )
        # Processes of sc_user carrying the labels of an LM without a record (the daemon died
        # between starting it and writing the record): orphans, removed after a grace period.
        for uuid, (labels, processes) in self._labelled().items():
            if uuid not in owned:
                pids = [[p.pid, p.start_ticks] for p in processes]
                owned[uuid] = Owned(
                    uuid,
                    labels.get(LABEL_ENV[LABEL_NAME], ""),
                    labels.get(LABEL_ENV[LABEL_FACTORY], ""),
                    Handle(HANDLE_VERSION, {"orphan": True, "pids": pids}),
                )
        return list(owned.values())

    def watch(self, notify: Callable[[str], None]) -> None:
        with self._lock:
            self._notify = notify

    def close(self) -> None:
        self._supervisor.close()
        with self._lock:
            self._notify = None

    # --- internals ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _host_errors(self, what: str, error: type[BackendError] = BackendError) -> Iterator[None]:
        """Raise :data:`HOST_ERRORS` met while doing ``what`` as ``error`` (chained): the one
        place they become lmrunner's. lmrunner's own errors pass unchanged."""
        try:
            yield
        except HOST_ERRORS as err:
            raise error(self.name, f"{what}: {err}") from err

    def _recorded_directory(self, uuid: str) -> Path | None:
        """The LM directory named in the LM's record; None when there is no record, or one that
        cannot be read (destroy goes on without it: the core removes the directory later)."""
        try:
            record = json.loads(self._record(uuid).read_text())
            directory = record.get("directory")
            return Path(directory) if isinstance(directory, str) and directory else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as err:
            LOG.warning("apptainer: lm=%s: unreadable record: %s", uuid, err)
            return None

    def _exited(self, uuid: str) -> None:
        """The supervisor saw an LM's process end (and recorded its status when it could)."""
        with self._lock:
            self._running.discard(uuid)
            notify = self._notify
        if notify is not None:
            notify(uuid)

    def _binary(self) -> str | None:
        return version.find_binary(self._which, self._search_dirs)

    def _record(self, uuid: str) -> Path:
        if not is_uuid(uuid):  # the uuid names a file: never a path
            raise BackendError(self.name, f"not an LM uuid: {uuid!r}")
        return self.state_dir / f"{uuid}.json"

    def _prepare(self, spec: MachineSpec, image: Path, paths: LmPaths) -> Path | None:
        """Make the LM's workdir, temporary folder and env file; return the env hook to bind."""
        paths.mnt.mkdir(mode=0o755, exist_ok=True)
        for folder in (paths.workdir, paths.tmpdir):
            folder.mkdir(mode=0o700)
            os.chown(folder, *spec.owner)
        labels = {LABEL_ENV[k]: v for k, v in spec.labels.items() if k in LABEL_ENV}
        env = {**spec.env, **labels, BACKEND_ENV: self.name}
        # The LM's account reads it (apptainer runs as that account); nobody else may.
        atomic.write_text(paths.env_file, env_file_text(env), mode=0o600, owner=spec.owner,
                          durable=False)  # fmt: skip
        if needs_env_hook(image):
            atomic.write_text(paths.env_hook, "", mode=0o644, durable=False)
            return paths.env_hook
        return None

    def _processes(self, uuid: str, handle: Handle) -> list[ProcessId]:
        """The LM's processes this backend can name: its apptainer process (or an orphan's)."""
        if handle.data.get("orphan"):
            return [ProcessId(int(pid), int(ticks)) for pid, ticks in handle.data.get("pids", [])]
        process = _process(handle)
        return [process] if process is not None else []

    def _kill(self, uuid: str, handle: Handle) -> None:
        """SIGKILL everything of the LM and wait until it is gone."""
        ref = _cgroup(handle)
        if ref is not None and self.cgroups is not None:
            try:
                self.cgroups.kill(ref)
            except CgroupError as err:
                raise BackendError(self.name, f"cannot kill LM {uuid}: {err}") from err
            return
        processes = [p for p in self._processes(uuid, handle) if alive(p)]
        if not processes:
            # Its apptainer process is gone; should anything of the container have outlived it,
            # it still carries the LM's labels.
            found = self._labelled().get(uuid)
            processes = list(found[1]) if found is not None else []
        for process in processes:
            _signal_group(process, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while any(alive(p) for p in processes):
            if time.monotonic() > deadline:
                raise BackendError(self.name, f"LM {uuid}: processes survived SIGKILL")
            time.sleep(0.01)

    def _labelled(self) -> orphans.Labelled:
        """Processes of sc_user carrying lmrunner's labels, by LM uuid."""
        try:
            uid = pwd.getpwnam(self.factory.sc_user).pw_uid
        except KeyError:
            return {}
        if uid == 0:
            return {}  # validate() refuses root; never scan root's processes
        return orphans.labelled(self._processes_of(uid), self.name)


# --- a handle's contents ----------------------------------------------------------------------


def _process(handle: Handle) -> ProcessId | None:
    pid, ticks = handle.data.get("pid"), handle.data.get("start_ticks")
    if pid is None or ticks is None:
        return None
    return ProcessId(int(pid), int(ticks))


def _directory(handle: Handle) -> Path | None:
    """The LM directory named in a handle (None for an orphan's handle).

    Raises:
        TypeError: the handle holds something else there.
    """
    directory = handle.data.get("directory")
    if directory is None or directory == "":
        return None
    if not isinstance(directory, str):
        raise TypeError(f"the handle's directory is not a path: {directory!r}")
    return Path(directory)


def _cgroup(handle: Handle) -> CgroupRef | None:
    text = handle.data.get("cgroup")
    if not text:
        return None
    try:
        return CgroupRef.from_json(str(text))
    except CgroupError as err:
        LOG.error("apptainer: unreadable cgroup reference in a handle: %s", err)
        return None


def _signal_group(process: ProcessId, signum: int) -> None:
    """Signal ``process`` and, when it leads one, its process group (an LM's apptainer process
    leads its own session, and the container's processes stay in its group); nothing when the
    pid is no longer that process."""
    send_signal(process, signum, group=True)
