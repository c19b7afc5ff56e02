"""The VM backend with fakes: no QEMU, no subprocess.

QMP is answered by :class:`FakeQemu`, a thread serving both of an LM's sockets the way QEMU 7.2
does; processes come from :class:`FakeSupervisor`; genisoimage and qemu-img are a fake
``runner.run`` that records its argv and makes the output file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, cast

import pytest

from lmrunner import process, runner
from lmrunner.backends import vm
from lmrunner.backends.base import (
    Backend,
    EngineState,
    Handle,
    Health,
    LmCgroup,
    MachineSpec,
)
from lmrunner.backends.vm import accel as vm_accel
from lmrunner.backends.vm import drive as vm_drive
from lmrunner.backends.vm import driver
from lmrunner.backends.vm import kernel as vm_kernel
from lmrunner.backends.vm.plan import VmOptions
from lmrunner.cgroups.base import CgroupRef
from lmrunner.config import FactoryConfig
from lmrunner.errors import BackendError, CommandError, MachineNotFound, SpecError, StartError
from lmrunner.model import MIB, Limits, Mount
from lmrunner.process import ExitStatus, ProcessId
from tests.unit.backends.kernels import PVH_ELF, bzimage

UUID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}}, "capabilities": []}}


# --- fakes ------------------------------------------------------------------------------------


class FakeQemu:
    """QMP on ``qmp.sock`` and ``events.sock`` of an LM folder (bound through /proc/self/fd, as
    the backend connects, since tmp paths exceed a socket address)."""

    def __init__(self, vm_dir: Path) -> None:
        self.commands: list[str] = []
        self.events: list[socket.socket] = []
        self._fd = os.open(vm_dir, os.O_PATH | os.O_DIRECTORY)
        self._servers = []
        for name in (vm.QMP_SOCKET, vm.EVENTS_SOCKET):
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(f"/proc/self/fd/{self._fd}/{name}")
            server.listen(4)
            self._servers.append(server)
            threading.Thread(target=self._accept, args=(server, name), daemon=True).start()

    def _accept(self, server: socket.socket, name: str) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            if name == vm.EVENTS_SOCKET:
                self.events.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.sendall(json.dumps(GREETING).encode() + b"\r\n")
            for message in qmp_messages(conn):
                command = message["execute"]
                if command != "qmp_capabilities":
                    self.commands.append(command)
                with_error = command == "no-such-command"
                answer: dict[str, Any] = (
                    {"error": {"desc": "nope"}} if with_error else {"return": {}}
                )
                if "id" in message:  # QEMU echoes a command's id
                    answer["id"] = message["id"]
                conn.sendall(json.dumps(answer).encode() + b"\r\n")

    def shutdown(self, reason: str) -> None:
        """QEMU's last words: the SHUTDOWN event, then the connections close as it exits."""
        event = {
            "event": "SHUTDOWN",
            "data": {"guest": reason.startswith("guest"), "reason": reason},
        }
        for conn in self.events:
            with contextlib.suppress(OSError):  # an earlier daemon's connection, closed
                conn.sendall(json.dumps(event).encode() + b"\r\n")
                conn.shutdown(socket.SHUT_RDWR)
        self.close()

    def close(self) -> None:
        for server in self._servers:
            server.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def qmp_messages(conn: socket.socket) -> Iterator[dict[str, Any]]:
    """The JSON objects a QMP client sends, until it hangs up (QMP needs no newline between
    them: QEMU's parser, like this one, reads a stream of objects)."""
    decoder = json.JSONDecoder()
    pending = ""
    while data := conn.recv(65536):
        pending += data.decode()
        while pending.strip():
            try:
                message, end = decoder.raw_decode(pending.lstrip())
            except ValueError:  # the rest is still on its way
                break
            pending = pending.lstrip()[end:]
            yield message


class FakeSupervisor:
    """Records spawns; the "QEMU" it starts is a :class:`FakeQemu` in the working directory."""

    def __init__(self, running: set[int]) -> None:
        self.running = running
        self.spawned: list[dict[str, Any]] = []
        self.adopted: list[tuple[str, ProcessId]] = []
        self.qemu: FakeQemu | None = None
        self.fail = False
        self.notify: Any = None
        self.closed = False

    def spawn(self, key: str, argv: list[str], **kwargs: Any) -> ProcessId:
        self.spawned.append({"key": key, "argv": argv, **kwargs})
        if not self.fail:
            self.qemu = FakeQemu(kwargs["cwd"])
            self.running.add(4242)
        else:
            kwargs["log_file"].write_text("qemu-system-x86_64: -drive: Could not open 'x'\n")
        return ProcessId(4242, 77)

    def adopt(self, key: str, process: ProcessId) -> bool:
        self.adopted.append((key, process))
        return process.pid in self.running

    def watch(self, notify: Any) -> None:
        self.notify = notify

    def close(self) -> None:
        self.closed = True


