"""The distribution's layout: top-level backends/ and cgroups/ install only as lmrunner.*."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest

import lmrunner
import lmrunner.backends
import lmrunner.cgroups
from lmrunner import cli

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_subpackages_come_from_the_top_level_folders() -> None:
    assert Path(lmrunner.backends.__file__ or "").parent == REPO / "backends"
    assert Path(lmrunner.cgroups.__file__ or "").parent == REPO / "cgroups"
    assert Path(lmrunner.__file__ or "").parent == REPO / "lmrunner"


def test_no_top_level_backends_or_cgroups_module_is_installed() -> None:
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    assert mapping == {
        "lmrunner": "lmrunner",
        "lmrunner.backends": "backends",
        "lmrunner.cgroups": "cgroups",
    }
    for name in ("backends", "cgroups"):
        spec = importlib.util.find_spec(name)
        # Only the repository checkout itself (on sys.path when pytest runs from it) may offer it.
        assert spec is None or Path(spec.origin or "").is_relative_to(REPO)


def test_distribution_metadata() -> None:
    project = PYPROJECT["project"]
    assert project["name"] == "vacuum-lmrunner"
    assert project["scripts"] == {"lmrunner": "lmrunner.cli:main"}
    runtime = {dep.split(">")[0].split("=")[0] for dep in project["dependencies"]}
    # urllib3 comes with requests; declared because the Docker backend catches its errors.
    # spython is not one (docs/backends/apptainer.md: it fits none of the backend's jobs).
    # qemu.qmp is QEMU's own QMP client, which the VM backend uses (docs/backends/vm.md).
    # cysystemd: sd_notify and the journal, for the daemon as a systemd service (lmrunner.service).
    # prometheus-client: the daemon's /metrics (docs/operations.md).
    assert runtime == {
        "cysystemd", "docker", "prometheus-client", "psutil", "pyyaml", "qemu.qmp", "requests",
        "urllib3",
    }  # fmt: skip
    dev = {dep.split(">")[0].split("=")[0] for dep in project["optional-dependencies"]["dev"]}
    assert {"pytest", "ruff", "mypy", "hypothesis", "virtme-ng"} <= dev


def test_pytest_markers_are_strict_and_complete() -> None:
    options = PYPROJECT["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in options["addopts"]
    names = {marker.split(":")[0] for marker in options["markers"]}
    assert {"docker", "apptainer", "qemu", "cgroup_v1", "cgroup_v2", "slow"} <= names


def test_version_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out == f"lmrunner {lmrunner.__version__}\n"


def test_every_subpackage_is_installed() -> None:
    # The package list is explicit (the folders are mapped), so a new subpackage must be added
    # to it, or the wheel (and the factory image) silently lacks it.
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *relative.parts]))
    assert found == listed
