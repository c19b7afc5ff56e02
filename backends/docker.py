"""Docker-container logical machines (DC), through the Docker SDK (no ``docker`` CLI strings).

Each LM is one container: created with lmrunner's labels, Vac's bind mounts (from the core),
hard limits (CPU quota, memory and swap, pids) under lmrunner's cgroup parent, no new privileges
and a reduced capability set. Exits arrive through Docker's event stream; the watcher reconnects
when the daemon restarts and then asks the core to look at every LM, since events may have been
missed meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import docker
import docker.errors
import requests
import urllib3.exceptions

from lmrunner import atomic
from lmrunner.backends.base import (
    LABEL_FACTORY,
    LABEL_NAME,
    LABEL_UUID,
    EngineState,
    Handle,
    Health,
    MachineSpec,
    OptionsType,
    Owned,
    Probe,
    Status,
)
from lmrunner.config import MachinetypeConfig
from lmrunner.errors import (
    BackendError,
    BackendUnavailable,
    LmrunnerError,
    MachineNotFound,
    SpecError,
    StartError,
)
from lmrunner.model import ETC_PLACEMENT, Placement

LOG = logging.getLogger(__name__)

PLACEMENT = ETC_PLACEMENT


@dataclass(frozen=True, slots=True)
class DockerOptions:
    """The Docker backend's options, from the machinetype (the schema checked them)."""

    capabilities: tuple[str, ...] = ()  # added to the reduced default set

    @classmethod
    def from_machinetype(cls, mt: MachinetypeConfig, files_dir: Path) -> DockerOptions:
        return cls(capabilities=mt.capabilities)

    @classmethod
    def of(cls, spec: MachineSpec) -> DockerOptions:
        """The spec's options (the defaults when the core gave none, as tests do)."""
        return spec.options if isinstance(spec.options, cls) else cls()


HANDLE_VERSION = 1
MIN_API = (1, 40)  # Docker 19.03: nano_cpus, pids_limit, events with label filters
#: Docker's default set less MKNOD, NET_RAW, SETFCAP, SETPCAP and AUDIT_WRITE, which payloads
#: do not need; a machinetype adds more with `capabilities:` (and `lmrunner check` warns).
DEFAULT_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
                        "NET_BIND_SERVICE", "SYS_CHROOT")  # fmt: skip
#: What destroy keeps of the payload's output in ``<LM dir>/container.log`` (its end).
LOG_LIMIT_BYTES = 4 * 1024 * 1024
LOG_TAIL_LINES = 5000
#: What dockerd keeps of a payload's output on the host (json-file's own rotation): it lives in
#: /var/lib/docker, outside the LM's filesystem, so it must be bounded here.
ENGINE_LOG = {"type": "json-file", "config": {"max-size": "8m", "max-file": "2"}}
#: With its own filesystem an LM's root is read-only (dockerd's writable layer would be in
#: /var/lib/docker, unbounded); these get writable folders on its filesystem instead.
WRITABLE_PATHS = (("/tmp", "docker-tmp"), ("/var/tmp", "docker-var-tmp"))
#: What the Docker SDK lets out: its own errors; requests' (OSErrors, like the socket's own);
#: urllib3's when a streamed answer breaks off (events, logs); ValueError for an answer that is
#: not the JSON it should be.
ENGINE_ERRORS: tuple[type[Exception], ...] = (
    docker.errors.DockerException,
    OSError,
    urllib3.exceptions.HTTPError,
    ValueError,
)


