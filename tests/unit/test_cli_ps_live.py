"""``lmrunner ps`` reads a running LM's CPU and memory live from its cgroup's files (issue 6).

The cgroup references in the records point at fake v1/v2 interface files under tmp_path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmrunner.cgroups.base import CgroupRef
from lmrunner.cli import main
from lmrunner.lifecycle import LmState, Outcome, OutcomeSource
from lmrunner.model import Limits
from lmrunner.state import LmRecord, Store

MIB = 1 << 20
NAME = "factory-00.example.com"
AGE = 3600.0  # the LM started an hour ago


@pytest.fixture(autouse=True)
def _no_site_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMRUNNER_CONFIG", raising=False)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state: Path) -> Iterator[Store]:
    opened = Store(state)
    yield opened
    opened.close()


def lm(folder: Path, ref: CgroupRef | None, *, processors: int = 1, **changes: Any) -> LmRecord:
    now = time.time()
    values: dict[str, Any] = {
        "uuid": f"uuid-{NAME}",
        "name": NAME,
        "machinetype": "quick",
        "backend": "fake",
        "slot": 0,
        "processors": processors,
        "limits": Limits(processors, processors * 2048 * MIB, 0, 0, None),
        "hs06": float(processors),
        "shutdown_time": int(now + 86400),
        "directory": folder / "machines" / NAME,
        "created": now - AGE - 1,
        "state": LmState.RUNNING,
        "started": now - AGE,
        "cgroup": None if ref is None else ref.to_json(),
    }
    values.update(changes)
    return LmRecord(**values)


def v2_cgroup(root: Path, *, cpu_seconds: float, memory: int) -> CgroupRef:
    path = root / "lmrunner" / "lm-x"
    path.mkdir(parents=True)
    (path / "cpu.stat").write_text(f"usage_usec {int(cpu_seconds * 1e6)}\nuser_usec 1\n")
    (path / "memory.current").write_text(f"{memory}\n")
    return CgroupRef(2, "lm-x", (("unified", str(path)),))


def v1_cgroup(root: Path, *, cpu_seconds: float, memory: int) -> CgroupRef:
    cpu = root / "cpu,cpuacct" / "lmrunner" / "lm-x"
    mem = root / "memory" / "process_api" / "lmrunner" / "lm-x"
    for path in (cpu, mem):
        path.mkdir(parents=True)
    (cpu / "cpuacct.usage").write_text(f"{int(cpu_seconds * 1e9)}\n")
    (mem / "memory.usage_in_bytes").write_text(f"{memory}\n")
    return CgroupRef(1, "lm-x", (("cpu", str(cpu)), ("cpuacct", str(cpu)), ("memory", str(mem))))


def ps(state: Path, capsys: pytest.CaptureFixture[str], *options: str) -> str:
    assert main(["ps", *options, "--state-dir", str(state)]) == 0
    return capsys.readouterr().out


def row_of(out: str) -> list[str]:
    """The cells of the table's only LM line."""
    lines = out.splitlines()
    assert len(lines) == 3, out
    return lines[1].split()


def only_lm(out: str) -> dict[str, Any]:
    [entry] = json.loads(out)["lms"]
    assert isinstance(entry, dict)
    return entry


@pytest.mark.parametrize("make", [v2_cgroup, v1_cgroup], ids=["v2", "v1"])
def test_a_running_lm_shows_live_cpu_and_memory(
    state: Path, store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any
) -> None:
    ref = make(tmp_path / "cgroup", cpu_seconds=AGE, memory=512 * MIB)
    store.insert(lm(state, ref, processors=2))
    cells = row_of(ps(state, capsys))
    assert cells[0] == NAME
    assert cells[6:8] == ["50.0", "512M"]  # an hour of CPU in an hour on two processors

    entry = only_lm(ps(state, capsys, "--json"))
    assert entry["cpu_seconds"] == pytest.approx(AGE)
    assert entry["memory_bytes"] == 512 * MIB
    assert entry["memory_peak_bytes"] is None
    assert entry["measured"] == {
        "cpu_seconds": True,
        "memory_bytes": True,
        "memory_peak_bytes": False,
        "disk_bytes": False,
    }


def test_live_values_win_over_the_stored_ones(
    state: Path, store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = v2_cgroup(tmp_path / "cgroup", cpu_seconds=900, memory=100 * MIB)
    store.insert(lm(state, ref, cpu_seconds=1.0, memory_peak_bytes=300 * MIB))
    assert row_of(ps(state, capsys))[6:8] == ["25.0", "100M"]  # memory now, not the peak
    entry = only_lm(ps(state, capsys, "--json"))
    assert (entry["cpu_seconds"], entry["memory_bytes"]) == (900.0, 100 * MIB)
    assert entry["memory_peak_bytes"] == 300 * MIB


@pytest.mark.parametrize("make", [v2_cgroup, v1_cgroup], ids=["v2", "v1"])
def test_a_vanished_cgroup_shows_dashes(
    state: Path, store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any
) -> None:
    ref = make(tmp_path / "cgroup", cpu_seconds=10, memory=MIB)
    store.insert(lm(state, ref))
    for path in sorted(ref.unique_paths(), reverse=True):
        for file in path.iterdir():
            file.unlink()
        path.rmdir()
    assert row_of(ps(state, capsys))[6:8] == ["-", "-"]
    entry = only_lm(ps(state, capsys, "--json"))
    assert (entry["cpu_seconds"], entry["memory_bytes"]) == (None, None)
    assert entry["measured"] == {
        "cpu_seconds": False,
        "memory_bytes": False,
        "memory_peak_bytes": False,
        "disk_bytes": False,
    }


def test_an_unreadable_cgroup_reference_shows_dashes(
    state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    store.insert(lm(state, None, cgroup="not a reference"))
    assert row_of(ps(state, capsys))[6:8] == ["-", "-"]
    assert only_lm(ps(state, capsys, "--json"))["measured"]["memory_bytes"] is False


def test_an_lm_without_a_cgroup_is_not_measured_live(
    state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    store.insert(lm(state, None))
    assert row_of(ps(state, capsys))[6:8] == ["-", "-"]
    assert only_lm(ps(state, capsys, "--json"))["measured"] == {
        "cpu_seconds": False,
        "memory_bytes": False,
        "memory_peak_bytes": False,
        "disk_bytes": False,
    }


def test_an_ended_lm_shows_its_final_values_not_its_leftover_cgroup(
    state: Path, store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finished LM whose cgroup could not be removed yet: its record's numbers stand."""
    ref = v2_cgroup(tmp_path / "cgroup", cpu_seconds=9999, memory=999 * MIB)
    now = time.time()
    store.insert(
        lm(
            state,
            ref,
            state=LmState.FINISHED,
            finished=now - AGE / 2,
            outcome=Outcome(200, "done", OutcomeSource.PAYLOAD),
            cpu_seconds=AGE / 4,
            memory_peak_bytes=256 * MIB,
        )
    )
    cells = row_of(ps(state, capsys, "--all"))
    assert cells[3] == "finished"
    assert cells[6:8] == ["50.0", "256M"]  # a quarter hour of CPU over its half hour
    entry = only_lm(ps(state, capsys, "--json", "--all"))
    assert entry["cpu_seconds"] == AGE / 4
    assert entry["memory_bytes"] is None
    assert entry["measured"] == {
        "cpu_seconds": True,
        "memory_bytes": False,
        "memory_peak_bytes": True,
        "disk_bytes": False,
    }
