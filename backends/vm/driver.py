"""The VM backend itself: one QEMU process per LM, started directly (no libvirt).

:class:`VmBackend` implements the backend protocol with the other modules of this package: the
boot plan (``plan.py``), the command line (``argv.py``), the accelerator (``accel.py``), QMP
(``qmp.py``), the exit table (``exits.py``), the config drive (``drive.py``) and the unpacked
kernels (``kernel.py``). Per LM it keeps a folder ``<state_dir>/vm/<uuid>/`` (``names.py``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lmrunner import atomic, process, runner
from lmrunner.backends.base import (
    LABEL_FACTORY,
    LABEL_NAME,
    EngineState,
    Handle,
    Health,
    MachineSpec,
    OptionsType,
    Owned,
    Probe,
    Status,
)
from lmrunner.backends.vm import drive, metadata
from lmrunner.backends.vm.accel import (
    DEFAULT_PROBE_TIMEOUT,
    Accel,
    AccelCache,
    AccelProbe,
    host_cache_dir,
    memory_overhead_bytes,
)
from lmrunner.backends.vm.argv import Launch, qemu_argv
from lmrunner.backends.vm.exits import ended
from lmrunner.backends.vm.kernel import KernelCache, KernelError, unpack_in_child
from lmrunner.backends.vm.names import (
    DRIVE,
    EVENTS_SOCKET,
    EXIT,
    KERNELS,
    OVERLAY,
    QEMU,
    QEMU_IMG,
    QEMU_LOG,
    RECORD,
    SCRATCH,
    SHUTDOWN,
)
from lmrunner.backends.vm.plan import PLACEMENT, ImageKind, Plan, VmOptions, plan
from lmrunner.backends.vm.qmp import QMP_TIMEOUT, EventWatch, QmpError, qmp_execute
from lmrunner.errors import (
    BackendError,
    BackendUnavailable,
    CommandError,
    LmrunnerError,
    MachineNotFound,
    SpecError,
    StartError,
)
from lmrunner.model import Placement

if TYPE_CHECKING:
    from lmrunner.config import FactoryConfig

LOG = logging.getLogger("lmrunner.backends.vm")  # one logger for the whole backend
#: What a VM's own files may take on its LM filesystem beside its scratch disk (plus 1 %).
DISK_OVERHEAD_BYTES = 64 * 1024 * 1024

HANDLE_VERSION = 1
#: From QEMU's start to its QMP socket answering (seconds); a QEMU that fails exits sooner.
STARTUP_TIMEOUT = 30.0
#: A stopping guest's power button is pressed again this often (a press in early boot is lost).
PRESS_AGAIN_SECONDS = 2.0
PVH_QEMU = (4, 0)  # the first QEMU that boots an ELF kernel through its PVH entry
BOOT_UNPACKED = "kernel-pvh"  # how an LM booted (ImageKind, or this: the unpacked ELF kernel)
#: What the host and the data this backend keeps can raise: OSError from files, /proc, sockets
#: and signals; ValueError, TypeError and KeyError from a handle or record of the wrong shape
#: (hand-edited, or an older version's).
HOST_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, TypeError, KeyError)


class VmBackend:
    """QEMU virtual machines as logical machines.

    No OSError, no error of a corrupt handle or record, and no error of the QEMU tools leaves
    a method of the protocol: each is raised again as a :class:`~lmrunner.errors.BackendError`
    naming the LM (:meth:`_host_errors`).
    """

    name: ClassVar[str] = "vm"
    placement: ClassVar[Placement] = PLACEMENT
    options_type: ClassVar[OptionsType] = VmOptions
    #: QEMU drops to sc_user (-runas) once it has opened its files; see the package docstring.
    runs_as_sc_user: ClassVar[bool] = True

    def __init__(
        self,
        factory: FactoryConfig,
        *,
        supervisor: process.Supervisor | None = None,
        probe_timeout: float = DEFAULT_PROBE_TIMEOUT,
        host_cache: Path | None = None,
        unpack_kernel: Callable[[Path, Path], Path] = unpack_in_child,
    ) -> None:
        """``host_cache``: the host-wide folder of the KVM probe's answer
        (default: ``$LMRUNNER_CACHE_DIR``, else /var/cache/lmrunner, read now);
        ``unpack_kernel``: how a bzImage is unpacked into the kernel cache (a child process)."""
        self.factory = factory
        self.root = factory.state_dir / "vm"
        self.supervisor = supervisor or process.Supervisor()
        host_cache = host_cache if host_cache is not None else host_cache_dir(os.environ)
        self.accel_cache = AccelCache(
            (self.root / "accel.json", host_cache / "vm-accel.json"),
            probe_timeout,
        )
        self._version: tuple[str, str] | None = None  # (qemu path, version text)
        self._lock = threading.Lock()
        self._listeners: dict[str, EventWatch] = {}  # each LM's event socket, held
        self._children: set[str] = set()  # LMs whose QEMU is this process's child
        self._pressing: set[str] = set()  # LMs whose power button is pressed until they end
        self._closed = threading.Event()
        self._kernels = KernelCache(self.root / KERNELS, unpack_kernel)
        self._told: set[str] = set()  # kernels already logged as not unpackable

    # --- the protocol ---------------------------------------------------------------------

    def probe(self) -> Probe:
        try:
            return self._probe()
        except Exception as err:  # the contract: never raises; a surprise is a reason, logged
            LOG.exception("vm: the probe failed unexpectedly")
            return Probe(Health.UNAVAILABLE, None, f"unavailable: {type(err).__name__}: {err}")

    def _probe(self) -> Probe:
        try:
            version = self._qemu()[1]
            if shutil.which(QEMU_IMG) is None:
                return Probe(Health.UNAVAILABLE, version, f"unavailable: {QEMU_IMG} not found")
            if drive.iso_tool() is None:
                why = "unavailable: no genisoimage or xorriso to write config drives"
                return Probe(Health.UNAVAILABLE, version, why)
            accel = self.accel()
        except (LmrunnerError, OSError) as err:
            return Probe(Health.UNAVAILABLE, None, f"unavailable: {err}")
        return Probe(Health.OK, version, f"QEMU {version}, accel {accel.accel} ({accel.detail})")

    def validate(self, spec: MachineSpec) -> None:
        plan(spec)
        self._runas(spec)

    def start(self, spec: MachineSpec) -> Handle:
        boot = plan(spec)
        runas = self._runas(spec)
        try:
            vm_dir = self._vm_dir(spec.uuid)
            qemu, version = self._qemu()
            accel = self.accel().accel
        except (LmrunnerError, OSError) as err:
            recoverable = isinstance(err, BackendUnavailable)  # QEMU broken: maybe mended soon
            raise StartError(
                self.name, f"cannot start {spec.name}: {err}", recoverable=recoverable
            ) from err
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            vm_dir.mkdir(mode=0o700)
        except OSError as err:
            raise StartError(self.name, f"cannot make {vm_dir}: {err}") from err
        record: dict[str, Any] = {
            "uuid": spec.uuid, "name": spec.name, "labels": dict(spec.labels),
            "directory": str(spec.directory), "accel": accel.value, "qemu": version,
            "created": time.time(), "pid": None, "start_ticks": None, "boot": boot.kind.value,
        }  # fmt: skip
        pid: process.ProcessId | None = None
        try:
            self._write_record(spec.uuid, record)  # first: a half-started LM can be found
            self._drive(spec, boot, vm_dir / DRIVE)
            disk_dir = vm_dir if spec.disk is None else spec.disk / "vm"
            disk_dir.mkdir(mode=0o700, exist_ok=True)
            if boot.kind is ImageKind.DISK:
                self._qemu_img("create", "-q", "-f", "qcow2", "-F", boot.disk_format or "raw",
                               "-b", boot.image, disk_dir / OVERLAY)  # fmt: skip
            scratch = spec.limits.disk_bytes > 0
            if scratch:
                self._qemu_img("create", "-q", "-f", "qcow2", disk_dir / SCRATCH,
                               str(spec.limits.disk_bytes))  # fmt: skip
            kernel = self._direct_kernel(boot, accel, _version_tuple(version))
            if kernel is not None:
                record["boot"] = BOOT_UNPACKED
            handler = self._metadata(spec, boot)
            launch = Launch(qemu, _version_tuple(version), accel, vm_dir, runas, scratch, kernel,
                            handler, disk_dir)  # fmt: skip
            argv = qemu_argv(spec, boot, launch)
            with self._lock:
                self._children.add(spec.uuid)
            pid = self.supervisor.spawn(
                spec.uuid,
                argv,
                status_file=vm_dir / EXIT,
                log_file=spec.directory / QEMU_LOG,
                procs_files=spec.cgroup.procs_files if spec.cgroup else (),
                launcher=spec.cgroup.launcher if spec.cgroup else None,
                env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
                cwd=vm_dir,
            )
            record.update(pid=pid.pid, start_ticks=pid.start_ticks)
            self._write_record(spec.uuid, record)
            self._listen(spec.uuid, vm_dir, pid, STARTUP_TIMEOUT, spec.directory)
        except (LmrunnerError, OSError) as err:
            if pid is not None:
                self._kill(pid)
            with self._lock:
                self._children.discard(spec.uuid)
            shutil.rmtree(vm_dir, ignore_errors=True)
            if isinstance(err, StartError):
                raise
            raise StartError(self.name, f"cannot start the VM of {spec.name}: {err}") from err
        LOG.info("vm: lm=%s pid=%d accel=%s boot=%s", spec.name, pid.pid, accel, record["boot"])
        return Handle(HANDLE_VERSION, {
            "pid": pid.pid, "start_ticks": pid.start_ticks, "vm_dir": str(vm_dir),
            "directory": str(spec.directory), "accel": accel.value,
        }, _engine(record))  # fmt: skip

    def recover(self, uuid: str, handle: Handle) -> None:
        with self._host_errors(f"cannot reattach to LM {uuid}"):
            record = self._record(uuid)
            if record is None:
                raise MachineNotFound(self.name, f"no VM record {self.root / uuid / RECORD}")
            pid = self._process(uuid, handle, record)
            if pid is None:
                return  # it ended while lmrunner was down: inspect says how much is known
            if not self.supervisor.adopt(uuid, pid):
                return
            try:
                self._listen(uuid, self.root / uuid, pid, QMP_TIMEOUT, None)
            except (QmpError, StartError, OSError) as err:  # its exit is still seen, not why
                LOG.warning("vm: lm=%s: cannot reattach to QMP events: %s", uuid, err)

    def inspect(self, uuid: str, handle: Handle) -> Status:
        with self._host_errors(f"cannot inspect LM {uuid}"):
            return self._inspect(uuid, handle)

    def _inspect(self, uuid: str, handle: Handle) -> Status:
        vm_dir = self._vm_dir(uuid)
        record = self._record(uuid)
        if record is None:
            return Status(EngineState.MISSING, detail=f"no VM record in {vm_dir}")
        pid = self._process(uuid, handle, record)
        if pid is not None:
            return Status(EngineState.RUNNING)
        self._drain(uuid, wait=True)
        status = process.read_status(vm_dir / EXIT)
        with self._lock:
            child = uuid in self._children
        deadline = time.monotonic() + 2.0
        while status is None and child and time.monotonic() < deadline:
            time.sleep(0.01)  # the waiting thread records the status right after the exit
            status = process.read_status(vm_dir / EXIT)
        reason = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            found = json.loads((vm_dir / SHUTDOWN).read_text()).get("reason")
            reason = found if isinstance(found, str) else None
        return ended(status, reason)

    def stop(self, uuid: str, handle: Handle, *, force: bool = False) -> None:
        with self._host_errors(f"cannot stop LM {uuid}"):
            self._stop(uuid, handle, force=force)

    def _stop(self, uuid: str, handle: Handle, *, force: bool) -> None:
        vm_dir = self._vm_dir(uuid)
        pid = self._process(uuid, handle, self._readable_record(uuid))
        if pid is None:
            return
        if not force:
            try:  # the ACPI power button: the guest shuts down (vcbusybox: SIGTERM to payload)
                qmp_execute(vm_dir, "system_powerdown", timeout=5.0)
            except QmpError as err:
                raise BackendError(
                    self.name, f"LM {uuid}: cannot press the power button: {err}"
                ) from err
            with self._lock:
                if uuid in self._pressing:
                    return
                self._pressing.add(uuid)
            threading.Thread(
                target=self._press_again, args=(uuid, vm_dir, pid), name=f"power-{uuid[:8]}",
                daemon=True,
            ).start()  # fmt: skip
            return
        with contextlib.suppress(QmpError):
            qmp_execute(vm_dir, "quit", timeout=2.0)
        if not _gone(pid, 1.0):
            self._kill(pid)

    def destroy(self, uuid: str, handle: Handle) -> None:
        with self._host_errors(f"cannot destroy LM {uuid}"):
            vm_dir = self._vm_dir(uuid)
            pid = self._process(uuid, handle, self._readable_record(uuid))
            if pid is not None:
                self._kill(pid)
                _gone(pid, 5.0)
            self._drain(uuid, wait=False)
            with self._lock:
                self._children.discard(uuid)
            # Disks, drive, sockets, record: root's alone (0700), QEMU as sc_user writes none.
            shutil.rmtree(vm_dir, ignore_errors=True)

    def list_owned(self) -> list[Owned]:
        with self._host_errors("cannot list LMs"):
            return self._list_owned()

    def _list_owned(self) -> list[Owned]:
        owned = []
        for file in sorted(self.root.glob(f"*/{RECORD}")):
            try:
                record = self._record(file.parent.name)
            except BackendError as err:  # the others are still listed
                LOG.warning("%s", err)
                continue
            if record is None:
                continue
            labels = record.get("labels")
            labels = labels if isinstance(labels, dict) else {}
            handle = Handle(HANDLE_VERSION, {
                "pid": record.get("pid"), "start_ticks": record.get("start_ticks"),
                "vm_dir": str(file.parent), "directory": record.get("directory"),
                "accel": record.get("accel"),
            }, _engine(record))  # fmt: skip
            owned.append(Owned(record["uuid"], str(labels.get(LABEL_NAME, "")),
                               str(labels.get(LABEL_FACTORY, "")), handle))  # fmt: skip
        return owned

    def watch(self, notify: Callable[[str], None]) -> None:
        self.supervisor.watch(notify)

    def close(self) -> None:
        self._closed.set()
        self.supervisor.close()
        with self._lock:
            listeners = list(self._listeners.values())
            self._listeners.clear()
        for watch in listeners:
            watch.close()
            watch.join(timeout=2)

    # --- accelerator ----------------------------------------------------------------------

    def disk_overhead(self, disk_bytes: int) -> int:
        # The scratch image's metadata (qcow2: ~0.02 % at 64 KiB clusters), and room for the
        # guest's joboutputs and the root overlay beside a scratch disk the guest filled.
        return DISK_OVERHEAD_BYTES + disk_bytes // 100

    def memory_overhead(self) -> int:
        with self._host_errors("cannot tell QEMU's memory overhead", BackendUnavailable):
            return memory_overhead_bytes(self.accel().accel)

    def accel(self) -> AccelProbe:
        """The accelerator LMs start under (``factory.vm_accel``; ``auto`` probes once per host
        kernel and QEMU version, cached in <state_dir>/vm/accel.json and host-wide in
        /var/cache/lmrunner/vm-accel.json: :class:`~lmrunner.backends.vm.accel.AccelCache`)."""
        choice = self.factory.vm_accel
        if choice == "tcg":
            return AccelProbe(Accel.TCG, "factory.vm_accel is tcg", 0.0)
        if choice == "kvm":
            return AccelProbe(Accel.KVM, "factory.vm_accel is kvm (not probed)", 0.0)
        return self.accel_cache.get(*self._qemu())

    # --- internals ------------------------------------------------------------------------

    def _qemu(self) -> tuple[str, str]:
        """QEMU's path and version (asked once)."""
        if self._version is None:
            found = shutil.which(QEMU)
            if found is None:
                raise BackendUnavailable(
                    self.name, f"{QEMU} not found (apt-get install qemu-system-x86)"
                )
            try:
                done = runner.run([found, "-version"], timeout=30)
            except CommandError as err:
                raise BackendUnavailable(self.name, f"{QEMU} does not run: {err}") from err
            match = re.search(r"version (\d+\.\d+(?:\.\d+)?)", done.stdout)
            self._version = (found, match.group(1) if match else done.stdout.strip()[:40])
        return self._version

    def _direct_kernel(self, boot: Plan, accel: Accel, qemu: tuple[int, int]) -> Path | None:
        """The unpacked ELF to boot instead of a bzImage (``kernel.py``), or None."""
        choice = self.factory.vm_direct_kernel
        if boot.kind is not ImageKind.KERNEL or choice == "never" or qemu < PVH_QEMU:
            return None
        if choice == "auto" and accel is not Accel.TCG:  # KVM decompresses in ~0.2 s: keep KASLR
            return None
        try:
            kernel: Path = self._kernels.get(boot.image)
        except KernelError as err:
            told = f"{boot.image}: {err}"
            if told not in self._told:  # once per kernel, not once per LM
                self._told.add(told)
                LOG.info("vm: %s boots as a bzImage: %s", boot.image, err)
            return None
        return kernel

    def _qemu_img(self, *args: str | Path) -> None:
        found = shutil.which(QEMU_IMG)
        if found is None:
            raise StartError(self.name, f"{QEMU_IMG} not found (apt-get install qemu-utils)")
        runner.run([found, *args], timeout=60)

    def _runas(self, spec: MachineSpec) -> str | None:
        """The account QEMU drops to: the LM's owner (sc_user), unless that is this process's."""
        uid = spec.owner[0]
        if uid == os.getuid():
            return None
        if os.getuid() != 0:
            raise SpecError(f"vm: cannot run QEMU as uid {uid}: lmrunner is not root")
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError as err:
            raise SpecError(f"vm: uid {uid} (the LM's owner) has no account name") from err

    def _metadata(self, spec: MachineSpec, boot: Plan) -> tuple[str, ...] | None:
        """Write what the LM's metadata service tells about it; the handler's argv (None under
        bridge networking, which has no metadata service)."""
        if boot.bridge is not None:
            return None
        facts = metadata.describe(
            uuid=spec.uuid,
            hostname=spec.name,
            machinetype=spec.machinetype,
            availability_zone=self._availability_zone(),
            public_key=self._public_key(),
        )
        atomic.write_text(spec.directory / metadata.METADATA_FILE, json.dumps(facts),
                          mode=0o644, durable=False)  # fmt: skip
        if not metadata.reachable(spec.directory, spec.owner):
            why = f"uid {spec.owner[0]} (QEMU's and its metadata service's) cannot reach"
            raise SpecError(f"vm: {why} {spec.directory}: make the folders above it traversable")
        argv = metadata.command(spec.directory, spec.owner)
        if argv is None:
            tried = "this one, /usr/bin/python3, /usr/local/bin/python3"
            why = f"no Python that uid {spec.owner[0]} may run for the metadata service"
            raise SpecError(f"vm: {why} (tried {tried})")
        if any(not part or any(c.isspace() for c in part) for part in argv):
            # slirp splits the command at spaces and has no quoting
            raise SpecError(f"vm: the metadata handler's command has a blank in it: {argv}")
        return argv

    def _availability_zone(self) -> str:
        return self.factory.hostname or socket.getfqdn()

    def _public_key(self) -> str | None:
        key = self.factory.root_public_key
        if key is not None:
            with contextlib.suppress(OSError):
                return key.read_text().strip() or None
        return None

    def _drive(self, spec: MachineSpec, boot: Plan, output: Path) -> None:
        env = spec.env
        meta = {
            "machinetype": spec.machinetype,
            "machinefeatures": env.get("MACHINEFEATURES", str(PLACEMENT.machinefeatures)),
            "jobfeatures": env.get("JOBFEATURES", str(PLACEMENT.jobfeatures)),
            "joboutputs": env.get("JOBOUTPUTS", str(PLACEMENT.joboutputs)),
            "mount_tags": " ".join(tag for tag, _, _ in boot.shares),
        }
        data = drive.DriveData(
            uuid=spec.uuid,
            hostname=spec.name,
            user_data=boot.user_data.read_bytes() if boot.user_data else b"",
            availability_zone=self._availability_zone(),
            meta=meta,
            public_key=self._public_key(),
        )
        drive.build(data, output)

    def _listen(
        self,
        uuid: str,
        vm_dir: Path,
        pid: process.ProcessId,
        timeout: float,
        lm_dir: Path | None,
    ) -> None:
        """Hold the LM's event socket (waiting up to ``timeout`` for QEMU to open it); a QEMU
        that exits first failed to start."""
        self._drain(uuid, wait=False)  # QEMU serves one client per socket: let go of ours first
        deadline = time.monotonic() + timeout
        on_event = functools.partial(self._event, uuid, vm_dir)
        while True:
            try:
                watch = EventWatch(vm_dir, EVENTS_SOCKET, QMP_TIMEOUT, on_event, f"qmp-{uuid[:8]}")
                break
            except (OSError, QmpError) as err:
                if not process.alive(pid):
                    why = _tail(lm_dir / QEMU_LOG) if lm_dir else ""
                    raise StartError(self.name, f"QEMU exited at once: {why or err}") from err
                if time.monotonic() > deadline:
                    raise QmpError(f"no QMP answer within {timeout:g} s: {err}") from err
                time.sleep(0.01)
        with self._lock:
            self._listeners[uuid] = watch
        watch.start()

    def _event(self, uuid: str, vm_dir: Path, event: Mapping[str, Any]) -> None:
        """Record why QEMU stops (its SHUTDOWN event; called in the LM's event thread)."""
        if event.get("event") == "SHUTDOWN":
            data = event.get("data")
            data = data if isinstance(data, dict) else {}
            record = {"reason": data.get("reason"), "guest": data.get("guest"), "at": time.time()}
            try:
                atomic.write_text(vm_dir / SHUTDOWN, json.dumps(record))
            except OSError as err:  # destroyed meanwhile
                LOG.debug("vm: lm=%s: cannot record the shutdown: %s", uuid, err)

    def _press_again(self, uuid: str, vm_dir: Path, pid: process.ProcessId) -> None:
        """Press the power button again every few seconds until QEMU is gone: a press before
        the guest handles ACPI (early boot) is lost, and pressing a shutting-down guest's button
        does nothing more."""
        try:
            while not self._closed.wait(PRESS_AGAIN_SECONDS) and process.alive(pid):
                try:
                    qmp_execute(vm_dir, "system_powerdown", timeout=2.0)
                except QmpError:
                    return  # QEMU is going (quit, killed, destroyed)
        finally:
            with self._lock:
                self._pressing.discard(uuid)

    def _drain(self, uuid: str, *, wait: bool) -> None:
        """Stop the LM's event thread; with ``wait``, first let it read what an ended QEMU
        sent (QEMU closed the socket, so this is quick)."""
        with self._lock:
            watch = self._listeners.pop(uuid, None)
        if watch is not None:
            if wait:
                watch.join(timeout=2)
            watch.close()
            watch.join(timeout=2)

    @contextlib.contextmanager
    def _host_errors(self, what: str, error: type[BackendError] = BackendError) -> Iterator[None]:
        """Raise :data:`HOST_ERRORS` met while doing ``what`` as ``error`` (chained): the one
        place they become lmrunner's. lmrunner's own errors pass unchanged."""
        try:
            yield
        except HOST_ERRORS as err:
            raise error(self.name, f"{what}: {err}") from err

    def _vm_dir(self, uuid: str) -> Path:
        """The LM's folder under <state_dir>/vm (destroy removes it: the uuid is never a path)."""
        try:
            canonical = str(uuid_mod.UUID(uuid)) == uuid
        except (ValueError, TypeError, AttributeError):
            canonical = False
        if not canonical:
            raise BackendError(self.name, f"not an LM uuid: {uuid!r}")
        return self.root / uuid

    def _record(self, uuid: str) -> dict[str, Any] | None:
        """The LM's record; None when it has none.

        Raises:
            BackendError: there is one, but it cannot be read or is not this LM's (corrupt, or
                an older version's).
        """
        file = self._vm_dir(uuid) / RECORD
        try:
            data = json.loads(file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise BackendError(self.name, f"LM {uuid}: unreadable record {file}: {err}") from err
        if not isinstance(data, dict) or data.get("uuid") != uuid:
            raise BackendError(self.name, f"LM {uuid}: {file} is not a record of this LM")
        return data

    def _readable_record(self, uuid: str) -> dict[str, Any] | None:
        """The LM's record, or None when it has none or an unreadable one (logged): for stop and
        destroy, which can do without it (the handle names the QEMU)."""
        try:
            return self._record(uuid)
        except BackendError as err:
            LOG.warning("%s", err)
            return None

    def _write_record(self, uuid: str, record: Mapping[str, Any]) -> None:
        atomic.write_text(self.root / uuid / RECORD, json.dumps(record, indent=1) + "\n")

    def _process(
        self, uuid: str, handle: Handle, record: Mapping[str, Any] | None
    ) -> process.ProcessId | None:
        """The LM's QEMU if it still runs (pid and start time both match), else None."""
        for source in (handle.data, record or {}):
            if source.get("pid") and source.get("start_ticks") is not None:
                pid = process.ProcessId(int(source["pid"]), int(source["start_ticks"]))
                return pid if process.alive(pid) else None
        return _find_qemu(uuid)  # started, but the daemon died before recording the pid

    def _kill(self, pid: process.ProcessId) -> None:
        """SIGKILL exactly this process (a recycled pid is never hit)."""
        process.send_signal(pid, signal.SIGKILL)


def _engine(record: Mapping[str, Any]) -> dict[str, str]:
    """What ``lmrunner ps --json`` shows of a VM (``Handle.engine``)."""
    facts = {"accel": record.get("accel"), "boot": record.get("boot"), "pid": record.get("pid")}
    return {key: str(value) for key, value in facts.items() if value is not None}


def _gone(pid: process.ProcessId, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the process to end; whether it did."""
    deadline = time.monotonic() + timeout
    while process.alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _find_qemu(uuid: str) -> process.ProcessId | None:
    """A QEMU started with ``-uuid <uuid>`` (by its command line), for records without a pid."""
    wanted = f"\0-uuid\0{uuid}\0".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if wanted in cmdline and Path(os.fsdecode(cmdline.split(b"\0", 1)[0])).name == QEMU:
            return process.identify(int(entry.name))
    return None


def _version_tuple(version: str) -> tuple[int, int]:
    parts = re.findall(r"\d+", version)
    return (int(parts[0]), int(parts[1])) if len(parts) >= 2 else (0, 0)


def _tail(path: Path, lines: int = 3, limit: int = 65536) -> str:
    """The last ``lines`` lines of a log, from its last ``limit`` bytes at most."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(os.fstat(handle.fileno()).st_size - limit, 0))
            text = handle.read(limit).decode(errors="replace").strip()
    except OSError:
        return ""
    return " | ".join(text.splitlines()[-lines:])
