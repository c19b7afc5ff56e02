"""Apptainer/Singularity-container logical machines (SC), as Vac ran them (vac.md §4.3).

One LM is one ``apptainer exec`` process, run as the factory's unprivileged ``sc_user`` (user
namespace mode, never root) and started through :mod:`lmrunner.process`: the child writes itself
into the LM's cgroup (created and limited by the core) before it executes anything, so the whole
container tree is held to the LM's limits, and an exit is pushed, not polled. The container gets
``--contain`` (private /tmp, /var/tmp and $HOME in a per-LM ``--workdir``), ``--pid`` (its
processes die with its init, none outlives the LM), ``--ipc``, the LM's hostname (``--hostname``:
a UTS namespace, which the user namespace makes available unprivileged), ``--cleanenv`` plus an
env file (nothing of the daemon's environment leaks in; ``--no-eval`` keeps values literal) and
Vac's binds (:data:`PLACEMENT`, placed by the core in ``spec.mounts``).

Apptainer quirks handled here (each was seen on this project's hosts):

- The environment given with ``--env``/``--env-file`` is injected by apptainer's action script
  right after the image's ``/.singularity.d/env/99-base.sh``; an image with a
  ``/.singularity.d/env`` folder but no such file silently gets none of it. For such directory
  images an empty file is bound there.
- Apptainer rewrites the argv and environment of its processes (``starter``, ``appinit``), so the
  labels that let :meth:`ApptainerBackend.list_owned` recognise an LM whose record was lost are
  passed in the LM's environment (``LMRUNNER_*``): they appear in the engine configuration
  apptainer keeps in its own processes' environment and in the payload's.
- A payload's daemonised grandchild (``setsid``) leaves its session and process group; only the
  cgroup and the PID namespace (``--pid``: its init takes every process with it) still hold it.
  So stops signal the whole cgroup, or without cgroups the apptainer process's group, whose
  container init then ends the rest.
- Exit status 255 is also apptainer's own failure (image or bind source missing): the ``FATAL``
  line it logged tells them apart.

spython is not used: it always runs ``singularity``, ignores ``contain=True``, calls
``sys.exit`` on a missing bind source and has no way to start a supervised long-lived process in
a cgroup as another account; the argv is built here and run through :mod:`lmrunner.process`
(the LM) or :mod:`lmrunner.runner` (``--version``, ``pull``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from lmrunner import atomic, runner, untrusted
from lmrunner.backends.base import (
    LABEL_FACTORY,
    LABEL_NAME,
    LABEL_UUID,
    EngineState,
    Handle,
    Health,
    MachineSpec,
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
from lmrunner.process import ProcessId, Supervisor, alive, identify, read_status, start_ticks

LOG = logging.getLogger(__name__)

PLACEMENT = Placement(
    user_data=PurePosixPath("/user_data"),
    machinefeatures=PurePosixPath("/tmp/machinefeatures"),
    jobfeatures=PurePosixPath("/tmp/jobfeatures"),
    joboutputs=PurePosixPath("/tmp/joboutputs"),
)

HANDLE_VERSION = 1
#: Programs tried in this order, on PATH and then in the usual install folders.
BINARIES = ("apptainer", "singularity")
FALLBACK_DIRS = (Path("/usr/local/bin"), Path("/usr/bin"), Path("/opt/apptainer/bin"))
#: Image references pulled into the image cache before the LM starts.
PULL_SCHEMES = ("docker://", "oras://")
PULL_TIMEOUT = 900.0
VERSION_TIMEOUT = 15.0
#: Oldest engines with ``--no-eval``, ``--env-file`` and unprivileged ``--hostname``.
MIN_VERSIONS = {"apptainer": (1, 0), "singularity-ce": (3, 10)}
#: The labels, as environment variables of the LM (recognised by list_owned).
LABEL_ENV = {
    LABEL_FACTORY: "LMRUNNER_FACTORY",
    LABEL_NAME: "LMRUNNER_LM_NAME",
    LABEL_UUID: "LMRUNNER_LM_UUID",
}
#: Set in the LM with the labels, so that another backend's processes of the same account (QEMU
#: runs as sc_user too) are never taken for an Apptainer LM's.
BACKEND_ENV = "LMRUNNER_BACKEND"
#: Where apptainer injects the --env/--env-file variables (see the module docstring).
ENV_HOOK = PurePosixPath("/.singularity.d/env/99-base.sh")
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: What destroy keeps of the LM's output (the tail), like the Docker backend's container.log.
LOG_LIMIT_BYTES = 4 * 1024 * 1024
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
VERSION = re.compile(r"^(apptainer|singularity-ce|singularity) version v?((\d+)\.(\d+)\S*)")
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


@dataclass(frozen=True, slots=True)
class LmPaths:
    """The files and folders of one LM that this backend makes (all in the LM directory)."""

    directory: Path

    @property
    def mnt(self) -> Path:
        return self.directory / "mnt"

    @property
    def workdir(self) -> Path:
        """``--workdir``: the container's /tmp, /var/tmp and $HOME (Vac: ``<dir>/mnt``)."""
        return self.mnt / "workdir"

    @property
    def tmpdir(self) -> Path:
        """``APPTAINER_TMPDIR``: where an unprivileged run unpacks a SIF into a sandbox."""
        return self.mnt / "apptainer-tmp"

    @property
    def env_file(self) -> Path:
        return self.directory / "apptainer.env"

    @property
    def env_hook(self) -> Path:
        return self.directory / "apptainer-env-hook.sh"

    @property
    def log(self) -> Path:
        """Apptainer's messages and the payload's stdout/stderr (shown by ``lmrunner logs``)."""
        return self.directory / "apptainer.log"

    @property
    def status(self) -> Path:
        return self.directory / "apptainer-exit.json"