def fake(backend: vm.VmBackend) -> FakeSupervisor:
    return cast(FakeSupervisor, backend.supervisor)


@pytest.fixture
def running(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    pids: set[int] = set()
    monkeypatch.setattr(process, "alive", lambda p: p.pid in pids and p.start_ticks == 77)
    return pids


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Fake which() and runner.run: -version, genisoimage (the staged tree is kept for the
    test as ``<output>.seen``), qemu-img create."""
    calls: list[list[str]] = []
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")

    def run(argv: list[Any], **kwargs: Any) -> runner.Completed:
        args = [str(a) for a in argv]
        calls.append(args)
        out = ""
        if args[1:] == ["-version"]:
            out = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)\n"
        elif args[0].endswith("genisoimage"):
            output, tree = Path(args[args.index("-o") + 1]), Path(args[-1])
            shutil.copytree(tree, output.with_name(output.name + ".seen"))
            output.write_bytes(b"iso")
        elif args[1] == "create":
            Path(args[-2] if args[-1].isdigit() else args[-1]).write_bytes(b"qcow2")
        return runner.Completed(tuple(args), 0, out, "", 0.01)

    monkeypatch.setattr(runner, "run", run)
    return calls


@pytest.fixture
def factory(tmp_path: Path) -> FactoryConfig:
    key = tmp_path / "id_rsa.pub"
    key.write_text("ssh-ed25519 AAAA root@factory\n")
    return FactoryConfig(
        space="vm.example.com",
        hostname="factory.example.com",
        state_dir=tmp_path / "state",
        vm_accel="tcg",
        root_public_key=key,
    )


@pytest.fixture
def backend(
    factory: FactoryConfig, running: set[int], commands: list[list[str]]
) -> Iterator[vm.VmBackend]:
    made = vm.VmBackend(
        factory,
        supervisor=FakeSupervisor(running),  # type: ignore[arg-type]
        unpack_kernel=vm_kernel.cached,  # in-process: unit tests start no children
    )
    made._kill = lambda pid: running.discard(pid.pid)  # type: ignore[method-assign]
    yield made
    made.close()
    supervisor = fake(made)
    if supervisor.qemu is not None:
        supervisor.qemu.close()


def files(tmp_path: Path) -> dict[str, Path]:
    """A kernel, an initramfs, an ISO, a qcow2 and a raw disk (by their magic bytes)."""
    made = {}
    kernel = bytearray(0x400)
    kernel[0x202:0x206] = b"HdrS"
    iso = bytearray(0x8800)
    iso[0x8001:0x8006] = b"CD001"
    contents = {"vmlinuz": bytes(kernel), "initrd": b"\x1f\x8b", "cd.iso": bytes(iso),
                "disk.qcow2": b"QFI\xfb" + bytes(100), "disk.img": bytes(1024)}  # fmt: skip
    for name, data in contents.items():
        made[name] = tmp_path / "images" / name
        made[name].parent.mkdir(exist_ok=True)
        made[name].write_bytes(data)
    return made


def make_spec(tmp_path: Path, image: Path | str, **options: Any) -> MachineSpec:
    lm = tmp_path / "machines" / "lm"
    for sub in ("machinefeatures", "jobfeatures", "joboutputs"):
        (lm / sub).mkdir(parents=True, exist_ok=True)
    (lm / "user_data").write_text("#!/bin/sh\necho hello\n")
    place = vm.PLACEMENT
    return MachineSpec(
        uuid=UUID,
        name="factory-00.example.com",
        machinetype="cernvm",
        image=str(image),
        command=("/user_data",),
        limits=Limits(2, 512 * MIB, 0, 3 * 10**9, None),
        mounts=(
            Mount(lm / "user_data", place.user_data),
            Mount(lm / "machinefeatures", place.machinefeatures),
            Mount(lm / "jobfeatures", place.jobfeatures),
            Mount(lm / "joboutputs", place.joboutputs, read_only=False),
            Mount(Path("/cvmfs"), place.cvmfs),
            Mount(lm / "mnt" / "tmp0", PurePosixPath("/scratch"), read_only=False),
        ),
        env={
            "MACHINEFEATURES": "/etc/machinefeatures",
            "JOBFEATURES": "/etc/jobfeatures",
            "JOBOUTPUTS": "/var/spool/joboutputs",
        },
        labels={
            "org.lmrunner.factory": "f1",
            "org.lmrunner.lm.name": "factory-00.example.com",
            "org.lmrunner.lm.uuid": UUID,
        },
        directory=lm,
        owner=(os.getuid(), os.getgid()),
        stop_grace_seconds=5,
        options=VmOptions(**options),
    )


def launch(tmp_path: Path, **changes: Any) -> vm.Launch:
    values: dict[str, Any] = {"qemu": "/usr/bin/qemu-system-x86_64", "qemu_version": (7, 2),
                              "accel": vm.Accel.TCG, "vm_dir": tmp_path / "vm" / UUID,
                              "runas": "lmrunner-sc", "scratch": True}  # fmt: skip
    return vm.Launch(**{**values, **changes})


def option_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, value in enumerate(argv) if value == flag]


# --- the boot plan ------------------------------------------------------------------------------


def test_the_backend_meets_the_protocol(backend: vm.VmBackend) -> None:
    checked: Backend = backend
    assert (checked.name, checked.placement, checked.runs_as_sc_user) == ("vm", vm.PLACEMENT, True)


def test_image_kinds_come_from_the_files_first_bytes(tmp_path: Path) -> None:
    made = files(tmp_path)
    assert vm.image_kind(made["vmlinuz"]) == (vm.ImageKind.KERNEL, None)
    assert vm.image_kind(made["cd.iso"]) == (vm.ImageKind.ISO, None)
    assert vm.image_kind(made["disk.qcow2"]) == (vm.ImageKind.DISK, "qcow2")
    assert vm.image_kind(made["disk.img"]) == (vm.ImageKind.DISK, "raw")


def test_plan_shares_by_mount_tag_and_keeps_user_data_for_the_drive(tmp_path: Path) -> None:
    made = files(tmp_path)
    spec = make_spec(tmp_path, made["vmlinuz"], vm_initrd=made["initrd"])
    boot = vm.plan(spec)
    assert (boot.kind, boot.initrd, boot.append) == (
        vm.ImageKind.KERNEL, made["initrd"], vm.DEFAULT_APPEND)  # fmt: skip
    assert [(tag, ro) for tag, _, ro in boot.shares] == [
        ("machinefeatures", True),
        ("jobfeatures", True),
        ("joboutputs", False),
        ("cvmfs", True),
    ]  # fmt: skip  -- the tmp_binds folder (/scratch) is for containers only
    assert boot.user_data == spec.directory / "user_data"
    assert boot.bridge is None


@pytest.mark.parametrize(
    ("image", "options", "problem"),
    [
        ("relative/vmlinuz", {}, "not an absolute path"),
        ("https://example.com/cernvm.iso", {}, "a URL reached the VM backend"),
        ("/nonexistent/disk.img", {}, "not a readable file"),
        ("vmlinuz", {"vm_initrd": "/nonexistent/initrd"}, "vm_initrd /nonexistent/initrd"),
    ],
)
def test_bad_specs_are_refused_before_anything_exists(
    backend: vm.VmBackend, tmp_path: Path, image: str, options: dict[str, Any], problem: str
) -> None:
    made = files(tmp_path)
    spec = make_spec(tmp_path, made.get(image, image), **options)
    with pytest.raises(SpecError, match=problem):
        backend.validate(spec)
    with pytest.raises(SpecError):
        backend.start(spec)
    assert not (backend.root / UUID).exists()


# --- the command line ---------------------------------------------------------------------------


def test_kernel_boot_under_tcg_with_user_networking(tmp_path: Path) -> None:
    made = files(tmp_path)
    spec = make_spec(tmp_path, made["vmlinuz"], vm_initrd=made["initrd"],
                     vm_kernel_append="console=ttyS0 quiet")  # fmt: skip
    argv = vm.qemu_argv(spec, vm.plan(spec), launch(tmp_path))
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert option_after(argv, "-accel") == [f"tcg,tb-size={vm.TCG_TB_MIB}"]
    assert option_after(argv, "-cpu") == []  # QEMU's default model under TCG (the fastest)
    assert option_after(argv, "-m") == ["512M"]
    assert option_after(argv, "-smp") == ["2"]
    assert option_after(argv, "-uuid") == [UUID]
    assert option_after(argv, "-kernel") == [str(made["vmlinuz"])]
    assert option_after(argv, "-initrd") == [str(made["initrd"])]
    assert option_after(argv, "-append") == ["console=ttyS0 quiet"]
    assert "-no-reboot" in argv and "-nodefaults" in argv
    drives = option_after(argv, "-drive")  # scratch, then the config drive (read-only)
    assert drives[0].startswith(f"file={launch(tmp_path).vm_dir / vm.SCRATCH},format=qcow2")
    assert drives[1].startswith(f"file={launch(tmp_path).vm_dir / vm.DRIVE},format=raw")
    assert "readonly=on" in drives[1]
    fsdevs = option_after(argv, "-fsdev")
    assert all("security_model=none" in f for f in fsdevs)
    assert [("readonly=on" in f) for f in fsdevs] == [True, True, False, True]
    tags = [d.split("mount_tag=")[1] for d in option_after(argv, "-device") if "9p" in d]
    assert tags == ["machinefeatures", "jobfeatures", "joboutputs", "cvmfs"]
    assert option_after(argv, "-netdev") == [
        "user,id=net0,hostname=factory-00.example.com,net=169.254.0.0/16"
    ]
    nic = f"virtio-net-pci,netdev=net0,mac={vm.mac_address(UUID)},romfile="  # no PXE ROM
    assert nic in option_after(argv, "-device")
    assert option_after(argv, "-sandbox") == ["on,obsolete=deny,resourcecontrol=deny,spawn=deny"]
    assert option_after(argv, "-runas") == ["lmrunner-sc"]
    sockets = [c for c in option_after(argv, "-chardev") if c.startswith("socket")]
    assert sockets == [f"socket,id=qmp,path={vm.QMP_SOCKET},server=on,wait=off",
                       f"socket,id=events,path={vm.EVENTS_SOCKET},server=on,wait=off"]  # fmt: skip
    console = spec.directory / vm.CONSOLE_LOG
    assert f"file,id=console,path={console},append=on" in option_after(argv, "-chardev")


def test_disk_boot_under_kvm_on_a_bridge(tmp_path: Path) -> None:
    made = files(tmp_path)
    spec = make_spec(tmp_path, made["disk.qcow2"], vm_bridge="br-lm")
    boot = vm.plan(spec)
    assert (boot.kind, boot.disk_format, boot.bridge) == (vm.ImageKind.DISK, "qcow2", "br-lm")
    argv = vm.qemu_argv(spec, boot, launch(tmp_path, accel=vm.Accel.KVM, qemu_version=(9, 2)))
    assert option_after(argv, "-accel") == ["kvm"]
    assert option_after(argv, "-cpu") == ["host"]
    drives = option_after(argv, "-drive")  # the overlay (never the base image) comes first
    assert drives[0].startswith(f"file={launch(tmp_path).vm_dir / vm.OVERLAY},format=qcow2")
    assert str(made["disk.qcow2"]) not in " ".join(argv)
    assert "virtio-blk-pci,drive=root,serial=root,bootindex=0" in argv
    assert option_after(argv, "-netdev") == ["bridge,id=net0,br=br-lm"]
    assert option_after(argv, "-sandbox") == ["on,obsolete=deny,resourcecontrol=deny"]  # helper
    assert option_after(argv, "-run-with") == ["user=lmrunner-sc"]  # QEMU >= 9.1
    assert "-runas" not in argv


def test_iso_boots_from_a_cdrom_without_scratch_or_runas(tmp_path: Path) -> None:
    made = files(tmp_path)
    spec = make_spec(tmp_path, made["cd.iso"])
    argv = vm.qemu_argv(spec, vm.plan(spec), launch(tmp_path, scratch=False, runas=None))
    assert option_after(argv, "-drive")[0] == f"file={made['cd.iso']},if=none,id=cd," \
        "media=cdrom,readonly=on"  # fmt: skip
    assert "ide-cd,drive=cd,bootindex=0" in argv
    assert len(option_after(argv, "-drive")) == 2  # the CD and the config drive
    assert "-runas" not in argv and "-run-with" not in argv


def test_commas_in_paths_are_escaped_for_qemu(tmp_path: Path) -> None:
    made = files(tmp_path)
    odd = tmp_path / "a,b"
    odd.mkdir()
    shutil.copy(made["disk.img"], odd / "disk.img")
    spec = make_spec(tmp_path, odd / "disk.img")
    argv = vm.qemu_argv(spec, vm.plan(spec), launch(odd / "vm"))
    assert any(d.startswith(f"file={tmp_path}/a,,b/vm/") for d in option_after(argv, "-drive"))


def test_mac_addresses_are_stable_local_unicast_and_per_lm() -> None:
    mac = vm.mac_address(UUID)
    assert mac == "52:0a:1b:2c:3d:4e" == vm.mac_address(UUID)
    assert int(mac[:2], 16) & 0b11 == 0b10  # locally administered, unicast
    assert vm.mac_address("ffffffff-0000-4000-8000-000000000000") != mac


def test_qemu_overhead_counts_the_tcg_cache() -> None:
    assert vm.memory_overhead_bytes(vm.Accel.KVM) == vm.QEMU_OVERHEAD_MIB * MIB
    assert vm.memory_overhead_bytes(vm.Accel.TCG) > vm.memory_overhead_bytes(vm.Accel.KVM)


# --- the config drive ---------------------------------------------------------------------------


def test_config_drive_tree_has_openstack_and_ec2_layouts(tmp_path: Path) -> None:
    data = vm_drive.DriveData(
        uuid=UUID, hostname="lm.example.com", user_data=b"#!/bin/sh\n",
        availability_zone="factory.example.com", meta={"machinetype": "mt"},
        public_key="ssh-ed25519 AAAA",
    )  # fmt: skip
    vm_drive.write_tree(data, tmp_path / "tree")
    found = sorted(str(p.relative_to(tmp_path / "tree")) for p in (tmp_path / "tree").rglob("*"))
    assert [f for f in found if "." in f or "-" in f or "_" in f] == [
        "ec2/latest/meta-data.json", "ec2/latest/user-data",
        "openstack/latest/meta_data.json", "openstack/latest/user_data",
    ]  # fmt: skip
    meta = json.loads((tmp_path / "tree/openstack/latest/meta_data.json").read_text())
    assert meta == {"uuid": UUID, "hostname": "lm.example.com", "name": "lm.example.com",
                    "availability_zone": "factory.example.com", "launch_index": 0,
                    "meta": {"machinetype": "mt"},
                    "public_keys": {"0": "ssh-ed25519 AAAA"}}  # fmt: skip
    ec2 = json.loads((tmp_path / "tree/ec2/latest/meta-data.json").read_text())
    assert ec2["instance-id"] == UUID and ec2["local-hostname"] == "lm.example.com"
    assert ec2["public-keys"] == {"0": {"openssh-key": "ssh-ed25519 AAAA"}}
    assert (tmp_path / "tree/ec2/latest/user-data").read_bytes() == b"#!/bin/sh\n"


def test_missing_iso_tool_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    data = vm_drive.DriveData(UUID, "lm", b"", "az", {})
    with pytest.raises(vm_drive.DriveError, match="install genisoimage or xorriso"):
        vm_drive.build(data, tmp_path / "cd.iso")


# --- start, stop, inspect, destroy -----------------------------------------------------------


def test_start_prepares_disks_and_drive_then_spawns_in_the_lm_cgroup(
    backend: vm.VmBackend, tmp_path: Path, commands: list[list[str]]
) -> None:
    made = files(tmp_path)
    spec = make_spec(tmp_path, made["disk.img"])
    procs = (tmp_path / "cg" / "cpu" / "cgroup.procs", tmp_path / "cg" / "memory" / "cgroup.procs")
    cgroup = LmCgroup(CgroupRef(1, "lm-x", (("cpu", "/cpu/lm-x"),)), procs, None)
    spec = dataclasses.replace(spec, cgroup=cgroup)
    handle = backend.start(spec)

    vm_dir = backend.root / UUID
    assert handle.data == {"pid": 4242, "start_ticks": 77, "vm_dir": str(vm_dir),
                           "directory": str(spec.directory), "accel": "tcg"}  # fmt: skip
    iso = next(c for c in commands if c[0].endswith("genisoimage"))
    assert iso[iso.index("-V") + 1] == "config-2" and "-J" in iso and "-R" in iso
    seen = vm_dir / (vm.DRIVE + ".seen")
    assert (seen / "openstack/latest/user_data").read_text() == "#!/bin/sh\necho hello\n"
    meta = json.loads((seen / "openstack/latest/meta_data.json").read_text())
    assert meta["meta"] == {
        "machinetype": "cernvm",
        "machinefeatures": "/etc/machinefeatures",
        "jobfeatures": "/etc/jobfeatures",
        "joboutputs": "/var/spool/joboutputs",
        "mount_tags": "machinefeatures jobfeatures joboutputs cvmfs",
    }
    assert meta["availability_zone"] == "factory.example.com"
    assert meta["public_keys"] == {"0": "ssh-ed25519 AAAA root@factory"}
    images = [c for c in commands if c[0].endswith("qemu-img")]
    assert images[0][1:] == ["create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                             str(made["disk.img"]), str(vm_dir / vm.OVERLAY)]  # fmt: skip
    assert images[1][-2:] == [str(vm_dir / vm.SCRATCH), str(3 * 10**9)]

    supervisor = fake(backend)
    spawned = supervisor.spawned[0]
    assert spawned["procs_files"] == procs
    assert spawned["cwd"] == vm_dir
    assert spawned["status_file"] == vm_dir / vm.EXIT
    assert spawned["log_file"] == spec.directory / vm.QEMU_LOG
    assert "-runas" not in spawned["argv"]  # the owner is this test's own account
    record = json.loads((vm_dir / vm.RECORD).read_text())
    assert (record["pid"], record["start_ticks"], record["accel"]) == (4242, 77, "tcg")
    assert [o.uuid for o in backend.list_owned()] == [UUID]
    assert backend.list_owned()[0].factory == "f1"
    assert backend.inspect(UUID, handle).state is EngineState.RUNNING


@pytest.mark.parametrize(
    ("accel", "choice", "unpacked"),
    [("tcg", "auto", True), ("kvm", "auto", False), ("kvm", "always", True),
     ("tcg", "never", False)],
)  # fmt: skip
def test_kernels_boot_unpacked_under_tcg_unless_told_otherwise(
    factory: FactoryConfig, running: set[int], commands: list[list[str]], tmp_path: Path,
    accel: str, choice: str, unpacked: bool,
) -> None:  # fmt: skip
    kernel = tmp_path / "images" / "vmlinuz"
    kernel.parent.mkdir()
    kernel.write_bytes(bzimage(gzip.compress(PVH_ELF)))
    config = dataclasses.replace(factory, vm_accel=accel, vm_direct_kernel=choice)
    backend = vm.VmBackend(
        config,
        supervisor=FakeSupervisor(running),  # type: ignore[arg-type]
        unpack_kernel=vm_kernel.cached,
    )
    try:
        handle = backend.start(make_spec(tmp_path, kernel, vm_initrd=kernel))
        booted = option_after(fake(backend).spawned[0]["argv"], "-kernel")
    finally:
        backend.close()
    digest = hashlib.sha256(kernel.read_bytes()).hexdigest()
    elf = backend.root / vm.KERNELS / f"{digest}.{vm_kernel.FORMAT}.elf"
    assert booted == [str(elf if unpacked else kernel)]
    assert handle.engine == {"accel": accel, "pid": "4242",
                             "boot": vm.BOOT_UNPACKED if unpacked else "kernel"}  # fmt: skip
    assert elf.exists() == unpacked


def test_a_kernel_that_cannot_be_unpacked_boots_as_given_and_is_told_once(
    backend: vm.VmBackend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made = files(tmp_path)  # a header too old to have payload fields
    spec = make_spec(tmp_path, made["vmlinuz"], vm_initrd=made["initrd"])
    plan = vm.plan(spec)
    with caplog.at_level("INFO", logger="lmrunner.backends.vm"):
        assert backend._direct_kernel(plan, vm.Accel.TCG, (7, 2)) is None
        assert backend._direct_kernel(plan, vm.Accel.TCG, (7, 2)) is None
    told = [r.getMessage() for r in caplog.records if "boots as a bzImage" in r.getMessage()]
    assert len(told) == 1 and "has no payload fields" in told[0]


def test_a_qemu_older_than_4_boots_the_bzimage(backend: vm.VmBackend, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bzimage(gzip.compress(PVH_ELF)))
    spec = make_spec(tmp_path, kernel, vm_initrd=kernel)
    assert backend._direct_kernel(vm.plan(spec), vm.Accel.TCG, (3, 1)) is None
    assert backend._direct_kernel(vm.plan(spec), vm.Accel.TCG, (4, 0)) is not None


def test_a_qemu_that_exits_at_once_fails_the_start_and_leaves_nothing(
    backend: vm.VmBackend, tmp_path: Path
) -> None:
    made = files(tmp_path)
    supervisor = fake(backend)
    supervisor.fail = True
    with pytest.raises(StartError, match=r"QEMU exited at once: .*Could not open"):
        backend.start(make_spec(tmp_path, made["vmlinuz"]))
    assert not (backend.root / UUID).exists()
    assert backend.list_owned() == []


def started(backend: vm.VmBackend, tmp_path: Path) -> tuple[Handle, FakeQemu]:
    made = files(tmp_path)
    handle = backend.start(make_spec(tmp_path, made["vmlinuz"], vm_initrd=made["initrd"]))
    supervisor = fake(backend)
    assert supervisor.qemu is not None
    return handle, supervisor.qemu


def wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)


def test_stop_presses_the_power_button_and_force_quits_then_kills(
    backend: vm.VmBackend, tmp_path: Path, running: set[int]
) -> None:
    handle, qemu = started(backend, tmp_path)
    backend.stop(UUID, handle)
    wait_for(lambda: qemu.commands[:1] == ["system_powerdown"])
    assert 4242 in running  # the guest decides when to power off
    backend.stop(UUID, handle, force=True)
    wait_for(lambda: "quit" in qemu.commands)
    assert 4242 not in running  # the fake QEMU ignores quit: it was killed
    backend.stop(UUID, handle, force=True)  # nothing left to stop: no error


def test_the_power_button_is_pressed_again_until_the_guest_is_gone(
    backend: vm.VmBackend, tmp_path: Path, running: set[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(driver, "PRESS_AGAIN_SECONDS", 0.05)
    handle, qemu = started(backend, tmp_path)
    backend.stop(UUID, handle)
    backend.stop(UUID, handle)  # a second stop adds no second presser
    wait_for(lambda: qemu.commands.count("system_powerdown") >= 4)  # early presses are lost
    running.discard(4242)  # the guest powered off at last
    wait_for(lambda: not backend._pressing)
    presses = qemu.commands.count("system_powerdown")
    time.sleep(0.2)
    assert qemu.commands.count("system_powerdown") == presses


def test_stop_without_qmp_is_a_backend_error(
    backend: vm.VmBackend, tmp_path: Path, running: set[int]
) -> None:
    handle, qemu = started(backend, tmp_path)
    qemu.close()
    (backend.root / UUID / vm.QMP_SOCKET).unlink()
    with pytest.raises(BackendError, match="cannot press the power button"):
        backend.stop(UUID, handle)


def test_a_guest_that_powers_off_ends_with_exit_0(
    backend: vm.VmBackend, tmp_path: Path, running: set[int]
) -> None:
    handle, qemu = started(backend, tmp_path)
    qemu.shutdown("guest-shutdown")
    wait_for(lambda: (backend.root / UUID / vm.SHUTDOWN).exists())
    running.discard(4242)
    exit_file = backend.root / UUID / vm.EXIT
    exit_file.write_text(json.dumps({"exit_code": 0, "ended_at": 1234.5}))
    status = backend.inspect(UUID, handle)
    assert (status.state, status.exit_code, status.ended_at) == (EngineState.EXITED, 0, 1234.5)
    assert status.detail == "the guest powered off" and status.engine_fault is None


@pytest.mark.parametrize(
    ("exit_code", "reason", "code", "fault"),
    [
        (0, "guest-shutdown", 0, None),
        (0, "guest-reset", None, None),
        (0, "guest-panic", None, None),
        (0, "host-qmp-quit", 0, "QEMU was told to quit (QMP) from outside lmrunner"),
        (0, "host-signal", None, "QEMU was stopped by a signal from outside lmrunner"),
        (None, "guest-shutdown", 0, None),  # adopted: no exit status, but the event was seen
        (137, None, 137, None),  # killed by SIGKILL: the core judges who sent it
        (1, None, 1, "QEMU failed with exit status 1 (see qemu.log)"),
        (None, None, None, None),
    ],
)
def test_how_a_vm_ended(
    exit_code: int | None, reason: str | None, code: int | None, fault: str | None
) -> None:
    status = vm.ended(ExitStatus(exit_code, 10.0), reason)
    assert (status.state, status.exit_code, status.engine_fault) == (
        EngineState.EXITED, code, fault)  # fmt: skip


def test_destroy_kills_and_removes_everything_and_is_idempotent(
    backend: vm.VmBackend, tmp_path: Path, running: set[int]
) -> None:
    handle, _ = started(backend, tmp_path)
    (tmp_path / "machines/lm" / vm.CONSOLE_LOG).write_text("boot\n")
    backend.destroy(UUID, handle)
    assert 4242 not in running
    assert not (backend.root / UUID).exists()
    assert (tmp_path / "machines/lm" / vm.CONSOLE_LOG).exists()  # kept for `lmrunner logs`
    backend.destroy(UUID, handle)
    assert backend.inspect(UUID, handle).state is EngineState.MISSING
    assert backend.list_owned() == []


def test_recover_reattaches_to_a_running_vm(
    factory: FactoryConfig, backend: vm.VmBackend, tmp_path: Path, running: set[int]
) -> None:
    handle, qemu = started(backend, tmp_path)
    backend.close()  # the daemon goes; QEMU stays
    after = vm.VmBackend(factory, supervisor=FakeSupervisor(running))  # type: ignore[arg-type]
    try:
        after.recover(UUID, handle)
        supervisor = fake(after)
        assert supervisor.adopted == [(UUID, ProcessId(4242, 77))]
        wait_for(lambda: len(qemu.events) == 2)  # the new daemon holds the event socket
        qemu.shutdown("guest-shutdown")
        wait_for(lambda: (after.root / UUID / vm.SHUTDOWN).exists())
        running.discard(4242)
        status = after.inspect(UUID, handle)  # no exit status (not our child), but the reason
        assert (status.state, status.exit_code) == (EngineState.EXITED, 0)
    finally:
        after.close()


def test_recover_of_a_vm_that_ended_meanwhile_and_of_an_unknown_one(
    backend: vm.VmBackend, tmp_path: Path, running: set[int]
) -> None:
    handle, qemu = started(backend, tmp_path)
    qemu.shutdown("guest-shutdown")
    running.discard(4242)
    (backend.root / UUID / vm.EXIT).write_text(json.dumps({"exit_code": 0, "ended_at": 1.0}))
    backend.recover(UUID, handle)  # the record is there: inspect tells the rest
    assert backend.inspect(UUID, handle).state is EngineState.EXITED
    with pytest.raises(MachineNotFound):
        backend.recover("11111111-2222-4333-8444-555555555555", handle)


# --- accelerator and probe ------------------------------------------------------------------


def test_fixed_accelerators_are_not_probed(
    factory: FactoryConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vm_accel, "probe_accel", lambda *a, **k: pytest.fail("probed"))
    for choice, accel in (("tcg", vm.Accel.TCG), ("kvm", vm.Accel.KVM)):
        config = FactoryConfig(space="s.example.com", state_dir=factory.state_dir, vm_accel=choice)
        assert vm.VmBackend(config).accel().accel is accel


def test_auto_probes_once_per_qemu_and_kernel_and_caches_on_disk(
    factory: FactoryConfig,
    commands: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    probes: list[dict[str, Any]] = []

    def probe(qemu: str, **kwargs: Any) -> vm.AccelProbe:
        probes.append(kwargs)
        return vm.AccelProbe(vm.Accel.TCG, "the KVM probe timed out", 20)

    monkeypatch.setattr(vm_accel, "probe_accel", probe)
    host = tmp_path / "host-cache"
    auto = FactoryConfig(space="s.example.com", state_dir=factory.state_dir, vm_accel="auto")

    def daemon() -> vm.VmBackend:  # each backend has its own cache: a new one is a new daemon
        return vm.VmBackend(auto, host_cache=host)

    backend = daemon()  # no probe guest to find: the probe makes its own
    first = backend.accel()
    assert first.accel is vm.Accel.TCG
    assert probes == [{"timeout": vm.DEFAULT_PROBE_TIMEOUT, "cpu": "host"}]
    cache = json.loads((factory.state_dir / "vm" / "accel.json").read_text())
    assert (cache["qemu_version"], cache["kernel"]) == ("7.2.22", os.uname().release)
    host_copy = json.loads((host / "vm-accel.json").read_text())
    assert {**host_copy, "probed_at": 0} == {**cache, "probed_at": 0}  # the host-wide copy
    (factory.state_dir / "vm" / "accel.json").unlink()
    assert daemon().accel() == first  # a new daemon, a new state_dir: the host-wide file answers
    (host / "vm-accel.json").unlink()
    assert backend.accel() == first  # and a daemon remembers its own answer
    assert len(probes) == 1
    cache["kernel"] = "another-kernel"  # after a host kernel update: probed again
    (factory.state_dir / "vm" / "accel.json").write_text(json.dumps(cache))
    (host / "vm-accel.json").write_text(json.dumps(cache))
    daemon().accel()
    assert len(probes) == 2


def test_probe_reports_version_and_accelerator(backend: vm.VmBackend) -> None:
    probe = backend.probe()
    assert (probe.health, probe.version) == (Health.OK, "7.2.22")
    assert probe.detail == "QEMU 7.2.22, accel tcg (factory.vm_accel is tcg)"


def test_probe_never_raises(factory: FactoryConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    probe = vm.VmBackend(factory).probe()
    assert probe.health is Health.UNAVAILABLE
    assert "qemu-system-x86_64 not found" in probe.detail

    def broken(argv: list[Any], **kwargs: Any) -> runner.Completed:
        raise CommandError(argv, 1, "", "qemu: error while loading shared libraries")

    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(runner, "run", broken)
    probe = vm.VmBackend(factory).probe()
    assert probe.health is Health.UNAVAILABLE
    assert "shared libraries" in probe.detail


# --- the metadata service (Vac's 169.254.169.254 and .253) -----------------------------------


def test_user_networking_forwards_both_metadata_addresses_to_the_lms_own_handler(
    tmp_path: Path,
) -> None:
    made = files(tmp_path)
    spec = make_spec(tmp_path, made["disk.qcow2"])
    handler = ("/usr/bin/python3", "-I", "/opt/x/metadata.py", str(spec.directory), "/opt/x")
    argv = vm.qemu_argv(spec, vm.plan(spec), launch(tmp_path, metadata=handler))
    cmd = " ".join(handler)
    assert option_after(argv, "-netdev") == [
        "user,id=net0,hostname=factory-00.example.com,net=169.254.0.0/16,"
        f"guestfwd=tcp:169.254.169.254:80-cmd:{cmd},guestfwd=tcp:169.254.169.253:80-cmd:{cmd}"
    ]
    # slirp starts the handler per connection: spawning is allowed, the rest stays denied
    assert option_after(argv, "-sandbox") == ["on,obsolete=deny,resourcecontrol=deny"]


def test_a_bridge_has_no_metadata_service_so_http_mjf_is_refused(tmp_path: Path) -> None:
    made = files(tmp_path)
    spec = make_spec(tmp_path, made["disk.qcow2"], vm_bridge="br-lm")
    urls = {k: f"http://169.254.169.253/{k.lower()}" for k in spec.env}
    with pytest.raises(SpecError, match=r"no metadata service.*mjf_env_style"):
        vm.plan(dataclasses.replace(spec, env=urls))


def test_the_handler_command_uses_a_python_the_lms_account_may_run(tmp_path: Path) -> None:
    from lmrunner.backends.vm import metadata

    argv = metadata.command(tmp_path, (os.getuid(), os.getgid()))
    assert argv is not None
    assert argv[1:4] == ("-I", str(Path(metadata.__file__).resolve()), str(tmp_path))
    assert (Path(argv[4]) / "lmrunner" / "untrusted.py").is_file()  # lmrunner is imported there
    locked = tmp_path / "locked"
    (locked / "lm").mkdir(parents=True)
    locked.chmod(0o700)
    nobody = (65534, 65534)
    assert metadata.reachable(tmp_path, nobody) is metadata.reachable(tmp_path.parent, nobody)
    assert not metadata.reachable(locked / "lm", nobody)
    assert metadata.reachable(locked / "lm", (0, 0))
