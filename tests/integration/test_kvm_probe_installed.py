"""The KVM probe of an lmrunner installed from a wheel: no checkout, no vcbusybox build.

A wheel is built from a copy of the checkout (so no build/ or egg-info lands in it), installed
with its dependencies (from the package index) into a new virtual environment, and run from a
folder outside the checkout with ``python -I`` (no PYTHONPATH, no user site, no working
directory on sys.path). The installed package then decides the accelerator as ``vm_accel: auto``
does, by running its own probe guest; and the probe guest itself is shown to work under TCG.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import REPO

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

#: What a wheel is built from (pyproject.toml's packages and readme).
SOURCES = ("pyproject.toml", "README.md", "lmrunner", "backends", "cgroups")
PROBE_PREFIX = "lmrunner-kvm-probe-"  # the probe's temporary folder (backends/vm/accel.py)

#: Run by the installed interpreter: the backend's decision (AccelCache, as VmBackend makes it)
#: and the probe guest under -accel tcg, reported as JSON.
CHILD = """
import json, subprocess, sys, tempfile, time
from pathlib import Path
from lmrunner.backends.vm import accel

qemu, version, cache_file = sys.argv[1:4]
started = time.monotonic()
found = accel.AccelCache((Path(cache_file),)).get(qemu, version)
wall = time.monotonic() - started
with tempfile.TemporaryDirectory() as folder:
    image = Path(folder) / "probe.img"
    image.write_bytes(accel.probe_boot_sector())
    argv = accel.probe_argv(qemu, image, accel.Accel.TCG)
    tcg_started = time.monotonic()
    tcg = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    tcg_seconds = time.monotonic() - tcg_started
print(json.dumps({
    "file": accel.__file__, "path": sys.path, "prefix": sys.prefix,
    "modules": sorted({str(getattr(m, "__file__", "") or "") for m in list(sys.modules.values())}),
    "accel": found.accel.value, "detail": found.detail, "seconds": found.seconds, "wall": wall,
    "timeout": accel.DEFAULT_PROBE_TIMEOUT, "tcg_argv": argv, "tcg_status": tcg.returncode,
    "tcg_stderr": tcg.stderr, "tcg_seconds": tcg_seconds,
}))
"""


def run(
    argv: list[str | Path],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> str:
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False,
        cwd=cwd, env=env,
    )  # fmt: skip
    assert done.returncode == 0, f"{argv} exited with {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A new virtual environment holding lmrunner installed from a wheel; its python."""
    top = tmp_path_factory.mktemp("installed")
    source = top / "source"
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.pyc"))  # fmt: skip
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    wheels = top / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    try:  # build isolation fetches setuptools>=77 from the index (the dev venv's is older)
        run([*pip, "wheel", "--no-deps", "-w", wheels, source], timeout=600)
    except AssertionError as err:
        pytest.skip(f"cannot build a wheel (is the package index reachable?): {err}")
    (wheel,) = wheels.glob("vacuum_lmrunner-*.whl")
    venv = top / "venv"
    run([sys.executable, "-m", "venv", venv], timeout=300)
    python = venv / "bin" / "python"
    try:
        run([python, "-m", "pip", "--disable-pip-version-check", "--no-input", "install",
             wheel], timeout=600)  # fmt: skip
    except AssertionError as err:
        pytest.skip(f"cannot install the wheel's dependencies from the package index: {err}")
    yield python


@pytest.fixture(scope="module")
def outcome(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What the installed package decided, run from a folder outside the checkout."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not on PATH: run scripts/bootstrap")
    version = run([qemu, "-version"], timeout=30).split("version ")[1].split()[0]
    work = tmp_path_factory.mktemp("elsewhere")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["TMPDIR"] = str(work)  # the probe's temporary guest goes here: checked below
    out = run([installed, "-I", "-c", CHILD, qemu, version, work / "accel.json"], timeout=300,
              cwd=work, env=env)  # fmt: skip
    result: dict[str, Any] = json.loads(out)
    result["work"] = work
    print(
        f"installed probe: {result['accel']} ({result['detail']}) in {result['wall']:.2f} s; "
        f"guest under TCG: status {result['tcg_status']} in {result['tcg_seconds']:.2f} s"
    )
    return result


def test_the_installed_package_not_the_checkout_is_what_runs(
    installed: Path, outcome: dict[str, Any]
) -> None:
    venv = installed.parents[1]
    assert Path(outcome["file"]).is_relative_to(venv), outcome["file"]
    assert Path(outcome["prefix"]) == venv
    assert not any(p and Path(p).is_relative_to(REPO) for p in outcome["path"]), outcome["path"]
    assert not any(f and Path(f).is_relative_to(REPO) for f in outcome["modules"])


def test_installed_package_decides_by_running_its_probe_guest(outcome: dict[str, Any]) -> None:
    dev_kvm, detail, timeout = Path("/dev/kvm"), outcome["detail"], outcome["timeout"]
    if not dev_kvm.exists():
        assert (outcome["accel"], detail) == ("tcg", "/dev/kvm does not exist")
    elif not os.access(dev_kvm, os.R_OK | os.W_OK):
        assert outcome["accel"] == "tcg"
        assert detail == "/dev/kvm is not readable and writable by this process"
    elif outcome["accel"] == "kvm":  # a working KVM: the guest ran to its end
        assert detail.startswith("KVM probe guest ran in "), detail
        assert outcome["wall"] < timeout
    else:  # the development machines: /dev/kvm opens, but its guests crawl
        assert detail.startswith("the KVM probe timed out: its guest did not finish within "
                                 f"{timeout:g} s"), detail  # fmt: skip
        assert timeout <= outcome["wall"] < timeout + 5  # no longer than its timeout
    # The decision is cached, as the backend keeps it.
    cached = json.loads((outcome["work"] / "accel.json").read_text())
    assert (cached["accel"], cached["detail"]) == (outcome["accel"], detail)


def test_probe_leaves_no_process_and_no_file(outcome: dict[str, Any]) -> None:
    assert not list(outcome["work"].glob(f"{PROBE_PREFIX}*"))  # its temporary guest is gone
    leftovers = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue  # not a process, or one that just ended
        if PROBE_PREFIX.encode() in cmdline and str(outcome["work"]).encode() in cmdline:
            leftovers.append((proc.name, cmdline.replace(b"\0", b" ")))
    assert leftovers == []


def test_probe_guest_runs_to_its_end_under_tcg(outcome: dict[str, Any]) -> None:
    argv = outcome["tcg_argv"]
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert outcome["tcg_status"] == 99, outcome["tcg_stderr"]  # (0x31 << 1) | 1: it ran