class ApptainerBackend:
    """Apptainer (or Singularity) containers as logical machines.

    No OSError, and no error of a corrupt handle or record, leaves a method of the protocol: each
    is raised again as a :class:`~lmrunner.errors.BackendError` naming the LM
    (:meth:`_host_errors`).
    """

    name: ClassVar[str] = "apptainer"
    placement: ClassVar[Placement] = PLACEMENT
    runs_as_sc_user: ClassVar[bool] = True

    def __init__(
        self,
        factory: FactoryConfig,
        cgroups: CgroupController | None,
        *,
        supervisor: Supervisor | None = None,
        run: Callable[..., runner.Completed] = runner.run,
        which: Callable[[str], str | None] = shutil.which,
        proc: Path = Path("/proc"),
        search_dirs: Sequence[Path] = FALLBACK_DIRS,
    ) -> None:
        """``supervisor``, ``run``, ``which``, ``proc`` and ``search_dirs`` (where the engine is
        looked for when it is not on PATH) are replaced by fakes in unit tests."""
        self.factory = factory
        self.cgroups = cgroups
        #: Records (``<uuid>.json``) and the image cache; created at the first start.
        self.state_dir = factory.state_dir / "apptainer"
        self._run = run
        self._which = which
        self._proc = proc
        self._search_dirs = tuple(search_dirs)
        self._supervisor = supervisor or Supervisor()
        self._lock = threading.Lock()
        self._notify: Callable[[str], None] | None = None
        #: Started by this daemon and not yet seen ending: a waiting thread records their exit.
        self._running: set[str] = set()
        self._supervisor.watch(self._exited)

    # --- the protocol ---------------------------------------------------------------------------

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
            done = self._run([binary, "--version"], timeout=VERSION_TIMEOUT)
        except LmrunnerError as err:
            return Probe(Health.UNAVAILABLE, None, f"unavailable: {binary} --version: {err}")
        text = done.stdout.strip() or done.stderr.strip()
        parsed = parse_version(text)
        if parsed is None:
            return Probe(
                Health.UNAVAILABLE, None, f"unavailable: {binary}: unknown version {text!r}"
            )
        flavour, shown, version = parsed
        need = MIN_VERSIONS.get(flavour)
        if need is None or version < need:
            wanted = " or ".join(f"{k} >= {'.'.join(map(str, v))}" for k, v in MIN_VERSIONS.items())
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
            self._validate(where, spec)
        except OSError as err:  # a path that cannot even be looked at (too long, no access)
            raise SpecError(f"{where}: {err}") from err

    def _validate(self, where: str, spec: MachineSpec) -> None:
        uid, gid = spec.owner
        if uid == 0:
            raise SpecError(f"{where}: LMs never run as root (factory.sc_user)")
        if not spec.command or not spec.command[0]:
            raise SpecError(f"{where}: empty container_command")
        bad = [key for key in spec.env if not ENV_NAME.fullmatch(key)]
        if bad:
            raise SpecError(f"{where}: invalid environment variable names {bad}")
        if spec.image.startswith(PULL_SCHEMES):
            if len(spec.image.split("://", 1)[1]) == 0:
                raise SpecError(f"{where}: empty image reference {spec.image!r}")
        elif "://" in spec.image:
            schemes = ", ".join(PULL_SCHEMES)
            raise SpecError(
                f"{where}: image {spec.image!r}: only a directory, a SIF file or {schemes} refs"
            )
        else:
            image = self._local_image(spec)
            if not image.exists():
                raise SpecError(f"{where}: image {image} does not exist")
            if not (image.is_dir() or image.is_file()):
                raise SpecError(f"{where}: image {image} is neither a directory nor a SIF file")
            _check_reachable(where, image, uid, gid, "the image")
        for mount in spec.mounts:
            for path in (str(mount.source), str(mount.target)):
                if ":" in path or "," in path:  # apptainer's --bind syntax has no escapes
                    raise SpecError(f"{where}: bind path {path!r} holds ':' or ','")
            if not mount.source.exists():
                raise SpecError(f"{where}: bind source {mount.source} does not exist")
            _check_reachable(where, mount.source, uid, gid, f"bind source of {mount.target}")
        _check_reachable(where, spec.directory, uid, gid, "the LM directory")

    def start(self, spec: MachineSpec) -> Handle:
        with self._host_errors(f"cannot start {spec.name}", StartError):
            return self._start(spec)

    def _start(self, spec: MachineSpec) -> Handle:
        if not _is_uuid(spec.uuid):  # it names the record: refused before any side effect
            raise StartError(self.name, f"cannot start {spec.name}: not an LM uuid: {spec.uuid!r}")
        record_file = self._record(spec.uuid)
        binary = self._binary()
        if binary is None:
            raise StartError(self.name, "neither apptainer nor singularity is installed")
        image = self._image(spec, binary)
        paths = LmPaths(spec.directory)
        try:
            hook = self._prepare(spec, image, paths)
        except OSError as err:
            _remove_quietly(paths)
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
                user=spec.owner,
                env=self._process_env(binary, spec, paths),
                cwd=paths.workdir,
            )
        except CommandError as err:
            with self._lock:
                self._running.discard(spec.uuid)
            _remove_quietly(paths)
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
            _remove_quietly(paths)
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
        fatal = _fatal_line(paths.log) if paths is not None and code == 255 else None
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
                _remove(paths)
                _keep_tail(paths.log, LOG_LIMIT_BYTES)
            self._record(uuid).unlink(missing_ok=True)

    def list_owned(self) -> list[Owned]:
        with self._host_errors("cannot list LMs"):
            return self._list_owned()

    def _list_owned(self) -> list[Owned]:
        owned: dict[str, Owned] = {}
        for file in sorted(self.state_dir.glob("*.json")):
            if not _is_uuid(file.stem):
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
        for name in BINARIES:
            found = self._which(name)
            if found:
                return found
        for folder in self._search_dirs:
            for name in BINARIES:
                candidate = folder / name
                if os.access(candidate, os.X_OK):
                    return str(candidate)
        return None

    def _record(self, uuid: str) -> Path:
        if not _is_uuid(uuid):  # the uuid names a file: never a path
            raise BackendError(self.name, f"not an LM uuid: {uuid!r}")
        return self.state_dir / f"{uuid}.json"

    def _local_image(self, spec: MachineSpec) -> Path:
        """An absolute path as is; a relative one in the machinetype's default files/."""
        image = Path(spec.image)
        if image.is_absolute():
            return image
        return self.factory.state_dir / "machinetypes" / spec.machinetype / "files" / image

    def _image(self, spec: MachineSpec, binary: str) -> Path:
        """The image to run: a local path, or a registry ref pulled once into the cache."""
        if not spec.image.startswith(PULL_SCHEMES):
            return self._local_image(spec)
        cache = self.state_dir / "images"
        target = cache / (hashlib.sha256(spec.image.encode()).hexdigest()[:32] + ".sif")
        if target.is_file():
            return target
        partial = cache / f".{target.name}.{os.getpid()}.part"
        LOG.info("apptainer: pulling %s", spec.image)
        try:
            # 0755/0644: readable by sc_user, writable only by the daemon (no LM can alter it).
            cache.mkdir(mode=0o755, parents=True, exist_ok=True)
            self.state_dir.chmod(0o755)
            layers = str(cache / "layers")
            self._run(
                [binary, "--quiet", "pull", "--force", partial, spec.image],
                timeout=PULL_TIMEOUT,
                env={"PATH": HOST_PATH, "HOME": str(cache), "LANG": "C",
                     "APPTAINER_CACHEDIR": layers, "SINGULARITY_CACHEDIR": layers},
            )  # fmt: skip
            partial.chmod(0o644)
            partial.replace(target)
        except (LmrunnerError, OSError) as err:
            partial.unlink(missing_ok=True)
            detail = err.stderr.strip() if isinstance(err, CommandError) and err.stderr else err
            raise StartError(
                self.name,
                f"image {spec.image} is not here and cannot be pulled (no registry reachable?): "
                f"{detail}",
            ) from err
        return target

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

    def _process_env(self, binary: str, spec: MachineSpec, paths: LmPaths) -> dict[str, str]:
        """The environment of the apptainer process itself (the container's is --cleanenv)."""
        try:
            home = pwd.getpwuid(spec.owner[0]).pw_dir
        except KeyError:
            home = str(paths.workdir)
        return {
            "PATH": f"{Path(binary).parent}:{HOST_PATH}",
            "HOME": home,
            "LANG": "C",
            "APPTAINER_TMPDIR": str(paths.tmpdir),
            "SINGULARITY_TMPDIR": str(paths.tmpdir),
            "APPTAINER_CACHEDIR": str(paths.tmpdir / "cache"),
            "SINGULARITY_CACHEDIR": str(paths.tmpdir / "cache"),
        }

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

    def _labelled(self) -> dict[str, tuple[dict[str, str], list[ProcessId]]]:
        """Processes of sc_user carrying lmrunner's labels, by LM uuid."""
        try:
            uid = pwd.getpwnam(self.factory.sc_user).pw_uid
        except KeyError:
            return {}
        if uid == 0:
            return {}  # validate() refuses root; never scan root's processes
        found: dict[str, tuple[dict[str, str], list[ProcessId]]] = {}
        try:
            entries = list(self._proc.iterdir())
        except OSError as err:
            LOG.warning("apptainer: cannot list processes in %s: %s", self._proc, err)
            return found
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                if _real_uid(entry / "status") != uid:
                    continue
                labels = labels_in_environ((entry / "environ").read_bytes())
                fields = (entry / "stat").read_text()
            except (OSError, ValueError):
                continue  # it ended meanwhile
            if not labels or labels.get(BACKEND_ENV) != self.name:
                continue
            uuid = labels.get(LABEL_ENV[LABEL_UUID], "")
            if not _is_uuid(uuid) or LABEL_ENV[LABEL_FACTORY] not in labels:
                continue
            ticks = start_ticks(fields)
            if ticks is None:
                continue
            found.setdefault(uuid, (labels, []))[1].append(ProcessId(int(entry.name), ticks))
        return found


