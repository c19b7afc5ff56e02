"""Delegating an LM's cgroup to the account its LM runs as (cgroup-v2.rst, "Delegation")."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmrunner.cgroups import CgroupRef, V1Controller, V2Controller
from lmrunner.errors import CgroupError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
DELEGATED = ("cgroup.procs", "cgroup.threads", "cgroup.subtree_control")


def _lm(path: Path, names: tuple[str, ...]) -> Path:
    path.mkdir(parents=True)
    for name in names:
        (path / name).write_text("")
    return path


def test_v2_delegation_chowns_the_directory_and_its_delegated_files(tmp_path: Path) -> None:
    lm = _lm(tmp_path / "lmrunner" / "lm-1", (*DELEGATED, "memory.max"))
    ctl = V2Controller(tmp_path, "lmrunner")
    ctl.delegate(CgroupRef(2, "lm-1", (("unified", str(lm)),)), 4242, 4343)
    for path in (lm, *(lm / name for name in DELEGATED)):
        assert (path.stat().st_uid, path.stat().st_gid) == (4242, 4343), path
    assert (lm / "memory.max").stat().st_uid == 0  # the limits stay root's


def test_v1_delegation_covers_every_hierarchy(tmp_path: Path) -> None:
    bases = {c: tmp_path / c for c in ("cpu", "cpuacct", "memory", "pids")}
    paths = tuple(
        (c, str(_lm(b / "lmrunner" / "lm-1", ("cgroup.procs", "tasks")))) for c, b in bases.items()
    )
    V1Controller(bases, "lmrunner").delegate(CgroupRef(1, "lm-1", paths), 4242, 4343)
    for _, path in paths:
        assert Path(path).stat().st_uid == 4242
        assert (Path(path) / "tasks").stat().st_uid == 4242


def test_delegating_a_vanished_cgroup_is_a_cgroup_error(tmp_path: Path) -> None:
    ref = CgroupRef(2, "lm-1", (("unified", str(tmp_path / "lmrunner" / "lm-1")),))
    with pytest.raises(CgroupError, match="cannot delegate"):
        V2Controller(tmp_path, "lmrunner").delegate(ref, 4242, 4343)
