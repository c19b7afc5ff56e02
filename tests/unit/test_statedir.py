"""lmrunner.statedir without a Factory: problem() on a faked os.statvfs, and Watch's log lines
and probe write (a real Store in tmp_path)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lmrunner.state import Store, StoreUnwritable
from lmrunner.statedir import MIN_FREE_BYTES, Watch, problem
from tests.unit.test_factory import Clock

LOGGER = "lmrunner.factory"
MIB = 1 << 20
BLOCK = 4096


class Statvfs:
    """A stand-in for os.statvfs whose answer the test sets."""

    def __init__(self) -> None:
        self.readonly = False
        self.free = 1 << 40
        self.error: OSError | None = None
        self.paths: list[Path] = []

    def __call__(self, path: Any) -> Any:
        self.paths.append(Path(path))
        if self.error is not None:
            raise self.error
        return SimpleNamespace(
            f_flag=os.ST_RDONLY if self.readonly else 0,
            f_bavail=self.free // BLOCK,
            f_frsize=BLOCK,
        )

    def healthy(self) -> None:
        self.readonly, self.free, self.error = False, 1 << 40, None


@pytest.fixture
def statvfs(monkeypatch: pytest.MonkeyPatch) -> Statvfs:
    fake = Statvfs()
    monkeypatch.setattr(os, "statvfs", fake)  # what lmrunner.statedir calls
    return fake


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    made = Store(tmp_path / "state")
    yield made
    made.close()


# --- problem() ---------------------------------------------------------------------------------


def test_a_healthy_state_dir_has_no_problem(statvfs: Statvfs, tmp_path: Path) -> None:
    assert problem(tmp_path) is None
    assert statvfs.paths == [tmp_path]


def test_a_read_only_filesystem(statvfs: Statvfs, tmp_path: Path) -> None:
    statvfs.readonly = True
    assert problem(tmp_path) == "its filesystem is read-only"


def test_read_only_wins_over_full(statvfs: Statvfs, tmp_path: Path) -> None:
    statvfs.readonly, statvfs.free = True, 0
    assert problem(tmp_path) == "its filesystem is read-only"


def test_a_full_filesystem_says_how_much_is_free(statvfs: Statvfs, tmp_path: Path) -> None:
    statvfs.free = 5 * MIB
    assert problem(tmp_path) == "its filesystem is full (5 MiB free)"


def test_full_is_below_the_minimum_only(statvfs: Statvfs, tmp_path: Path) -> None:
    statvfs.free = MIN_FREE_BYTES
    assert problem(tmp_path) is None
    statvfs.free = MIN_FREE_BYTES - BLOCK
    assert problem(tmp_path) == "its filesystem is full (32 MiB free)"
    assert problem(tmp_path, min_free_bytes=MIN_FREE_BYTES - BLOCK) is None
    assert problem(tmp_path, min_free_bytes=0) is None


def test_an_unreachable_state_dir(statvfs: Statvfs, tmp_path: Path) -> None:
    statvfs.error = OSError(5, "Input/output error")
    assert problem(tmp_path) == "cannot look at it: [Errno 5] Input/output error"


def test_a_missing_state_dir_is_a_problem_on_the_real_statvfs(tmp_path: Path) -> None:
    found = problem(tmp_path / "missing")
    assert found is not None and found.startswith("cannot look at it: ")


def test_problem_writes_nothing(statvfs: Statvfs, tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    for setup in ({"readonly": True}, {"free": 0}, {"error": OSError(2, "gone")}, {}):
        statvfs.healthy()
        for key, value in setup.items():
            setattr(statvfs, key, value)
        problem(folder)
    assert list(folder.iterdir()) == []


# --- Watch ---------------------------------------------------------------------------------------


def current(watch: Watch) -> str | None:
    return watch.problem


def lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_one_error_when_trouble_starts_and_one_warning_when_it_ends(
    statvfs: Statvfs, store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(1000)
    watch = Watch(store, MIN_FREE_BYTES, clock)
    state_dir = tmp_path / "state"
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert watch.check(state_dir) is None
        assert caplog.records == []

        statvfs.free = 0
        for _ in range(3):
            assert watch.check(state_dir) == "its filesystem is full (0 MiB free)"
        statvfs.free, statvfs.readonly = 1 << 40, True  # another problem: still the same trouble
        assert watch.check(state_dir) == "its filesystem is read-only"
        assert watch.problem == "its filesystem is read-only"
        assert lines(caplog, logging.ERROR) == [
            f"state directory {state_dir}: its filesystem is full (0 MiB free); "
            "no LM starts until it can take more"
        ]
        assert lines(caplog, logging.WARNING) == []

        statvfs.healthy()
        clock.now = 1234.5
        for _ in range(3):
            assert watch.check(state_dir) is None
        assert current(watch) is None
    assert lines(caplog, logging.WARNING) == [
        f"state directory {state_dir}: writable again; starting LMs"
    ]
    assert len(lines(caplog, logging.ERROR)) == 1
    assert store.meta("writable_at") == "1234.5"  # the probe write that proved it


def test_no_probe_write_while_all_is_well(
    statvfs: Statvfs, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[tuple[str, str | None]] = []
    monkeypatch.setattr(store, "set_meta", lambda key, value: written.append((key, value)))
    watch = Watch(store, MIN_FREE_BYTES, Clock())
    for _ in range(3):
        assert watch.check(tmp_path) is None
    assert written == []
    statvfs.readonly = True
    watch.check(tmp_path)
    assert written == []  # nor while the filesystem says no


def test_a_failed_store_write_blocks_until_the_probe_write_works(
    statvfs: Statvfs,
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock(2000)
    watch = Watch(store, MIN_FREE_BYTES, clock)
    real_set_meta = store.set_meta
    probes: list[str] = []

    def unwritable(key: str, value: str | None) -> None:
        probes.append(key)
        raise StoreUnwritable("state.db: cannot write the state database (disk full)")

    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        # A store write failed although statvfs saw nothing wrong (the caller tells the Watch).
        watch.set(tmp_path, "state.db: cannot write the state database (disk full)")
        monkeypatch.setattr(store, "set_meta", unwritable)
        for _ in range(2):
            assert watch.check(tmp_path) == (
                "state.db: cannot write the state database (disk full)"
            )
        assert probes == ["writable_at", "writable_at"]
        assert len(lines(caplog, logging.ERROR)) == 1
        assert lines(caplog, logging.WARNING) == []

        monkeypatch.setattr(store, "set_meta", real_set_meta)
        clock.now = 2100.0
        assert watch.check(tmp_path) is None
    assert watch.problem is None
    assert store.meta("writable_at") == "2100.0"
    assert len(lines(caplog, logging.WARNING)) == 1
    assert len(lines(caplog, logging.ERROR)) == 1


def test_no_probe_write_while_statvfs_still_reports_trouble(
    statvfs: Statvfs, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[str] = []
    monkeypatch.setattr(store, "set_meta", lambda key, value: written.append(key))
    watch = Watch(store, MIN_FREE_BYTES, Clock())
    watch.set(tmp_path, "a store write failed")
    statvfs.free = 0
    assert watch.check(tmp_path) == "its filesystem is full (0 MiB free)"
    assert written == []


def test_set_logs_only_transitions(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    watch = Watch(store, MIN_FREE_BYTES, Clock())
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        watch.set(tmp_path, None)
        watch.set(tmp_path, "one")
        watch.set(tmp_path, "two")
        watch.set(tmp_path, None)
        watch.set(tmp_path, None)
        watch.set(tmp_path, "three")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, f"state directory {tmp_path}: one; no LM starts until it can take more"),
        (logging.WARNING, f"state directory {tmp_path}: writable again; starting LMs"),
        (logging.ERROR, f"state directory {tmp_path}: three; no LM starts until it can take more"),
    ]
    assert watch.problem == "three"