# --- pure helpers (unit-tested) -------------------------------------------------------------------


def parse_version(text: str) -> tuple[str, str, tuple[int, int]] | None:
    """``"apptainer version 1.4.5"`` -> ``("apptainer", "1.4.5", (1, 4))``; None when not
    recognised."""
    match = VERSION.match(text.strip())
    if match is None:
        return None
    return match.group(1), match.group(2), (int(match.group(3)), int(match.group(4)))


def build_argv(
    binary: str, spec: MachineSpec, image: Path, paths: LmPaths, *, hook: Path | None
) -> list[str]:
    """The ``apptainer exec`` command line of an LM (Vac's, vac.md §4.3, plus isolation)."""
    argv = [
        binary, "--quiet", "exec",
        "--contain", "--pid", "--ipc", "--cleanenv", "--no-eval",
        "--hostname", spec.name,
        "--workdir", str(paths.workdir), "--pwd", "/tmp",
        "--env-file", str(paths.env_file),
    ]  # fmt: skip
    for mount in spec.mounts:
        mode = "ro" if mount.read_only else "rw"
        argv += ["--bind", f"{mount.source}:{mount.target}:{mode}"]
    if hook is not None:
        argv += ["--bind", f"{hook}:{ENV_HOOK}:ro"]
    return [*argv, str(image), *spec.command]


