"""Schema 2 of the state store: the accounting table, its migration, and the cgroup leftovers."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from lmrunner import state as state_mod
from lmrunner.accounting import AccountingRecord, Flag
from lmrunner.lifecycle import LmState, Outcome, OutcomeSource
from lmrunner.model import Limits
from lmrunner.state import DB_NAME, SCHEMA_VERSION, LmRecord, Store, StoreError

GIB = 1024**3
T0 = 1_700_000_000.0
LIMITS = Limits(processors=1, memory_bytes=2 * GIB, swap_bytes=0, disk_bytes=40 * GIB, hs06=10.0)
CGROUP = '{"version": 2, "name": "lm-x", "paths": {"unified": "/sys/fs/cgroup/lmrunner/lm-x"}}'


def lm(slot: int, uuid: str, **extra: object) -> LmRecord:
    return LmRecord(
        uuid=uuid,
        name=f"lm-{slot:02d}",
        machinetype="alpha",
        backend="fake",
        slot=slot,
        processors=1,
        limits=LIMITS,
        hs06=10.0,
        shutdown_time=int(T0) + 86_400,
        directory=Path("/var/lib/lmrunner/machines") / uuid,
        created=T0,
        **extra,  # type: ignore[arg-type]
    )


def accounting(uuid: str, finished: float, **changes: object) -> AccountingRecord:
    made = AccountingRecord(
        uuid=uuid,
        name="lm-00",
        machinetype="alpha",
        backend="fake",
        fqan="/lhcb/Role=pilot",
        vo="lhcb",
        processors=2,
        hs06=10.5,
        created=finished - 200,
        started=finished - 100,
        finished=finished,
        wall_seconds=100.0,
        cpu_seconds=150.25,
        memory_peak_bytes=3 * GIB,
        oom_kills=0,
        outcome_code=200,
        outcome_text="Intended work completed ok",
        outcome_source="payload",
        flags=frozenset(),
        memory_limit_bytes=4 * GIB,
    )
    return replace(made, **changes)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "state")
    yield opened
    opened.close()


def finish(store: Store, uuid: str, *, at: float, failed: bool = False, **changes: object) -> None:
    if failed:
        outcome = Outcome(500, "Start failed: x", OutcomeSource.START_FAILED)
        store.transition(uuid, LmState.FAILED, finished=at, outcome=outcome, **changes)
        return
    store.transition(uuid, LmState.STARTING)
    store.transition(uuid, LmState.RUNNING, started=at - 100)
    outcome = Outcome(200, "done", OutcomeSource.PAYLOAD)
    store.transition(uuid, LmState.FINISHED, finished=at, outcome=outcome, **changes)


# --- migration from schema 1 ------------------------------------------------------------------


def make_v1(state_dir: Path, records: list[LmRecord], factory_id: str | None) -> None:
    """A database as lmrunner with schema 1 left it."""
    state_dir.mkdir(parents=True)
    db = sqlite3.connect(state_dir / DB_NAME, isolation_level=None)
    try:
        db.execute("BEGIN")
        state_mod._create_v1(db)
        db.execute("PRAGMA user_version=1")
        if factory_id is not None:
            db.execute("INSERT INTO meta (key, value) VALUES ('factory_id', ?)", (factory_id,))
        for record in records:
            row = state_mod._to_row(record)
            del row["disk"], row["disk_peak_bytes"]  # schema 3's
            row["updated"] = time.time()
            marks = ", ".join("?" for _ in row)
            db.execute(f"INSERT INTO lms ({', '.join(row)}) VALUES ({marks})", tuple(row.values()))
        db.execute("COMMIT")
    finally:
        db.close()


def test_schema_is_version_4() -> None:
    assert SCHEMA_VERSION == 4


def test_a_schema_1_database_is_migrated_and_keeps_its_lms(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    running = lm(0, "uuid-running", state=LmState.RUNNING, started=T0 + 1, cgroup=CGROUP)
    done = lm(
        1,
        "uuid-done",
        state=LmState.FINISHED,
        started=T0 + 1,
        finished=T0 + 50,
        outcome=Outcome(200, "done", OutcomeSource.PAYLOAD),
        cpu_seconds=12.0,
        memory_peak_bytes=GIB,
    )
    make_v1(state_dir, [running, done], factory_id="factory-1")
    store = Store(state_dir)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.factory_id == "factory-1"  # kept, not made anew
        assert store.get(running.uuid) == running
        assert store.get(done.uuid) == done
        assert [r.uuid for r in store.active()] == [running.uuid]
        assert store.accounting() == []  # the table exists, empty: old LMs get no rows
        assert store.apel_pending() == []
        store.add_accounting(accounting(done.uuid, T0 + 50))
        assert [r.uuid for r in store.accounting()] == [done.uuid]
    finally:
        store.close()
    # Opened again: nothing to migrate, nothing lost.
    again = Store(state_dir)
    try:
        assert again.schema_version() == SCHEMA_VERSION
        assert [r.uuid for r in again.accounting()] == [done.uuid]
        assert again.get(done.uuid) == done
    finally:
        again.close()


def test_a_schema_1_database_without_factory_id_gets_one(tmp_path: Path) -> None:
    make_v1(tmp_path / "state", [], factory_id=None)
    store = Store(tmp_path / "state")
    try:
        assert store.factory_id
        assert store.schema_version() == SCHEMA_VERSION
    finally:
        store.close()


def test_a_schema_1_database_is_refused_read_only(tmp_path: Path) -> None:
    """``ps`` never migrates: it says the schema is not the one it reads."""
    make_v1(tmp_path / "state", [], factory_id="f")
    with pytest.raises(StoreError, match=f"schema 1, expected {SCHEMA_VERSION}"):
        Store(tmp_path / "state", readonly=True)


# --- accounting rows --------------------------------------------------------------------------


def test_add_accounting_round_trips_every_field(store: Store) -> None:
    record = accounting("u1", T0, flags=frozenset({Flag.SHORT, Flag.OOM}), oom_kills=2)
    assert store.add_accounting(record) is True
    assert store.accounting() == [record]


def test_add_accounting_keeps_unknown_values_unknown(store: Store) -> None:
    record = accounting(
        "u1",
        T0,
        fqan=None,
        vo=None,
        hs06=None,
        started=None,
        wall_seconds=0.0,
        cpu_seconds=None,
        memory_peak_bytes=None,
        memory_limit_bytes=None,
        flags=frozenset({Flag.FAILED, Flag.UNMEASURED}),
    )
    store.add_accounting(record)
    [back] = store.accounting()
    assert back == record
    assert back.hs06_hours == 0.0


def test_add_accounting_is_idempotent(store: Store) -> None:
    first = accounting("u1", T0)
    assert store.add_accounting(first) is True
    assert (
        store.add_accounting(replace(first, cpu_seconds=1.0, flags=frozenset({Flag.OOM}))) is False
    )
    assert store.accounting() == [first]  # the first record stands


def test_accounting_between_since_and_until(store: Store) -> None:
    for uuid, finished in [("c", T0 + 20), ("a", T0), ("b", T0 + 10), ("d", T0 + 30)]:
        store.add_accounting(accounting(uuid, finished))
    assert [r.uuid for r in store.accounting()] == ["a", "b", "c", "d"]  # oldest first
    assert [r.uuid for r in store.accounting(since=T0 + 10)] == ["b", "c", "d"]
    assert [r.uuid for r in store.accounting(until=T0 + 20)] == ["a", "b"]  # until excluded
    assert [r.uuid for r in store.accounting(T0 + 10, T0 + 30)] == ["b", "c"]
    assert store.accounting(T0 + 31) == []
    assert store.accounting(T0 + 10, T0 + 10) == []
    assert store.accounting(until=0.0) == []  # a zero bound is a bound, not "none"
    assert len(store.accounting(since=0.0)) == 4


def test_apel_pending_until_written(store: Store) -> None:
    for uuid, finished in [("b", T0 + 10), ("a", T0)]:
        store.add_accounting(accounting(uuid, finished))
    assert [r.uuid for r in store.apel_pending()] == ["a", "b"]
    store.set_apel_written("a")
    assert [r.uuid for r in store.apel_pending()] == ["b"]
    store.set_apel_written("a")  # again: no change, no error
    store.set_apel_written("unknown")
    assert [r.uuid for r in store.apel_pending()] == ["b"]
    store.set_apel_written("b")
    assert store.apel_pending() == []
    assert [r.uuid for r in store.accounting()] == ["a", "b"]  # written rows are kept


def test_an_accounting_row_added_again_stays_written(store: Store) -> None:
    store.add_accounting(accounting("a", T0))
    store.set_apel_written("a")
    assert store.add_accounting(accounting("a", T0)) is False
    assert store.apel_pending() == []  # never sent twice


# --- cgroups left behind ----------------------------------------------------------------------


def test_leftover_cgroups_are_ended_lms_that_still_have_one(store: Store) -> None:
    store.insert_many(
        [
            lm(0, "running", cgroup=CGROUP),
            lm(1, "finished-with"),
            lm(2, "finished-without"),
            lm(3, "failed-with", cgroup=CGROUP),
        ]
    )
    store.transition("running", LmState.STARTING)
    finish(store, "finished-with", at=T0 + 10, cgroup=CGROUP)
    finish(store, "finished-without", at=T0 + 20)
    finish(store, "failed-with", at=T0 + 30, failed=True)
    assert sorted(r.uuid for r in store.leftover_cgroups()) == ["failed-with", "finished-with"]
    store.update("finished-with", cgroup=None)
    assert [r.uuid for r in store.leftover_cgroups()] == ["failed-with"]
    [left] = store.leftover_cgroups()
    assert left.cgroup == CGROUP and left.state is LmState.FAILED
