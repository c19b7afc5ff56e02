"""The KVM probe decides between KVM and TCG without ever hanging or raising, and its probe
guest is a boot sector made in Python (no build artefact)."""

from __future__ import annotations

import hashlib
import os
import platform
import struct
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

from lmrunner import runner
from lmrunner.backends import vm
from lmrunner.backends.vm import accel
from lmrunner.errors import CommandError, CommandTimeout

#: sha256 of GNU as's output for the source in probe_boot_sector's docstring (LOOPS = 1 << 28),
#: linked with ``ld -Ttext 0x7c00 --oformat binary``.
GNU_AS_SHA256 = "9c24928837907e187be7be7c747720efcac2da050b2d3924bccf804cfb21553e"
EXIT_SEQUENCE = b"\xb0\x31\xe6\xf4\xf4\xeb\xfd"  # mov al,0x31; out 0xf4,al; hlt; jmp $-1


# --- the probe guest --------------------------------------------------------------------------


def test_boot_sector_is_what_gnu_as_makes_of_its_source() -> None:
    sector = accel.probe_boot_sector()
    assert len(sector) == 512
    assert sector[510:] == b"\x55\xaa"
    assert hashlib.sha256(sector).hexdigest() == GNU_AS_SHA256


def test_boot_sector_counts_down_then_exits_through_the_debug_port() -> None:
    loops = 0x01020304
    sector = accel.probe_boot_sector(loops)
    assert sector[:2] == b"\xfa\xfc"  # cli; cld: no interrupt ever reaches the guest
    loop = b"\xb9" + struct.pack("<I", loops) + b"\xff\xc9\x75\xfc"  # mov ecx; 1: dec; jnz 1b
    assert sector.count(loop + EXIT_SEQUENCE) == 1
    assert (accel.PROBE_EXIT_PORT, accel.PROBE_EXIT_VALUE) == (0xF4, 0x31)
    assert accel.PROBE_EXIT_STATUS == 99  # (0x31 << 1) | 1, QEMU's isa-debug-exit status


def test_boot_sector_addresses_point_where_they_should() -> None:
    sector, base = accel.probe_boot_sector(), 0x7C00
    lgdt = sector.index(b"\x0f\x01\x16")  # lgdt [imm16]
    (gdtr,) = struct.unpack_from("<H", sector, lgdt + 3)
    limit, gdt = struct.unpack_from("<HI", sector, gdtr - base)
    assert limit == 15
    assert struct.unpack_from("<QQ", sector, gdt - base) == (0, 0x00209A0000000000)
    assert sector[lgdt + 5] == 0xEA  # jmp far: offset, then the code selector
    target, selector = struct.unpack_from("<HH", sector, lgdt + 6)
    assert (target - base, selector) == (lgdt + 10, 0x08)  # long mode code right after it
    assert sector[target - base] == 0xB9  # mov ecx, loops
    assert gdt % 8 == 0


@pytest.mark.parametrize("loops", [0, -1, 1 << 32])
def test_boot_sector_refuses_counts_outside_32_bits(loops: int) -> None:
    with pytest.raises(ValueError, match="32 bits"):
        accel.probe_boot_sector(loops)


def test_probe_argv_is_a_list_booting_the_image_with_the_exit_device(tmp_path: Path) -> None:
    image = tmp_path / "a,b" / "probe.img"
    argv = accel.probe_argv("/usr/bin/qemu-system-x86_64", image, vm.Accel.KVM, "host")
    assert all(isinstance(arg, str) for arg in argv)
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert argv[argv.index("-cpu") + 1] == "host"
    assert argv[argv.index("-machine") + 1] == "pc"
    assert {"-nodefaults", "-no-user-config", "-no-reboot"} <= set(argv)
    assert argv[argv.index("-display") + 1] == "none"
    drive = str(tmp_path / "a,,b" / "probe.img")  # QEMU's comma escape
    assert argv[argv.index("-drive") + 1] == f"file={drive},format=raw,if=ide"
    assert argv[argv.index("-device") + 1] == "isa-debug-exit,iobase=0xf4,iosize=0x04"
    tcg = accel.probe_argv("qemu", image, vm.Accel.TCG)
    assert tcg[tcg.index("-accel") + 1] == "tcg"
    assert "-cpu" not in tcg