def env_file_text(env: Mapping[str, str]) -> str:
    """An ``--env-file``: one ``KEY='value'`` per line (shell quoting; ``--no-eval`` keeps the
    value literal)."""
    return "".join(f"{key}={shlex.quote(value)}\n" for key, value in sorted(env.items()))


def needs_env_hook(image: Path) -> bool:
    """Whether a directory image drops --env/--env-file variables without an env hook file."""
    env_dir = image / ".singularity.d" / "env"
    return image.is_dir() and env_dir.is_dir() and not (env_dir / ENV_HOOK.name).exists()


def labels_in_environ(data: bytes) -> dict[str, str] | None:
    """lmrunner's labels from a process's ``/proc/<pid>/environ``, or None when it has none.

    A payload process has them as plain variables; apptainer's own processes (``starter``,
    ``appinit``) carry them inside the engine configuration JSON (``ENGINE_CONFIG1..N``).
    """
    if b"LMRUNNER_LM_UUID" not in data:
        return None
    names = (*LABEL_ENV.values(), BACKEND_ENV)
    plain: dict[str, str] = {}
    chunks: dict[int, str] = {}
    for entry in data.decode(errors="replace").split("\0"):
        key, sep, value = entry.partition("=")
        if not sep:
            continue
        if key in names:
            plain[key] = value
        elif key.startswith("ENGINE_CONFIG") and key[len("ENGINE_CONFIG") :].isdigit():
            chunks[int(key[len("ENGINE_CONFIG") :])] = value
    if LABEL_ENV[LABEL_UUID] in plain:
        return plain
    if not chunks:
        return None
    try:
        config = json.loads("".join(chunks[i] for i in sorted(chunks)))
        found = next(
            (d for d in _dicts(config) if isinstance(d.get(LABEL_ENV[LABEL_UUID]), str)), None
        )
    except (ValueError, RecursionError):  # not JSON, or nested deeper than any engine's config
        return None
    if found is None:
        return None
    return {k: str(found[k]) for k in names if isinstance(found.get(k), str)}


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _dicts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _dicts(item)


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid_mod.UUID(value)) == value
    except ValueError:
        return False


