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
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import docker
import docker.errors
import requests

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
from lmrunner.errors import BackendUnavailable, MachineNotFound, SpecError, StartError
from lmrunner.model import ETC_PLACEMENT, Placement

LOG = logging.getLogger(__name__)

PLACEMENT = ETC_PLACEMENT
HANDLE_VERSION = 1
MIN_API = (1, 40)  # Docker 19.03: nano_cpus, pids_limit, events with label filters
#: Docker's default set less MKNOD, NET_RAW, SETFCAP, SETPCAP and AUDIT_WRITE, which payloads
#: do not need; a machinetype adds more with `capabilities:` (and `lmrunner check` warns).
DEFAULT_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
                        "NET_BIND_SERVICE", "SYS_CHROOT")  # fmt: skip
LOG_LIMIT_BYTES = 4 * 1024 * 1024


class DockerBackend:
    """Docker containers as logical machines."""

    name: ClassVar[str] = "docker"
    placement: ClassVar[Placement] = PLACEMENT
    runs_as_sc_user: ClassVar[bool] = False

    def __init__(
        self, cgroup_parent: str = "/lmrunner", client_factory: Callable[[], Any] | None = None
    ) -> None:
        self.cgroup_parent = "/" + cgroup_parent.strip("/")
        self._client_factory = client_factory or (lambda: docker.from_env(timeout=60))
        self._client: Any = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._outages: list[tuple[float, float]] = []  # when the event stream was down

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                self._client = self._client_factory()
            except docker.errors.DockerException as err:
                raise BackendUnavailable(self.name, f"cannot connect to Docker: {err}") from err
        return self._client

    # --- the protocol ---------------------------------------------------------------------------

    def memory_overhead(self) -> int:
        return 0  # the LM's processes are all there is

    def probe(self) -> Probe:
        try:
            version = self.client.version()
        except (
            docker.errors.DockerException,
            BackendUnavailable,
            requests.RequestException,
        ) as err:
            return Probe(Health.UNAVAILABLE, None, f"unavailable: {err}")
        api = tuple(int(part) for part in str(version.get("ApiVersion", "0.0")).split(".")[:2])
        if api < MIN_API:
            need = ".".join(map(str, MIN_API))
            return Probe(
                Health.UNAVAILABLE,
                version.get("Version"),
                f"unavailable: API {api} older than {need}",
            )
        try:
            driver = str(self.client.info().get("CgroupDriver", "cgroupfs"))
        except (docker.errors.DockerException, requests.RequestException) as err:
            return Probe(Health.UNAVAILABLE, version.get("Version"), f"unavailable: {err}")
        if driver == "systemd":
            # Containers go inside their LM's cgroup (a path), which systemd's driver refuses.
            return Probe(
                Health.UNAVAILABLE,
                version.get("Version"),
                "unavailable: dockerd uses the systemd cgroup driver; lmrunner needs "
                "--exec-opt native.cgroupdriver=cgroupfs",
            )
        return Probe(
            Health.OK,
            version.get("Version"),
            f"API {version.get('ApiVersion')}, cgroup driver {driver}",
        )

    def validate(self, spec: MachineSpec) -> None:
        image = _image(spec.image)
        if not image:
            raise SpecError(f"docker: machinetype {spec.machinetype}: empty image")
        for capability in spec.options.get("capabilities", ()):
            if capability in ("ALL",):
                raise SpecError(
                    f"docker: machinetype {spec.machinetype}: capability ALL is refused"
                )

    def start(self, spec: MachineSpec) -> Handle:
        image = _image(spec.image)
        self._ensure_image(image)
        capabilities = sorted({*DEFAULT_CAPABILITIES, *spec.options.get("capabilities", ())})
        try:
            container = self.client.containers.create(
                image,
                list(spec.command),
                name=f"{spec.name}_{spec.uuid[:8]}",  # LM names are reused slot by slot
                hostname=spec.name,
                labels=dict(spec.labels),
                environment=dict(spec.env),
                volumes={
                    str(m.source): {"bind": str(m.target), "mode": "ro" if m.read_only else "rw"}
                    for m in spec.mounts
                },
                nano_cpus=spec.limits.processors * 1_000_000_000,  # a hard CPU quota
                mem_limit=spec.limits.memory_bytes,
                memswap_limit=spec.limits.memory_bytes + spec.limits.swap_bytes,
                pids_limit=spec.limits.pids or None,
                # Below the LM's cgroup, whose limits and counters then cover the container;
                # runc makes the container's own cgroup there and removes it with the container.
                cgroup_parent=(
                    spec.cgroup.engine_path
                    if spec.cgroup is not None and spec.cgroup.engine_path is not None
                    else self.cgroup_parent
                ),
                security_opt=["no-new-privileges"],
                cap_drop=["ALL"],
                cap_add=capabilities,
                privileged=False,
                detach=True,
            )
        except (docker.errors.DockerException, requests.RequestException) as err:
            raise StartError(
                self.name, f"cannot create the container of {spec.name}: {err}"
            ) from err
        try:
            container.start()
        except (docker.errors.DockerException, requests.RequestException) as err:
            _remove_quietly(container)
            raise StartError(
                self.name, f"cannot start the container of {spec.name}: {err}"
            ) from err
        data = {"id": container.id, "directory": str(spec.directory)}
        return Handle(HANDLE_VERSION, data, {"container": str(container.id)[:12]})

    def recover(self, uuid: str, handle: Handle) -> None:
        self._container(handle)  # raises MachineNotFound when it is gone

    def inspect(self, uuid: str, handle: Handle) -> Status:
        try:
            container = self._container(handle)
        except MachineNotFound:
            return Status(EngineState.MISSING, detail="container not found")
        state = container.attrs.get("State", {})
        if state.get("Running") or state.get("Status") in ("created", "restarting"):
            return Status(EngineState.RUNNING)
        ended = _timestamp(state.get("FinishedAt"))
        interrupted = None
        code = state.get("ExitCode")
        if ended is not None and any(start - 5 <= ended <= end for start, end in self._outages):
            # It died while dockerd was down or restarting: the site's doing, not the payload's.
            interrupted = "Docker daemon restarted while the LM ran"
        elif code in (137, 143) and not state.get("OOMKilled"):
            # Its init died of (or passed on) SIGTERM/SIGKILL that lmrunner did not send (when
            # lmrunner stops an LM, its own reason wins): dockerd stopping, or an admin.
            interrupted = f"Stopped from outside lmrunner (exit status {code}: dockerd or an admin)"
        return Status(
            EngineState.EXITED,
            exit_code=code,
            oom_killed=bool(state.get("OOMKilled")),
            ended_at=ended,
            detail=state.get("Error") or "",
            interrupted=interrupted,
        )

    def stop(self, uuid: str, handle: Handle, *, force: bool = False) -> None:
        try:
            # kill() with a signal returns at once; container.stop() would block for the grace.
            self._container(handle).kill(signal="SIGKILL" if force else "SIGTERM")
        except MachineNotFound:
            return
        except docker.errors.APIError as err:
            if err.status_code != 409:  # 409: not running any more; its exit is on its way
                raise

    def destroy(self, uuid: str, handle: Handle) -> None:
        try:
            container = self._container(handle)
        except MachineNotFound:
            return
        directory = handle.data.get("directory")
        if directory and Path(directory).is_dir():
            try:  # keep what the payload printed, for `lmrunner logs`
                logs = container.logs(stdout=True, stderr=True, tail=5000)[-LOG_LIMIT_BYTES:]
                (Path(directory) / "container.log").write_bytes(logs)
            except (docker.errors.DockerException, OSError) as err:
                LOG.warning("lm=%s: cannot keep the container's log: %s", uuid, err)
        _remove_quietly(container)

    def list_owned(self) -> list[Owned]:
        try:
            containers = self._retrying(
                lambda client: client.containers.list(all=True, filters={"label": LABEL_FACTORY})
            )
        except (docker.errors.DockerException, requests.RequestException) as err:
            raise BackendUnavailable(self.name, f"cannot list containers: {err}") from err
        return [
            Owned(
                c.labels.get(LABEL_UUID, ""),
                c.labels.get(LABEL_NAME, ""),
                c.labels.get(LABEL_FACTORY, ""),
                Handle(HANDLE_VERSION, {"id": c.id}, {"container": str(c.id)[:12]}),
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
        if self._client is not None:
            self._client.close()

    # --- internals --------------------------------------------------------------------------------

    def _watch(self, notify: Callable[[str], None]) -> None:
        """Follow Docker's events; after a break (dockerd restart), tell the core to look at all."""
        lost_at: float | None = None
        errors = (docker.errors.DockerException, requests.RequestException, BackendUnavailable)
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
                    if event.get("status") in ("die", "oom", "destroy", "kill"):
                        uuid = event.get("Actor", {}).get("Attributes", {}).get(LABEL_UUID)
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

    def _container(self, handle: Handle) -> Any:
        try:
            return self._retrying(lambda client: client.containers.get(handle.data["id"]))
        except docker.errors.NotFound as err:
            raise MachineNotFound(
                self.name, f"container {handle.data['id'][:12]} not found"
            ) from err
        except (docker.errors.DockerException, requests.RequestException) as err:
            raise BackendUnavailable(self.name, f"cannot reach Docker: {err}") from err

    def _ensure_image(self, image: str) -> None:
        """Pull only when the image is absent, and say clearly when that cannot work."""
        try:
            self.client.images.get(image)
            return
        except docker.errors.ImageNotFound:
            pass
        except (docker.errors.DockerException, requests.RequestException) as err:
            raise StartError(
                self.name, f"cannot look up image {image}: {err}", recoverable=True
            ) from err
        LOG.info("docker: pulling %s", image)
        try:
            self.client.images.pull(image)
        except (docker.errors.DockerException, requests.RequestException) as err:
            raise StartError(
                self.name,
                f"image {image} is not here and cannot be pulled (no registry reachable?): {err}",
            ) from err


def _image(image: str) -> str:
    return image.removeprefix("docker://")


def _remove_quietly(container: Any) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        container.remove(force=True)


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