# --- the decision -----------------------------------------------------------------------------


@pytest.fixture
def dev_kvm(tmp_path: Path) -> Path:
    path = tmp_path / "kvm"
    path.write_text("")
    return path


class FakeQemu:
    """Stands in for runner.run: checks the probe's command line and guest, then ends as told
    (an exit status, or an exception such as a timeout)."""

    def __init__(self, outcome: int | Exception) -> None:
        self.outcome = outcome
        self.calls: list[dict[str, Any]] = []

    def __call__(
        self,
        argv: list[str],
        *,
        timeout: float | None = None,
        ok_codes: Collection[int] = (0,),
        **kwargs: Any,
    ) -> runner.Completed:
        drive = argv[argv.index("-drive") + 1]
        image = Path(drive.removeprefix("file=").split(",format=")[0])
        self.calls.append({"argv": argv, "timeout": timeout, "ok_codes": tuple(ok_codes),
                           "image": image, "guest": image.read_bytes()})  # fmt: skip
        if isinstance(self.outcome, Exception):
            raise self.outcome
        if self.outcome not in ok_codes:
            raise CommandError(argv, self.outcome, "", "qemu-system-x86_64: some complaint\n")
        return runner.Completed(tuple(argv), self.outcome, "", "", 0.1)


def probe(
    monkeypatch: pytest.MonkeyPatch, dev_kvm: Path, outcome: int | Exception, **kwargs: Any
) -> tuple[vm.AccelProbe, FakeQemu]:
    fake = FakeQemu(outcome)
    monkeypatch.setattr(runner, "run", fake)
    kwargs.setdefault("machine", "x86_64")
    got = vm.probe_accel("qemu", timeout=5, dev_kvm=dev_kvm, **kwargs)
    assert "\n" not in got.detail  # one line
    for call in fake.calls:
        assert call["guest"] == accel.probe_boot_sector()
        assert not call["image"].exists()  # the temporary guest is gone afterwards
        assert (call["timeout"], call["ok_codes"]) == (5, (99,))
        assert call["argv"][call["argv"].index("-accel") + 1] == "kvm"
    return got, fake


def test_guest_that_exits_with_99_means_kvm(monkeypatch: pytest.MonkeyPatch, dev_kvm: Path) -> None:
    got, fake = probe(monkeypatch, dev_kvm, 99, cpu="host")
    assert got.accel is vm.Accel.KVM
    assert got.detail.startswith("KVM probe guest ran in ")
    argv = fake.calls[0]["argv"]
    assert argv[argv.index("-cpu") + 1] == "host"


def test_hanging_or_crawling_guest_means_tcg(
    monkeypatch: pytest.MonkeyPatch, dev_kvm: Path
) -> None:
    got, _ = probe(monkeypatch, dev_kvm, CommandTimeout(["qemu"], 5, "", ""))
    assert got.accel is vm.Accel.TCG
    assert got.detail.startswith("the KVM probe timed out")
    assert "within 5 s" in got.detail


@pytest.mark.parametrize("status", [0, 1, 3])
def test_any_other_exit_status_means_tcg(
    monkeypatch: pytest.MonkeyPatch, dev_kvm: Path, status: int
) -> None:
    got, _ = probe(monkeypatch, dev_kvm, status)
    assert got.accel is vm.Accel.TCG
    assert got.detail == (f"qemu -accel kvm exited with {status}, not 99 (the probe guest's "
                          "end): qemu-system-x86_64: some complaint")  # fmt: skip


def test_qemu_error_means_tcg(monkeypatch: pytest.MonkeyPatch, dev_kvm: Path) -> None:
    err = CommandError(["qemu"], 1, "", "Could not access KVM kernel module: Permission denied\n")
    got, _ = probe(monkeypatch, dev_kvm, err)
    assert got.accel is vm.Accel.TCG
    assert got.detail.endswith("Could not access KVM kernel module: Permission denied")