def _real_uid(status_file: Path) -> int | None:
    for line in status_file.read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return None


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
    if identify(process.pid) != process:
        return
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signum)
        else:
            os.kill(process.pid, signum)


def _check_reachable(where: str, path: Path, uid: int, gid: int, what: str) -> None:
    """Raise SpecError when the LM's account cannot reach ``path`` (every folder above it needs
    search permission for it: apptainer runs as that account)."""
    groups = {gid}
    for folder in _folders_above(path):
        try:
            info = folder.stat()
        except OSError as err:
            raise SpecError(f"{where}: cannot look at {folder}: {err.strerror}") from err
        if not _permits(info, uid, groups, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            raise SpecError(
                f"{where}: {what} {path} is out of reach of uid {uid}: {folder} is "
                f"{stat.filemode(info.st_mode)} (owner uid {info.st_uid})"
            )
    try:
        info = path.stat()
    except OSError as err:
        raise SpecError(f"{where}: cannot look at {path}: {err.strerror}") from err
    if not _permits(info, uid, groups, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH):
        raise SpecError(f"{where}: {what} {path} is not readable by uid {uid}")


def _folders_above(path: Path) -> list[Path]:
    """``/``, then each folder down to ``path``'s parent (a seam for unit tests)."""
    return list(reversed(path.parents))


def _permits(
    info: os.stat_result, uid: int, groups: set[int], user: int, group: int, other: int
) -> bool:
    if info.st_uid == uid:
        return bool(info.st_mode & user)
    if info.st_gid in groups:
        return bool(info.st_mode & group)
    return bool(info.st_mode & other)


def _remove(paths: LmPaths) -> None:
    """Remove what this backend made for an LM that holds data (workdir, unpacked images).

    Raises:
        OSError, UntrustedFileError: something could not be removed.
    """
    for folder in (paths.workdir, paths.tmpdir):
        untrusted.remove_tree(folder)  # the LM's account writes there: never follow its links
    for file in (paths.env_file, paths.env_hook):
        file.unlink(missing_ok=True)


def _remove_quietly(paths: LmPaths) -> None:
    """:func:`_remove` after a failed start, where the start's own error must be what is told."""
    try:
        _remove(paths)
    except (OSError, untrusted.UntrustedFileError) as err:
        LOG.warning("apptainer: cannot remove what was made in %s: %s", paths.directory, err)


def _keep_tail(path: Path, limit: int) -> None:
    """Cut a finished LM's log to its last ``limit`` bytes (a chatty payload fills no disk)."""
    try:
        size = path.stat().st_size
        if size <= limit:
            return
        with path.open("rb") as handle:
            handle.seek(size - limit)
            tail = handle.read()
        atomic.write_text(path, tail.decode(errors="replace"), durable=False)
    except OSError as err:
        LOG.warning("apptainer: cannot shorten %s: %s", path, err)


def _fatal_line(log: Path) -> str | None:
    """Apptainer's own ``FATAL:`` message at the end of the LM's log, if it printed one."""
    try:
        with log.open("rb") as handle:
            handle.seek(max(log.stat().st_size - 65536, 0))
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("FATAL:"):
            return " ".join(line.removeprefix("FATAL:").split())
    return None