class DockerBackend:
    """Docker containers as logical machines.

    No exception of the SDK or its transport leaves a method of the protocol: each is raised
    again as a :class:`~lmrunner.errors.BackendError` naming the LM (:meth:`_engine_errors`).
    """

    name: ClassVar[str] = "docker"
    placement: ClassVar[Placement] = PLACEMENT
    options_type: ClassVar[OptionsType] = DockerOptions
    runs_as_sc_user: ClassVar[bool] = False

    def __init__(
        self,
        cgroup_parent: str = "/lmrunner",
        client_factory: Callable[[], Any] | None = None,
        *,
        lm_slices: bool | None = None,
    ) -> None:
        self.cgroup_parent = "/" + cgroup_parent.strip("/")
        # Whether the LM cgroups are systemd slices (True), directories (False) or absent.
        self.lm_slices = lm_slices
        self._client_factory = client_factory or (lambda: docker.from_env(timeout=60))
        self._client: Any = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._outages: list[tuple[float, float]] = []  # when the event stream was down
        self._driver: str | None = None  # dockerd's cgroup driver, from the probe

    @property
    def client(self) -> Any:
        """The connection to dockerd, made at first use. Raises what the SDK raises: every use
        is inside :meth:`_engine_errors` (or catches :data:`ENGINE_ERRORS`), which names what
        was being done."""
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    # --- the protocol ---------------------------------------------------------------------------

    def disk_overhead(self, disk_bytes: int) -> int:
        return 0  # the payload's files are all there is

    def memory_overhead(self) -> int:
        return 0  # the LM's processes are all there is

    def probe(self) -> Probe:
        try:
            return self._probe()
        except Exception as err:  # the contract: never raises; a surprise is a reason, logged
            LOG.exception("docker: the probe failed unexpectedly")
            return Probe(Health.UNAVAILABLE, None, f"unavailable: {type(err).__name__}: {err}")

    def validate(self, spec: MachineSpec) -> None:
        image = _image(spec.image)
        if not image:
            raise SpecError(f"docker: machinetype {spec.machinetype}: empty image")
        for capability in DockerOptions.of(spec).capabilities:
            if capability in ("ALL",):
                raise SpecError(
                    f"docker: machinetype {spec.machinetype}: capability ALL is refused"
                )

    def start(self, spec: MachineSpec) -> Handle:
        image = _image(spec.image)
        try:
            client = self.client
        except ENGINE_ERRORS as err:
            why = f"cannot connect to Docker to start {spec.name}: {err}"
            raise StartError(self.name, why, recoverable=True) from err
        self._ensure_image(image, spec.name)
        capabilities = sorted({*DEFAULT_CAPABILITIES, *DockerOptions.of(spec).capabilities})
        volumes = {
            str(m.source): {"bind": str(m.target), "mode": "ro" if m.read_only else "rw"}
            for m in spec.mounts
        }
        volumes.update(_writable_paths(spec))
        with self._engine_errors(f"cannot create the container of {spec.name}", StartError):
            container = client.containers.create(
                image,
                list(spec.command),
                name=f"{spec.name}_{spec.uuid[:8]}",  # LM names are reused slot by slot
                hostname=spec.name,
                labels=dict(spec.labels),
                environment=dict(spec.env),
                volumes=volumes,
                read_only=spec.disk is not None,
                log_config=ENGINE_LOG,
                nano_cpus=spec.limits.processors * 1_000_000_000,  # a hard CPU quota
                mem_limit=spec.limits.memory_bytes,
                memswap_limit=spec.limits.memory_bytes + spec.limits.swap_bytes,
                pids_limit=spec.limits.pids or None,
                # Below the LM's cgroup, whose limits and counters then cover the container;
                # runc makes the container's own cgroup there and removes it with the container.
                cgroup_parent=self._cgroup_parent(spec),
                security_opt=["no-new-privileges"],
                cap_drop=["ALL"],
                cap_add=capabilities,
                privileged=False,
                detach=True,
            )
        try:
            with self._engine_errors(f"cannot start the container of {spec.name}", StartError):
                container.start()
                container_id = str(container.id)
        except StartError:
            try:
                self._remove(spec.uuid, container)
            except BackendError as err:  # it carries our labels: a reconcile removes it
                LOG.warning("lm=%s: %s", spec.name, err)
            raise
        data = {"id": container_id, "directory": str(spec.directory)}
        return Handle(HANDLE_VERSION, data, {"container": container_id[:12]})

    def recover(self, uuid: str, handle: Handle) -> None:
        self._container(uuid, handle)  # raises MachineNotFound when it is gone

    def inspect(self, uuid: str, handle: Handle) -> Status:
        try:
            container = self._container(uuid, handle)
        except MachineNotFound:
            return Status(EngineState.MISSING, detail="container not found")
        attrs = getattr(container, "attrs", None)
        state = attrs.get("State") if isinstance(attrs, dict) else None
        if not isinstance(state, dict):
            raise BackendError(
                self.name, f"LM {uuid}: Docker tells no state of container {container.id!s:.12}"
            )
        if state.get("Running") or state.get("Status") in ("created", "restarting"):
            return Status(EngineState.RUNNING)
        ended = _timestamp(state.get("FinishedAt"))
        fault = None
        code = state.get("ExitCode")
        code = code if isinstance(code, int) and not isinstance(code, bool) else None
        if ended is not None and any(start - 5 <= ended <= end for start, end in self._outages):
            fault = "Docker daemon restarted while the LM ran"  # it died with dockerd
        return Status(
            EngineState.EXITED,
            exit_code=code,
            oom_killed=state.get("OOMKilled") is True,
            ended_at=ended,
            detail=str(state.get("Error") or ""),
            engine_fault=fault,
        )

    def stop(self, uuid: str, handle: Handle, *, force: bool = False) -> None:
        try:
            container = self._container(uuid, handle)
        except MachineNotFound:
            return
        with self._engine_errors(f"cannot signal the container of LM {uuid}"):
            try:
                # kill() with a signal returns at once; container.stop() would block for the grace.
                container.kill(signal="SIGKILL" if force else "SIGTERM")
            except docker.errors.NotFound:
                return  # removed meanwhile
            except docker.errors.APIError as err:
                if err.status_code != 409:  # 409: not running any more; its exit is on its way
                    raise

    def destroy(self, uuid: str, handle: Handle) -> None:
        try:
            container = self._container(uuid, handle)
        except MachineNotFound:
            return
        directory = handle.data.get("directory")
        if isinstance(directory, str) and directory:
            self._keep_log(uuid, container, Path(directory))
        self._remove(uuid, container)

    def list_owned(self) -> list[Owned]:
        with self._engine_errors("cannot list containers", BackendUnavailable):
            containers = self._retrying(
                lambda client: client.containers.list(
                    all=True, filters={"label": LABEL_FACTORY}, ignore_removed=True
                )
            )
            return [
                Owned(
                    str(c.labels.get(LABEL_UUID, "")),
                    str(c.labels.get(LABEL_NAME, "")),
                    str(c.labels.get(LABEL_FACTORY, "")),
                    Handle(HANDLE_VERSION, {"id": str(c.id)}, {"container": str(c.id)[:12]}),
                )
                for c in containers
            ]

    def watch(self, notify: Callable[[str], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._watch, args=(notify,), name="docker-events", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        self._closed.set()
        client, self._client = self._client, None
        if client is not None:
            with self._engine_errors("cannot close the connection to Docker"):
                client.close()

    # --- internals --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _engine_errors(self, what: str, error: type[BackendError] = BackendError) -> Iterator[None]:
        """Raise what the SDK raises while doing ``what`` as ``error`` (chained): the one place
        Docker's errors become lmrunner's. lmrunner's own errors pass unchanged."""
        try:
            yield
        except ENGINE_ERRORS as err:
            raise error(self.name, f"{what}: {err}") from err

    def _probe(self) -> Probe:
        version: str | None = None
        try:
            with self._engine_errors("cannot connect to Docker", BackendUnavailable):
                client = self.client
            with self._engine_errors("cannot ask Docker its version", BackendUnavailable):
                answer = client.version()
            facts = answer if isinstance(answer, dict) else {}
            version = str(facts["Version"]) if "Version" in facts else None
            api = _api_version(facts.get("ApiVersion"))
            if api < MIN_API:
                need = ".".join(map(str, MIN_API))
                shown = ".".join(map(str, api))
                return Probe(
                    Health.UNAVAILABLE, version, f"unavailable: API {shown} older than {need}"
                )
            with self._engine_errors("cannot ask Docker its cgroup driver", BackendUnavailable):
                info = client.info()
        except LmrunnerError as err:
            return Probe(Health.UNAVAILABLE, version, f"unavailable: {err}")
        driver = str(info.get("CgroupDriver", "cgroupfs")) if isinstance(info, dict) else "?"
        self._driver = driver
        if driver == "systemd" and self.lm_slices is False:
            # Its systemd driver takes only a slice, and the LM cgroups are directories.
            return Probe(
                Health.UNAVAILABLE,
                version,
                "unavailable: dockerd uses the systemd cgroup driver but the LM cgroups are "
                "directories (factory cgroup_manager: cgroupfs, or a cgroup v1 host): set "
                "cgroup_manager to auto or systemd, or run dockerd with "
                "--exec-opt native.cgroupdriver=cgroupfs",
            )
        where = "in each LM's slice" if driver == "systemd" else "below each LM's cgroup"
        return Probe(
            Health.OK,
            version,
            f"API {'.'.join(map(str, api))}, cgroup driver {driver} (containers {where})",
        )

    def _cgroup_parent(self, spec: MachineSpec) -> str:
        """Where runc makes the container's cgroup: inside the LM's cgroup, named as dockerd's
        cgroup driver wants it.

        Docker's systemd driver takes only a slice (``docker-<id>.scope`` goes in it): the LM's
        slice where systemd manages the LM cgroups (``engine_unit``); the cgroupfs driver takes a
        path. An LM cgroup that is a plain directory has only a path: with the systemd driver,
        dockerd refuses it and says why.
        """
        cgroup = spec.cgroup
        if cgroup is None:
            if self._driver == "systemd":
                return "-".join(self.cgroup_parent.strip("/").split("/")) + ".slice"
            return self.cgroup_parent
        if cgroup.engine_unit is None:
            return cgroup.engine_path if cgroup.engine_path is not None else self.cgroup_parent
        if self._driver is None:
            with self._engine_errors("cannot ask Docker its cgroup driver", StartError):
                info = self.client.info()
            self._driver = str(info.get("CgroupDriver", "cgroupfs"))
        if self._driver == "systemd" or cgroup.engine_path is None:
            return cgroup.engine_unit
        return cgroup.engine_path

    def _watch(self, notify: Callable[[str], None]) -> None:
        """Follow Docker's events; after a break (dockerd restart), tell the core to look at all.

        Every error of the engine (or of an event of a strange shape) only breaks the stream,
        which is made again: this thread must not end while the backend is open.
        """
        lost_at: float | None = None
        errors: tuple[type[Exception], ...] = (*ENGINE_ERRORS, LmrunnerError)
        while not self._closed.is_set():
            try:
                client = self._client_factory()  # its own connection: the stream blocks it
                stream = client.events(
                    decode=True, filters={"type": "container", "label": LABEL_FACTORY}
                )
                if lost_at is not None:
                    LOG.warning("docker: event stream reconnected; checking every LM")
                    self._outages.append((lost_at, time.time()))
                    self._client = None  # the old connection may have died with dockerd
                    for owned in self.list_owned():
                        notify(owned.uuid)
                    lost_at = None
                for event in stream:
                    uuid = _ended_uuid(event)
                    if uuid:
                        notify(uuid)
                    if self._closed.is_set():
                        return
                problem = "the stream ended"  # dockerd stopped
            except errors as err:
                problem = str(err)
            if not self._closed.is_set() and lost_at is None:
                LOG.warning("docker: event stream lost (%s); reconnecting", problem)
                lost_at = time.time()
            self._closed.wait(1.0)

    def _retrying(self, call: Callable[[Any], Any]) -> Any:
        """``call(client)``, once more on a fresh connection if the first one is dead (a
        restarted dockerd leaves the pooled connection broken)."""
        try:
            return call(self.client)
        except requests.ConnectionError:
            self._client = None
            return call(self.client)

    def _container(self, uuid: str, handle: Handle) -> Any:
        """The LM's container (its id is in the handle).

        Raises:
            MachineNotFound: Docker has no such container.
            BackendUnavailable: Docker does not answer (or answers with an error).
            BackendError: the handle names no container (corrupt, or not Docker's).
        """
        container_id = handle.data.get("id")
        if not isinstance(container_id, str) or not container_id:
            raise BackendError(self.name, f"LM {uuid}: its handle names no container")
        try:
            return self._retrying(lambda client: client.containers.get(container_id))
        except docker.errors.NotFound as err:
            raise MachineNotFound(
                self.name, f"LM {uuid}: container {container_id[:12]} not found"
            ) from err
        except ENGINE_ERRORS as err:
            raise BackendUnavailable(
                self.name, f"LM {uuid}: cannot look up container {container_id[:12]}: {err}"
            ) from err

    def _remove(self, uuid: str, container: Any) -> None:
        """Remove the container, running or not; one already gone is success."""
        with (
            self._engine_errors(f"cannot remove the container of LM {uuid}"),
            contextlib.suppress(docker.errors.NotFound),
        ):
            container.remove(force=True)

    def _keep_log(self, uuid: str, container: Any, directory: Path) -> None:
        """Keep the end of what the payload printed in ``container.log`` of the LM directory
        (for ``lmrunner logs``). Best effort: the container goes in any case.

        The LM directory belongs to root and no payload writes it, so a plain atomic write
        will do; what is kept is bounded, and so is what is held in memory meanwhile.
        """
        try:
            if not directory.is_dir():
                return
            with self._engine_errors(f"cannot read the log of LM {uuid}"):
                chunks = container.logs(
                    stdout=True, stderr=True, stream=True, follow=False, tail=LOG_TAIL_LINES
                )
                data = _last_bytes(chunks, LOG_LIMIT_BYTES)
            atomic.write_bytes(directory / "container.log", data, durable=False)
        except (BackendError, OSError) as err:
            LOG.warning("lm=%s: cannot keep the container's log: %s", uuid, err)

    def _ensure_image(self, image: str, name: str) -> None:
        """Pull only when the image is absent, and say clearly when that cannot work (for LM
        ``name``)."""
        try:
            self.client.images.get(image)
            return
        except docker.errors.ImageNotFound:
            pass
        except ENGINE_ERRORS as err:
            raise StartError(
                self.name, f"cannot look up image {image} for {name}: {err}", recoverable=True
            ) from err
        LOG.info("docker: pulling %s", image)
        with self._engine_errors(
            f"image {image} is not here and cannot be pulled for {name} (no registry reachable?)",
            StartError,
        ):
            self.client.images.pull(image)


def _image(image: str) -> str:
    return image.removeprefix("docker://")


def _api_version(value: Any) -> tuple[int, ...]:
    """``"1.41"`` -> ``(1, 41)``; ``(0, 0)`` for anything that is no API version."""
    parts = str(value).split(".")[:2]
    if len(parts) != 2 or not all(part.isdecimal() for part in parts):
        return (0, 0)
    return tuple(int(part) for part in parts)


def _ended_uuid(event: Any) -> str | None:
    """The uuid label of the container a Docker event says may have ended, else None."""
    if not isinstance(event, dict) or event.get("status") not in ("die", "oom", "destroy", "kill"):
        return None
    actor = event.get("Actor")
    attributes = actor.get("Attributes") if isinstance(actor, dict) else None
    uuid = attributes.get(LABEL_UUID) if isinstance(attributes, dict) else None
    return uuid if isinstance(uuid, str) and uuid else None


def _last_bytes(chunks: Iterable[bytes], limit: int) -> bytes:
    """The last ``limit`` bytes of a stream, holding at most twice that meanwhile."""
    kept = bytearray()
    for chunk in chunks:
        kept += chunk
        if len(kept) > 2 * limit:
            del kept[:-limit]
    return bytes(kept[-limit:])


def _timestamp(value: Any) -> float | None:
    """Docker's RFC 3339 time with nanoseconds, as a Unix time (None for the zero time)."""
    if not isinstance(value, str) or value.startswith("0001-"):
        return None
    text = value.rstrip("Z")
    if "." in text:
        head, fraction = text.split(".", 1)
        text = f"{head}.{fraction[:6]}"
    try:
        return datetime.fromisoformat(text + "+00:00").timestamp()
    except ValueError:
        return None


def _writable_paths(spec: MachineSpec) -> dict[str, dict[str, str]]:
    """Binds of folders on the LM's own filesystem for the usual writable paths its read-only
    root lacks (a tmp_binds entry for one of them wins); none without such a filesystem."""
    if spec.disk is None:
        return {}
    taken = {str(m.target) for m in spec.mounts}
    binds = {}
    for target, name in WRITABLE_PATHS:
        if target in taken:
            continue
        folder = spec.disk / name
        try:
            folder.mkdir(exist_ok=True)
            folder.chmod(0o1777)  # as /tmp: any account of the image may write there
        except OSError as err:
            raise StartError("docker", f"cannot make {folder}: {err.strerror}") from err
        binds[str(folder)] = {"bind": target, "mode": "rw"}
    return binds
