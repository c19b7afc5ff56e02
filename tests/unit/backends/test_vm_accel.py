"""The KVM probe decides between KVM and TCG without ever hanging or raising."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lmrunner import runner
from lmrunner.backends import vm
from lmrunner.errors import CommandError, CommandTimeout


@pytest.fixture
def dev_kvm(tmp_path: Path) -> Path:
    path = tmp_path / "kvm"
    path.write_text("")
    return path


def fake_run(result: Any) -> Any:
    calls: list[list[str]] = []

    def run(argv: list[str], **kwargs: Any) -> runner.Completed:
        calls.append(argv)
        if isinstance(result, Exception):
            raise result
        return runner.Completed(tuple(argv), 0, result, "", 0.1)

    run.calls = calls  # type: ignore[attr-defined]
    return run


def probe(monkeypatch: pytest.MonkeyPatch, dev_kvm: Path, result: Any) -> vm.AccelProbe:
    fake = fake_run(result)
    monkeypatch.setattr(runner, "run", fake)
    got = vm.probe_accel("qemu", Path("k"), Path("i"), timeout=5, dev_kvm=dev_kvm)
    if dev_kvm.exists():
        argv = fake.calls[0]
        assert argv[argv.index("-accel") + 1] == "kvm"
        assert "vcbusybox.probe=1" in argv[argv.index("-append") + 1]
    return got


def test_guest_reaching_userspace_means_kvm(monkeypatch: pytest.MonkeyPatch, dev_kvm: Path) -> None:
    got = probe(monkeypatch, dev_kvm, f"Linux ...\n{vm.PROBE_MARKER}\n")
    assert got.accel is vm.Accel.KVM


def test_hanging_guest_means_tcg(monkeypatch: pytest.MonkeyPatch, dev_kvm: Path) -> None:
    got = probe(monkeypatch, dev_kvm, CommandTimeout(["qemu"], 5, "", ""))
    assert got.accel is vm.Accel.TCG
    assert "did not reach userspace within 5 s" in got.detail


def test_qemu_error_means_tcg(monkeypatch: pytest.MonkeyPatch, dev_kvm: Path) -> None:
    err = CommandError(["qemu"], 1, "", "Could not access KVM kernel module: Permission denied")
    got = probe(monkeypatch, dev_kvm, err)
    assert got.accel is vm.Accel.TCG
    assert "Permission denied" in got.detail


def test_guest_without_marker_means_tcg(monkeypatch: pytest.MonkeyPatch, dev_kvm: Path) -> None:
    assert probe(monkeypatch, dev_kvm, "Kernel panic\n").accel is vm.Accel.TCG


def test_missing_device_means_tcg_without_starting_qemu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    got = probe(monkeypatch, tmp_path / "no-kvm", "unused")
    assert got.accel is vm.Accel.TCG
    assert "does not exist" in got.detail