def test_qemu_that_cannot_start_means_tcg(monkeypatch: pytest.MonkeyPatch, dev_kvm: Path) -> None:
    err = CommandError(["qemu"], None, "", "cannot execute: [Errno 2] No such file")
    got, _ = probe(monkeypatch, dev_kvm, err)
    assert got.accel is vm.Accel.TCG
    assert got.detail == "qemu -accel kvm did not run: cannot execute: [Errno 2] No such file"


def test_missing_device_means_tcg_without_starting_qemu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    got, fake = probe(monkeypatch, tmp_path / "no-kvm", 99)
    assert got.accel is vm.Accel.TCG
    assert got.detail == f"{tmp_path / 'no-kvm'} does not exist"
    assert fake.calls == []


def test_inaccessible_device_means_tcg_without_starting_qemu(
    monkeypatch: pytest.MonkeyPatch, dev_kvm: Path
) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    got, fake = probe(monkeypatch, dev_kvm, 99)
    assert got.accel is vm.Accel.TCG
    assert "is not readable and writable" in got.detail
    assert fake.calls == []


def test_unwritable_temporary_folder_means_tcg(
    monkeypatch: pytest.MonkeyPatch, dev_kvm: Path
) -> None:
    def no_folder(**kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", "/tmp/lmrunner-kvm-probe-x")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", no_folder)
    got, fake = probe(monkeypatch, dev_kvm, 99)
    assert got.accel is vm.Accel.TCG
    assert got.detail.startswith("cannot write the KVM probe guest to a temporary folder: ")
    assert fake.calls == []


@pytest.mark.parametrize("machine", ["aarch64", "ppc64le", "s390x", "i686", ""])
def test_other_host_architectures_mean_tcg_without_starting_qemu(
    monkeypatch: pytest.MonkeyPatch, dev_kvm: Path, machine: str
) -> None:
    got, fake = probe(monkeypatch, dev_kvm, 99, machine=machine)
    assert got.accel is vm.Accel.TCG
    assert got.detail.startswith(f"KVM not tried: this host is {machine or 'unknown'}, not x86_64")
    assert fake.calls == []


def test_host_architecture_defaults_to_platform_machine(
    monkeypatch: pytest.MonkeyPatch, dev_kvm: Path
) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    fake = FakeQemu(99)
    monkeypatch.setattr(runner, "run", fake)
    assert vm.probe_accel("qemu", dev_kvm=dev_kvm).accel is vm.Accel.TCG
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert vm.probe_accel("qemu", dev_kvm=dev_kvm).accel is vm.Accel.KVM
    assert [call["timeout"] for call in fake.calls] == [vm.DEFAULT_PROBE_TIMEOUT]


# --- the cache --------------------------------------------------------------------------------


def test_cache_probes_once_without_any_probe_guest_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    probes: list[dict[str, Any]] = []

    def fake_probe(qemu: str, **kwargs: Any) -> vm.AccelProbe:
        probes.append({"qemu": qemu, **kwargs})
        return vm.AccelProbe(vm.Accel.TCG, "the KVM probe timed out", 20.0)

    monkeypatch.setattr(accel, "probe_accel", fake_probe)
    cache = vm.AccelCache((tmp_path / "accel.json",), probe_timeout=7)
    first = cache.get("/usr/bin/qemu-system-x86_64", "7.2.22")
    assert first.detail == "the KVM probe timed out"
    assert cache.get("/usr/bin/qemu-system-x86_64", "7.2.22") == first
    assert vm.AccelCache((tmp_path / "accel.json",)).get("/usr/bin/qemu-system-x86_64",
                                                          "7.2.22") == first  # fmt: skip
    assert probes == [{"qemu": "/usr/bin/qemu-system-x86_64", "timeout": 7, "cpu": "host"}]
