"""A fake backend: LMs that exist only as files, for unit and contract tests, the demo and bench.

Its "engine" is a folder of JSON files, one per LM, and time: an LM runs from its start until
its scripted end, so fake LMs survive a daemon restart exactly like real ones (tests kill -9 the
daemon and check adoption). Behaviour is scripted in the image name:
``fake:seconds=5;message=300 No more work;exit=0;oom=0;ignore_term=0;term_seconds=0.2``.
At a natural end the fake writes ``message`` into joboutputs/shutdown_message, as a payload would.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from lmrunner import atomic
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
from lmrunner.errors import BackendError, MachineNotFound, SpecError, StartError
from lmrunner.model import ETC_PLACEMENT, Placement

HANDLE_VERSION = 1
#: What its engine folder can raise: OSError from the files, and ValueError, TypeError,
#: KeyError and AttributeError from an entry of the wrong shape (hand-edited, or an older one's).
HOST_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
)


@dataclass(frozen=True, slots=True)
class Script:
    """What a fake LM does."""

    seconds: float = 3600.0
    message: str | None = None
    exit: int = 0
    oom: bool = False
    ignore_term: bool = False
    term_seconds: float = 0.2
    fail_start: bool = False


def parse_image(image: str) -> Script:
    """The script encoded in a ``fake:`` image name.

    Raises:
        SpecError: not a fake image, or a bad key or value.
    """
    if not image.startswith("fake:"):
        raise SpecError(f"fake: image {image!r} must start with 'fake:'")
    values: dict[str, Any] = {}
    for part in filter(None, image.removeprefix("fake:").split(";")):
        key, _, value = part.partition("=")
        try:
            if key in ("seconds", "term_seconds"):
                values[key] = float(value)
            elif key == "exit":
                values[key] = int(value)
            elif key in ("oom", "ignore_term", "fail_start"):
                values[key] = value in ("1", "true", "yes")
            elif key == "message":
                values[key] = value
            else:
                raise SpecError(f"fake: unknown key {key!r} in image {image!r}")
        except ValueError as err:
            raise SpecError(f"fake: bad value {value!r} for {key} in image {image!r}") from err
    return Script(**values)


class FakeBackend:
    """LMs as files plus time; see the module docstring. Like the real backends, it raises only
    lmrunner's errors (:meth:`_host_errors`)."""

    name: ClassVar[str] = "fake"
    placement: ClassVar[Placement] = ETC_PLACEMENT
    options_type: ClassVar[OptionsType] = NoOptions
    runs_as_sc_user: ClassVar[bool] = False

    def __init__(self, engine_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.engine_dir = engine_dir
        self.clock = clock
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the protocol ---------------------------------------------------------------------

    def disk_overhead(self, disk_bytes: int) -> int:
        return 0

    def memory_overhead(self) -> int:
        return 0  # the LM's processes are all there is

    def probe(self) -> Probe:
        return Probe(Health.OK, "1", f"fake engine in {self.engine_dir}")

    def validate(self, spec: MachineSpec) -> None:
        parse_image(spec.image)

    def start(self, spec: MachineSpec) -> Handle:
        script = parse_image(spec.image)
        if script.fail_start:
            raise StartError(self.name, f"scripted start failure for {spec.name}")
        joboutputs = next(
            (m.source for m in spec.mounts if m.target == self.placement.joboutputs), None
        )
        if joboutputs is None:
            raise StartError(self.name, f"cannot start {spec.name}: it has no joboutputs mount")
        entry = {
            "uuid": spec.uuid,
            "name": spec.name,
            "labels": dict(spec.labels),
            "started": self.clock(),
            "script": _script_dict(script),
            "joboutputs": str(joboutputs),
            "stop_at": None,
            "killed_at": None,
        }
        with self._host_errors(f"cannot start {spec.name}", StartError):
            self.engine_dir.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self._file(spec.uuid), json.dumps(entry))
        self._wake.set()
        return Handle(HANDLE_VERSION, {"uuid": spec.uuid})

    def recover(self, uuid: str, handle: Handle) -> None:
        with self._host_errors(f"cannot reattach to LM {uuid}"):
            if self._load(uuid) is None:
                raise MachineNotFound(self.name, f"no fake LM {uuid}")
        self._wake.set()

    def inspect(self, uuid: str, handle: Handle) -> Status:
        with self._host_errors(f"cannot inspect LM {uuid}"):
            return self._inspect(uuid)

    def _inspect(self, uuid: str) -> Status:
        entry = self._load(uuid)
        if entry is None:
            return Status(EngineState.MISSING, detail="no such fake LM")
        now = self.clock()
        end, how = _end(entry)
        if now < end:
            return Status(EngineState.RUNNING)
        script = Script(**entry["script"])
        if how == "natural" and script.message and not entry.get("message_written"):
            # The payload's last act: its shutdown_message (written once).
            message = Path(entry["joboutputs"]) / "shutdown_message"
            if message.parent.is_dir() and not message.exists():
                atomic.write_text(message, script.message + "\n")
            entry["message_written"] = True
            atomic.write_text(self._file(uuid), json.dumps(entry))
        code = {"natural": script.exit, "term": 143, "killed": 137}[how]
        oom = how == "natural" and script.oom
        return Status(EngineState.EXITED, 137 if oom else code, oom_killed=oom, ended_at=end)

    def stop(self, uuid: str, handle: Handle, *, force: bool = False) -> None:
        with self._host_errors(f"cannot stop LM {uuid}"):
            entry = self._load(uuid)
            if entry is None:
                return
            key = "killed_at" if force else "stop_at"
            if entry.get(key) is None:
                entry[key] = self.clock()
                atomic.write_text(self._file(uuid), json.dumps(entry))
        self._wake.set()

    def destroy(self, uuid: str, handle: Handle) -> None:
        with self._host_errors(f"cannot destroy LM {uuid}"):
            self._file(uuid).unlink(missing_ok=True)

    def list_owned(self) -> list[Owned]:
        with self._host_errors("cannot list LMs"):
            owned = []
            for file in sorted(self.engine_dir.glob("*.json")):
                entry = self._load(file.stem)
                if entry is not None:
                    labels = entry.get("labels", {})
                    handle = Handle(HANDLE_VERSION, {"uuid": entry["uuid"]})
                    name, factory = labels.get(LABEL_NAME, ""), labels.get(LABEL_FACTORY, "")
                    owned.append(Owned(entry["uuid"], name, factory, handle))
            return owned

    def watch(self, notify: Callable[[str], None]) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._watch, args=(notify,), name="fake-watch", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- internals ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _host_errors(self, what: str, error: type[BackendError] = BackendError) -> Iterator[None]:
        """Raise :data:`HOST_ERRORS` met while doing ``what`` as ``error`` (chained)."""
        try:
            yield
        except HOST_ERRORS as err:
            raise error(self.name, f"{what}: {err}") from err

    def _watch(self, notify: Callable[[str], None]) -> None:
        """Sleep until the next scripted end (or a start/stop), then tell the core."""
        told: set[str] = set()
        while not self._closed.is_set():
            now = self.clock()
            next_end = now + 5.0  # also catch files changed by another process
            for file in self.engine_dir.glob("*.json"):
                entry = self._load(file.stem)
                if entry is None:
                    continue
                end, _ = _end(entry)
                if end <= now and entry["uuid"] not in told:
                    told.add(entry["uuid"])
                    notify(entry["uuid"])
                elif end > now:
                    next_end = min(next_end, end)
            self._wake.wait(timeout=max(next_end - self.clock(), 0.001))
            self._wake.clear()

    def _file(self, uuid: str) -> Path:
        return self.engine_dir / f"{uuid}.json"

    def _load(self, uuid: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._file(uuid).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return data if isinstance(data, dict) else None


def _script_dict(script: Script) -> dict[str, Any]:
    return {name: getattr(script, name) for name in Script.__dataclass_fields__}


def _end(entry: dict[str, Any]) -> tuple[float, str]:
    """When a fake LM ends and how: ``natural``, ``term`` (after a stop) or ``killed``."""
    script = Script(**entry["script"])
    ends = [(entry["started"] + script.seconds, "natural")]
    if entry.get("stop_at") is not None and not script.ignore_term:
        ends.append((entry["stop_at"] + script.term_seconds, "term"))
    if entry.get("killed_at") is not None:
        ends.append((entry["killed_at"], "killed"))
    return min(ends)
