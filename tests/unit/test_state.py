"""The SQLite state store: schema and migrations, records, checked transitions, slots, requests."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest

from lmrunner import state as state_mod
from lmrunner.backends.base import Handle
from lmrunner.lifecycle import (
    ACTIVE,
    IllegalTransition,
    LmState,
    Outcome,
    OutcomeSource,
    heartbeat_outcome,
)
from lmrunner.model import Limits
from lmrunner.state import (
    DB_NAME,
    MIGRATIONS,
    SCHEMA_VERSION,
    LmRecord,
    Store,
    StoreError,
    StoreUnwritable,
)

S = LmState
GIB = 1024**3
LIMITS = Limits(processors=1, memory_bytes=2 * GIB, swap_bytes=0, disk_bytes=40 * GIB, hs06=10.0)
T0 = 1_700_000_000.0


def record(
    slot: int = 0,
    *,
    uuid: str | None = None,
    name: str | None = None,
    machinetype: str = "alpha",
    created: float = T0,
    state: LmState = S.CREATING,
    **extra: Any,
) -> LmRecord:
    uid = uuid or f"uuid-{slot}-{machinetype}-{created}"
    return LmRecord(
        uuid=uid,
        name=name or f"lm-{slot:02d}",
        machinetype=machinetype,
        backend="fake",
        slot=slot,
        processors=1,
        limits=LIMITS,
        hs06=10.0,
        shutdown_time=int(created) + 86_400,
        directory=Path("/var/lib/lmrunner/machines") / uid,
        created=created,
        state=state,
        **extra,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    yield s
    s.close()


def finish(store: Store, uuid: str, *, at: float, code: int = 200) -> LmRecord:
    """Take an LM from CREATING to FINISHED through the legal path."""
    store.transition(uuid, S.STARTING)
    store.transition(uuid, S.RUNNING, started=at - 100)
    outcome = Outcome(code, "done", OutcomeSource.PAYLOAD)
    return store.transition(uuid, S.FINISHED, finished=at, outcome=outcome)


def fail(store: Store, uuid: str, *, at: float) -> LmRecord:
    outcome = Outcome(500, "Start failed: x", OutcomeSource.START_FAILED)
    return store.transition(uuid, S.FAILED, finished=at, outcome=outcome)


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path / DB_NAME, isolation_level=None)


# --- opening, schema, WAL ---------------------------------------------------------------------


def test_new_store_has_current_schema_wal_and_a_factory_id(tmp_path: Path) -> None:
    directory = tmp_path / "deep" / "state"
    store = Store(directory)
    try:
        assert (directory / DB_NAME).is_file()
        assert store.path == directory / DB_NAME
        assert store.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        factory_id = store.factory_id
        assert len(factory_id) == 36
        assert store.recent() == []
        assert store.active() == []
        assert store.take_requests() == []
    finally:
        store.close()
    again = Store(directory)
    try:
        assert again.factory_id == factory_id
        assert again.schema_version() == SCHEMA_VERSION
    finally:
        again.close()
    db = raw(directory)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_two_stores_have_different_factory_ids(tmp_path: Path) -> None:
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    assert a.factory_id != b.factory_id
    a.close()
    b.close()


def test_meta(store: Store) -> None:
    assert store.meta("nothing") is None
    with store.write():
        store.set_meta("k", "v1")
        store.set_meta("k", "v2")
    assert store.meta("k") == "v2"
    with store.write():
        store.set_meta("k", None)
    assert store.meta("k") is None


def test_write_rolls_back_on_error(store: Store) -> None:
    with pytest.raises(RuntimeError), store.write():
        store.set_meta("k", "v")
        raise RuntimeError("boom")
    assert store.meta("k") is None
    store.insert(record(0))  # the connection is usable again
    assert len(store.recent()) == 1


def newer_database(directory: Path, journal_mode: str) -> Path:
    directory.mkdir()
    db = raw(directory)
    db.execute(f"PRAGMA journal_mode={journal_mode}")
    db.execute("CREATE TABLE future (x TEXT)")
    db.execute("INSERT INTO future VALUES ('from a newer lmrunner')")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    return directory / DB_NAME


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path, journal_mode: str) -> None:
    path = newer_database(tmp_path / "state", journal_mode)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="newer than this lmrunner"):
        Store(tmp_path / "state")
    assert path.read_bytes() == before
    # The refused connection was closed: it left no WAL or shared-memory file behind.
    assert sorted(p.name for p in path.parent.iterdir()) == [DB_NAME]
    db = raw(tmp_path / "state")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == journal_mode
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"future"}
    db.close()


def test_newer_schema_is_refused_read_only_too(tmp_path: Path) -> None:
    newer_database(tmp_path / "state", "wal")
    with pytest.raises(StoreError, match="schema"):
        Store(tmp_path / "state", readonly=True)


def test_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    garbage = tmp_path / "state" / DB_NAME
    garbage.write_bytes(b"this is not an SQLite database, not at all" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        Store(tmp_path / "state")
    with pytest.raises(StoreError, match="cannot open"):
        Store(tmp_path / "state", readonly=True)


# --- read-only stores -------------------------------------------------------------------------


def test_read_only_store_refuses_a_missing_database(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open"):
        Store(tmp_path / "nowhere", readonly=True)
    assert not (tmp_path / "nowhere").exists()  # and created nothing


def test_read_only_store_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    db = raw(tmp_path / "state")
    db.execute("CREATE TABLE x (y)")
    db.close()
    with pytest.raises(StoreError, match=f"schema 0, expected {SCHEMA_VERSION}"):
        Store(tmp_path / "state", readonly=True)


def test_read_only_store_sees_a_live_writer(tmp_path: Path) -> None:
    writer = Store(tmp_path)
    writer.insert(record(0, uuid="a"))
    reader = Store(tmp_path, readonly=True)
    try:
        assert reader.factory_id == writer.factory_id
        assert [r.uuid for r in reader.active()] == ["a"]
        # The writer keeps its connection open; its later commits live in the WAL.
        writer.transition("a", S.STARTING)
        writer.insert(record(1, uuid="b"))
        writer.add_request("a", "stop", 30.0)
        assert (tmp_path / f"{DB_NAME}-wal").exists()
        got = reader.get("a")
        assert got is not None
        assert got.state is S.STARTING
        assert [r.uuid for r in reader.active()] == ["a", "b"]
        with pytest.raises(StoreUnwritable, match="readonly"):
            reader.add_request("b", "kill")
        with pytest.raises(StoreUnwritable, match="readonly"):
            reader.take_requests()
        assert writer.take_requests() == [("a", "stop", 30.0)]  # the reader took nothing
    finally:
        reader.close()
        writer.close()


# --- records ----------------------------------------------------------------------------------


def test_insert_and_get(store: Store) -> None:
    rec = record(3, uuid="u1")
    assert store.insert(rec) == rec
    assert store.get("u1") == rec
    assert store.get("missing") is None


def test_every_field_round_trips(store: Store) -> None:
    full = LmRecord(
        uuid="full",
        name="host-lm03",
        machinetype="beta",
        backend="docker",
        slot=3,
        processors=8,
        limits=Limits(
            processors=8, memory_bytes=16 * GIB, swap_bytes=GIB, disk_bytes=100 * GIB, hs06=None
        ),
        hs06=8.0,
        shutdown_time=1_700_086_400,
        directory=Path("/var/lib/lmrunner/machines/full"),
        created=T0 + 0.125,
        state=S.STOPPING,
        started=T0 + 1.5,
        finished=None,
        handle=Handle(2, {"container": "abc123", "nested": {"list": [1, 2, 3]}, "none": None}),
        cgroup="/sys/fs/cgroup/lmrunner/full",
        outcome=None,
        stop_reason=heartbeat_outcome(created=False),
        stop_deadline=T0 + 600.25,
        cpu_seconds=1234.5,
        memory_peak_bytes=3 * GIB,
        cleaned=True,
    )
    store.insert(full)
    got = store.get("full")
    assert got == full
    assert got is not None
    assert isinstance(got.directory, Path)
    assert isinstance(got.limits, Limits)
    assert got.limits.hs06 is None
    assert isinstance(got.handle, Handle)
    assert got.handle.data["nested"] == {"list": [1, 2, 3]}
    assert got.stop_reason is not None
    assert got.stop_reason.source is OutcomeSource.HEARTBEAT
    assert got.cleaned is True
    assert got.state is S.STOPPING

    done = store.transition(
        "full", S.FINISHED, finished=T0 + 700.0, outcome=Outcome(300, "x", OutcomeSource.PAYLOAD)
    )
    assert store.get("full") == done
    # Every field of the dataclass is a column.
    columns = {row[1] for row in store.db.execute("PRAGMA table_info(lms)")}
    assert {f.name for f in fields(LmRecord)} <= columns


def test_defaults_round_trip(store: Store) -> None:
    rec = record(0, uuid="bare")
    store.insert(rec)
    got = store.get("bare")
    assert got == rec
    assert got is not None
    for name in (
        "started",
        "finished",
        "handle",
        "cgroup",
        "outcome",
        "stop_reason",
        "stop_deadline",
        "cpu_seconds",
        "memory_peak_bytes",
    ):
        assert getattr(got, name) is None, name
    assert got.cleaned is False
    assert got.state is S.CREATING
    assert got.active


def test_duplicate_uuid_is_refused(store: Store) -> None:
    store.insert(record(0, uuid="same"))
    finish(store, "same", at=T0 + 10)
    with pytest.raises(StoreError):
        store.insert(record(1, uuid="same"))
    got = store.get("same")
    assert got is not None
    assert got.slot == 0


def test_by_name_is_the_newest_with_that_name(store: Store) -> None:
    store.insert(record(0, uuid="old", name="lm-00", created=T0))
    finish(store, "old", at=T0 + 50)
    store.insert(record(0, uuid="new", name="lm-00", created=T0 + 100))
    store.insert(record(1, uuid="other", name="lm-01", created=T0 + 200))
    got = store.by_name("lm-00")
    assert got is not None
    assert got.uuid == "new"
    other = store.by_name("lm-01")
    assert other is not None
    assert other.uuid == "other"
    assert store.by_name("lm-99") is None


def test_active_is_active_states_by_slot(store: Store) -> None:
    store.insert(record(5, uuid="creating"))
    store.insert(record(2, uuid="starting"))
    store.transition("starting", S.STARTING)
    store.insert(record(7, uuid="running"))
    store.transition("running", S.STARTING)
    store.transition("running", S.RUNNING)
    store.insert(record(1, uuid="stopping"))
    store.transition("stopping", S.STARTING)
    store.transition("stopping", S.STOPPING)
    store.insert(record(3, uuid="finished"))
    finish(store, "finished", at=T0 + 10)
    store.insert(record(4, uuid="failed"))
    fail(store, "failed", at=T0 + 10)

    active = store.active()
    assert [r.uuid for r in active] == ["stopping", "starting", "creating", "running"]
    assert {r.state for r in active} == ACTIVE
    assert all(r.active for r in active)
    assert not any(r.active for r in store.recent() if r.uuid in ("finished", "failed"))


def test_recent_is_newest_first_with_a_limit(store: Store) -> None:
    for i in range(5):
        store.insert(record(i, uuid=f"u{i}", created=T0 + i))
    assert [r.uuid for r in store.recent()] == ["u4", "u3", "u2", "u1", "u0"]
    assert [r.uuid for r in store.recent(2)] == ["u4", "u3"]
    assert [r.uuid for r in store.recent(100)] == ["u4", "u3", "u2", "u1", "u0"]
    assert store.recent(0) == []


def test_finished_since(store: Store) -> None:
    store.insert(record(0, uuid="late", created=T0))
    store.insert(record(1, uuid="early", created=T0 + 1))
    store.insert(record(2, uuid="failed", created=T0 + 2))
    store.insert(record(3, uuid="running", created=T0 + 3))
    finish(store, "late", at=T0 + 300)
    finish(store, "early", at=T0 + 100)
    fail(store, "failed", at=T0 + 200)
    store.transition("running", S.STARTING)
    assert [r.uuid for r in store.finished_since(0)] == ["early", "failed", "late"]
    assert [r.uuid for r in store.finished_since(T0 + 200)] == ["failed", "late"]  # inclusive
    assert [r.uuid for r in store.finished_since(T0 + 200.001)] == ["late"]
    assert store.finished_since(T0 + 301) == []


def test_last_finished_is_the_most_recently_created_ended_lm(store: Store) -> None:
    # alpha: created first but finished last; the newer-created one ended first with an abort.
    store.insert(record(0, uuid="a-old", machinetype="alpha", created=T0))
    store.insert(record(1, uuid="a-new", machinetype="alpha", created=T0 + 10))
    store.insert(record(2, uuid="a-live", machinetype="alpha", created=T0 + 20))
    finish(store, "a-new", at=T0 + 100, code=300)
    finish(store, "a-old", at=T0 + 500, code=200)
    store.transition("a-live", S.STARTING)  # newest created, but not ended: ignored
    # beta: the newest-created ended LM failed to start.
    store.insert(record(3, uuid="b-fin", machinetype="beta", created=T0))
    finish(store, "b-fin", at=T0 + 50)
    store.insert(record(4, uuid="b-failed", machinetype="beta", created=T0 + 5))
    fail(store, "b-failed", at=T0 + 6)
    # gamma: only active LMs.
    store.insert(record(5, uuid="g-live", machinetype="gamma", created=T0))

    last = store.last_finished(["alpha", "beta", "gamma", "unknown"])
    assert set(last) == {"alpha", "beta"}
    assert last["alpha"].uuid == "a-new"
    assert last["alpha"].outcome is not None
    assert last["alpha"].outcome.abort
    assert last["beta"].uuid == "b-failed"
    assert store.last_finished([]) == {}
    assert set(store.last_finished(iter(["beta"]))) == {"beta"}


# --- transitions and updates ------------------------------------------------------------------


def test_transition_applies_state_and_changes(store: Store) -> None:
    store.insert(record(0, uuid="u"))
    handle = Handle(1, {"id": "c1"})
    starting = store.transition("u", S.STARTING, handle=handle, cgroup="/cg/u")
    assert starting.state is S.STARTING
    assert starting.handle == handle
    running = store.transition("u", S.RUNNING, started=T0 + 5)
    assert running.handle == handle  # earlier changes kept
    assert running.started == T0 + 5
    reason = heartbeat_outcome(created=True)
    stopping = store.transition("u", S.STOPPING, stop_reason=reason, stop_deadline=T0 + 900)
    outcome = Outcome(700, "Heartbeat file not updated", OutcomeSource.HEARTBEAT)
    finished = store.transition("u", S.FINISHED, finished=T0 + 950, outcome=outcome)
    assert store.get("u") == finished
    assert finished == replace(stopping, state=S.FINISHED, finished=T0 + 950, outcome=outcome)
    assert not finished.active


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ([], S.RUNNING),
        ([], S.FINISHED),
        ([], S.CREATING),
        ([S.STARTING, S.RUNNING], S.STARTING),
        ([S.STARTING, S.RUNNING], S.FAILED),
        ([S.STARTING, S.STOPPING], S.RUNNING),
        ([S.STARTING, S.FINISHED], S.RUNNING),
        ([S.FAILED], S.STARTING),
    ],
)
def test_illegal_transition_raises_and_leaves_the_row(
    store: Store, path: list[LmState], illegal: LmState
) -> None:
    store.insert(record(0, uuid="u"))
    for step in path:
        store.transition("u", step)
    before = store.get("u")
    updated_before = store.db.execute("SELECT updated FROM lms WHERE uuid='u'").fetchone()[0]
    with pytest.raises(IllegalTransition):
        store.transition("u", illegal, cgroup="/changed", cpu_seconds=1.0)
    assert store.get("u") == before
    updated_after = store.db.execute("SELECT updated FROM lms WHERE uuid='u'").fetchone()[0]
    assert updated_after == updated_before
    assert not store.db.in_transaction


def test_transition_of_an_unknown_lm(store: Store) -> None:
    with pytest.raises(StoreError, match="no LM with uuid nope"):
        store.transition("nope", S.STARTING)
    assert not store.db.in_transaction


def test_transition_with_an_unknown_field_changes_nothing(store: Store) -> None:
    store.insert(record(0, uuid="u"))
    with pytest.raises(TypeError):
        store.transition("u", S.STARTING, no_such_field=1)
    got = store.get("u")
    assert got is not None
    assert got.state is S.CREATING


def test_update_changes_fields_not_state(store: Store) -> None:
    store.insert(record(0, uuid="u"))
    store.transition("u", S.STARTING)
    updated = store.update("u", cpu_seconds=12.5, memory_peak_bytes=GIB, cleaned=True)
    assert updated.state is S.STARTING
    assert store.get("u") == updated
    assert updated.cpu_seconds == 12.5
    assert updated.cleaned is True
    assert store.update("u", cpu_seconds=None).cpu_seconds is None


def test_update_refuses_state(store: Store) -> None:
    store.insert(record(0, uuid="u"))
    before = store.get("u")
    with pytest.raises(ValueError, match="transition"):
        store.update("u", state=S.FAILED, cgroup="/x")
    with pytest.raises(ValueError, match="transition"):
        store.update("u", state=S.STARTING)
    assert store.get("u") == before


def test_update_of_an_unknown_lm(store: Store) -> None:
    with pytest.raises(StoreError, match="no LM"):
        store.update("nope", cgroup="/x")


# --- slots ------------------------------------------------------------------------------------


@pytest.mark.parametrize("holder_state", sorted(ACTIVE))
def test_one_active_lm_per_slot(store: Store, holder_state: LmState) -> None:
    path = {
        S.CREATING: [],
        S.STARTING: [S.STARTING],
        S.RUNNING: [S.STARTING, S.RUNNING],
        S.STOPPING: [S.STARTING, S.STOPPING],
    }[holder_state]
    store.insert(record(4, uuid="holder"))
    for step in path:
        store.transition("holder", step)
    with pytest.raises(StoreError, match="slot 4"):
        store.insert(record(4, uuid="intruder", created=T0 + 1))
    assert store.get("intruder") is None
    assert [r.uuid for r in store.active()] == ["holder"]
    assert not store.db.in_transaction


@pytest.mark.parametrize("end", ["finished", "failed"])
def test_slot_of_an_ended_lm_can_be_reused(store: Store, end: str) -> None:
    store.insert(record(4, uuid="first", name="lm-04"))
    if end == "finished":
        finish(store, "first", at=T0 + 10)
    else:
        fail(store, "first", at=T0 + 10)
    store.insert(record(4, uuid="second", name="lm-04", created=T0 + 20))
    finish(store, "second", at=T0 + 30)
    store.insert(record(4, uuid="third", name="lm-04", created=T0 + 40))
    assert [r.uuid for r in store.active()] == ["third"]
    assert len(store.recent()) == 3
    by_name = store.by_name("lm-04")
    assert by_name is not None
    assert by_name.uuid == "third"


def test_an_inactive_record_can_be_inserted_into_a_held_slot(store: Store) -> None:
    store.insert(record(0, uuid="holder"))
    store.insert(record(0, uuid="history", state=S.FINISHED, created=T0 - 100))
    assert [r.uuid for r in store.active()] == ["holder"]


def test_requests_are_taken_once_in_order(store: Store) -> None:
    store.add_request("u1", "stop", 30.0)
    store.add_request("u2", "kill")
    store.add_request("u1", "kill", None)
    assert store.take_requests() == [
        ("u1", "stop", 30.0),
        ("u2", "kill", None),
        ("u1", "kill", None),
    ]
    assert store.take_requests() == []
    store.add_request("u3", "stop", 0.5)
    assert store.take_requests() == [("u3", "stop", 0.5)]


def test_requests_cross_stores(tmp_path: Path) -> None:
    cli, daemon = Store(tmp_path), Store(tmp_path)
    try:
        cli.add_request("u", "stop", 10.0)
        assert daemon.take_requests() == [("u", "stop", 10.0)]
        assert cli.take_requests() == []
    finally:
        cli.close()
        daemon.close()


# --- two writers ------------------------------------------------------------------------------


def test_two_writers_interleaving_lose_nothing(tmp_path: Path) -> None:
    a, b = Store(tmp_path), Store(tmp_path)
    try:
        a.insert(record(0, uuid="u"))
        a.transition("u", S.STARTING, handle=Handle(1, {"id": "x"}))
        b.update("u", cgroup="/cg/u")
        a.transition("u", S.RUNNING, started=T0)
        b.update("u", cpu_seconds=5.0)
        a.update("u", memory_peak_bytes=GIB)
        b.transition("u", S.STOPPING, stop_deadline=T0 + 60)
        with pytest.raises(IllegalTransition):
            a.transition("u", S.RUNNING)  # a sees b's STOPPING, not its own stale RUNNING
        a.transition("u", S.FINISHED, finished=T0 + 61)
        for store in (a, b):
            got = store.get("u")
            assert got is not None
            assert got.state is S.FINISHED
            assert got.handle == Handle(1, {"id": "x"})
            assert got.cgroup == "/cg/u"
            assert got.started == T0
            assert got.cpu_seconds == 5.0
            assert got.memory_peak_bytes == GIB
            assert got.stop_deadline == T0 + 60
            assert got.finished == T0 + 61
    finally:
        a.close()
        b.close()


def test_two_writer_threads_lose_nothing(tmp_path: Path) -> None:
    count = 40
    setup = Store(tmp_path)
    for i in range(count):
        setup.insert(record(i, uuid=f"u{i}"))
    setup.close()
    errors: list[BaseException] = []

    def worker(job: Callable[[Store, str], object]) -> None:
        store = Store(tmp_path)  # one Store per thread
        try:
            for i in range(count):
                job(store, f"u{i}")
        except BaseException as err:
            errors.append(err)
        finally:
            store.close()

    def walk(store: Store, uuid: str) -> None:
        store.transition(uuid, S.STARTING)
        store.transition(uuid, S.RUNNING, started=T0)

    def annotate(store: Store, uuid: str) -> None:
        store.update(uuid, cgroup=f"/cg/{uuid}")
        store.update(uuid, cpu_seconds=1.0)

    threads = [threading.Thread(target=worker, args=(job,)) for job in (walk, annotate)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    check = Store(tmp_path)
    try:
        for i in range(count):
            got = check.get(f"u{i}")
            assert got is not None
            assert (got.state, got.started) == (S.RUNNING, T0)
            assert (got.cgroup, got.cpu_seconds) == (f"/cg/u{i}", 1.0)
    finally:
        check.close()


# --- migrations -------------------------------------------------------------------------------


def test_migration_upgrades_an_old_database_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = Store(tmp_path)
    rec = record(2, uuid="kept", stop_reason=heartbeat_outcome(created=False))
    v1.insert(rec)
    v1.add_request("kept", "stop", 5.0)
    factory_id = v1.factory_id
    v1.close()

    calls: list[int] = []

    def to_v2(db: sqlite3.Connection) -> None:
        calls.append(1)
        db.execute("ALTER TABLE lms ADD COLUMN note TEXT NOT NULL DEFAULT 'none'")

    monkeypatch.setattr(state_mod, "MIGRATIONS", [*MIGRATIONS, to_v2])
    monkeypatch.setattr(state_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)

    v2 = Store(tmp_path)
    try:
        assert calls == [1]
        assert v2.schema_version() == SCHEMA_VERSION + 1
        assert v2.factory_id == factory_id
        assert v2.get("kept") == rec
        assert v2.db.execute("SELECT note FROM lms WHERE uuid='kept'").fetchone()[0] == "none"
        assert v2.take_requests() == [("kept", "stop", 5.0)]
        v2.insert(record(3, uuid="new"))  # inserts still work with the extra column
        assert v2.get("new") is not None
    finally:
        v2.close()

    again = Store(tmp_path)
    again.close()
    assert calls == [1]  # not run twice


def test_a_new_database_runs_every_migration_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []

    def step(tag: str) -> Callable[[sqlite3.Connection], None]:
        def run(db: sqlite3.Connection) -> None:
            order.append(tag)
            db.execute(f"CREATE TABLE t_{tag} (x)")

        return run

    monkeypatch.setattr(state_mod, "MIGRATIONS", [*MIGRATIONS, step("v2"), step("v3")])
    monkeypatch.setattr(state_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 2)
    store = Store(tmp_path)
    try:
        assert order == ["v2", "v3"]
        assert store.schema_version() == SCHEMA_VERSION + 2
    finally:
        store.close()


def test_a_failing_migration_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = Store(tmp_path)
    v1.insert(record(0, uuid="kept"))
    v1.close()

    def broken(db: sqlite3.Connection) -> None:
        db.execute("ALTER TABLE lms ADD COLUMN half TEXT")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(state_mod, "MIGRATIONS", [*MIGRATIONS, broken])
    monkeypatch.setattr(state_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(RuntimeError, match="migration bug"):
        Store(tmp_path)
    monkeypatch.undo()

    db = raw(tmp_path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    columns = {row[1] for row in db.execute("PRAGMA table_info(lms)")}
    assert "half" not in columns
    db.close()
    store = Store(tmp_path)
    assert store.get("kept") is not None
    store.close()


def test_a_crash_during_the_first_migration_leaves_an_empty_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(db: sqlite3.Connection) -> None:
        raise RuntimeError("power cut")

    # v1 runs, then the next step fails: v1's tables must not be committed on their own.
    monkeypatch.setattr(state_mod, "MIGRATIONS", [*MIGRATIONS, crash])
    monkeypatch.setattr(state_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(RuntimeError, match="power cut"):
        Store(tmp_path)
    monkeypatch.undo()
    db = raw(tmp_path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    db.close()
    store = Store(tmp_path)  # and a later open starts cleanly
    assert store.schema_version() == SCHEMA_VERSION
    store.close()
