"""The state store: one SQLite database (WAL) per factory, the only source of truth about LMs.

Per-LM directories hold only what is mounted into the LM. Every change of an LM's state goes
through :meth:`Store.transition`, which checks the transition table inside a write transaction.
The schema is versioned; :data:`MIGRATIONS` brings an older database up to date when opened.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
import urllib.parse
import uuid as uuid_mod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from lmrunner.accounting import AccountingRecord, Flag
from lmrunner.errors import LmrunnerError
from lmrunner.lifecycle import ACTIVE, LmState, Outcome, check_transition
from lmrunner.model import Handle, Limits

DB_NAME = "lmrunner.db"


class StoreError(LmrunnerError):
    """The state database cannot be opened, read or written, or is from a newer lmrunner."""


class StoreUnwritable(StoreError):
    """A write failed for a reason that may pass (the filesystem is full or read-only, or the
    database is locked); nothing of that write was stored, and the caller may retry later."""


#: SQLite's primary result codes that mean "not now" rather than "broken" (sqlite3.h).
_TRANSIENT = {5: "database locked", 8: "read-only", 10: "I/O error", 13: "disk full",
              14: "cannot open a file"}  # fmt: skip


def translate(err: sqlite3.Error, path: Path) -> StoreError:
    """The project's error for an SQLite error on the database at ``path``."""
    code = getattr(err, "sqlite_errorcode", None)
    reason = _TRANSIENT.get(code & 0xFF) if isinstance(code, int) else None
    if reason is not None:
        return StoreUnwritable(f"{path}: cannot write the state database ({reason}): {err}")
    return StoreError(f"{path}: state database error: {err}")


class _Connection(sqlite3.Connection):
    """A connection whose every statement raises the project's errors, not sqlite3's."""

    path: Path = Path("?")

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        try:
            return super().execute(sql, parameters)
        except sqlite3.Error as err:
            raise translate(err, self.path) from err


@dataclass(frozen=True, slots=True)
class LmRecord:
    """One LM, as stored."""

    uuid: str
    name: str
    machinetype: str
    backend: str
    slot: int
    processors: int
    limits: Limits
    hs06: float  # for shares: processors x hs06_per_processor (x 1.0 when unset)
    shutdown_time: int
    directory: Path
    created: float
    state: LmState = LmState.CREATING
    started: float | None = None
    finished: float | None = None
    handle: Handle | None = None
    cgroup: str | None = None
    outcome: Outcome | None = None
    stop_reason: Outcome | None = None  # why lmrunner is stopping it (wins over an exit status)
    stop_deadline: float | None = None  # when a graceful stop turns into a kill
    cpu_seconds: float | None = None
    memory_peak_bytes: int | None = None
    cleaned: bool = False  # its directory was removed after machines_dir_days
    disk: str | None = None  # its own filesystem (lmrunner.diskmethods.DiskRef), until removed
    disk_peak_bytes: int | None = None  # the most that filesystem held (sampled)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def _execute_script(db: sqlite3.Connection, script: str) -> None:
    """Run ``;``-separated statements inside the caller's transaction.

    Not ``executescript``: it COMMITs the open transaction first, which would leave a migration
    half-applied (and the final COMMIT of :meth:`Store.write` failing).
    """
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _create_v1(db: sqlite3.Connection) -> None:
    _execute_script(
        db,
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE lms (
            uuid TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            machinetype TEXT NOT NULL,
            backend TEXT NOT NULL,
            slot INTEGER NOT NULL,
            processors INTEGER NOT NULL,
            limits TEXT NOT NULL,
            hs06 REAL NOT NULL,
            shutdown_time INTEGER NOT NULL,
            directory TEXT NOT NULL,
            created REAL NOT NULL,
            state TEXT NOT NULL,
            started REAL,
            finished REAL,
            handle TEXT,
            cgroup TEXT,
            outcome TEXT,
            stop_reason TEXT,
            stop_deadline REAL,
            cpu_seconds REAL,
            memory_peak_bytes INTEGER,
            cleaned INTEGER NOT NULL DEFAULT 0,
            updated REAL NOT NULL,
            rev INTEGER NOT NULL DEFAULT 0  -- bumped by every write: lets readers cache rows
        );
        -- Never two active LMs in one slot, whatever a crash left behind.
        CREATE UNIQUE INDEX lms_active_slot ON lms(slot)
            WHERE state IN ('creating', 'starting', 'running', 'stopping');
        CREATE INDEX lms_state ON lms(state);
        CREATE INDEX lms_type_created ON lms(machinetype, created);
        CREATE TABLE requests (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            uuid TEXT NOT NULL,
            action TEXT NOT NULL,
            grace REAL,
            created REAL NOT NULL
        );
        """,
    )


def _add_accounting_v2(db: sqlite3.Connection) -> None:
    """Schema 2: one accounting row per finished LM (issue 6), and the LM's APEL state."""
    _execute_script(
        db,
        """
        CREATE TABLE accounting (
            uuid TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            machinetype TEXT NOT NULL,
            backend TEXT NOT NULL,
            fqan TEXT,
            vo TEXT,
            processors INTEGER NOT NULL,
            hs06 REAL,
            created REAL NOT NULL,
            started REAL,
            finished REAL NOT NULL,
            wall_seconds REAL NOT NULL,
            cpu_seconds REAL,
            memory_peak_bytes INTEGER,
            oom_kills INTEGER NOT NULL,
            outcome_code INTEGER NOT NULL,
            outcome_text TEXT NOT NULL,
            outcome_source TEXT NOT NULL,
            flags TEXT NOT NULL,
            memory_limit_bytes INTEGER,
            apel_written INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX accounting_finished ON accounting(finished)
        """,
    )


def _add_disks_v3(db: sqlite3.Connection) -> None:
    """Schema 3: each LM's own filesystem and the most it held (issue 16)."""
    _execute_script(
        db,
        """
        ALTER TABLE lms ADD COLUMN disk TEXT;
        ALTER TABLE lms ADD COLUMN disk_peak_bytes INTEGER;
        ALTER TABLE accounting ADD COLUMN disk_peak_bytes INTEGER
        """,
    )


def _index_times_v4(db: sqlite3.Connection) -> None:
    """Schema 4: LMs by when they were created and ended (the status page's day, pruning)."""
    _execute_script(
        db,
        """
        CREATE INDEX lms_created ON lms(created);
        CREATE INDEX lms_finished ON lms(finished)
        """,
    )


#: MIGRATIONS[n] takes a database from schema version n to n + 1.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _create_v1,
    _add_accounting_v2,
    _add_disks_v3,
    _index_times_v4,
]
SCHEMA_VERSION = len(MIGRATIONS)

_JSON_FIELDS = {"limits", "handle", "outcome", "stop_reason"}
_COLUMNS = [f.name for f in fields(LmRecord)]


class Store:
    """The factory's database. One instance per thread (SQLite connections are not shared)."""

    def __init__(self, state_dir: Path, *, readonly: bool = False) -> None:
        self.path = state_dir / DB_NAME
        try:
            if readonly:
                self.db = sqlite3.connect(
                    f"file:{urllib.parse.quote(str(self.path))}?mode=ro",
                    uri=True,
                    isolation_level=None,
                    factory=_Connection,
                )
            else:
                state_dir.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(
                    self.path, isolation_level=None, timeout=30, factory=_Connection
                )
            self.db.path = self.path
        except sqlite3.Error as err:
            raise StoreError(f"{self.path}: cannot open the state database: {err}") from err
        self._cache: dict[str, tuple[int, LmRecord]] = {}
        try:
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA busy_timeout=30000")
            if readonly:
                if self.schema_version() != SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path}: schema {self.schema_version()}, expected {SCHEMA_VERSION}"
                    )
            else:
                self._refuse_newer()  # before WAL, which would rewrite the file's header
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints
                self._migrate()
        except BaseException as err:
            self.db.close()
            cause = err.__cause__ if isinstance(err, StoreError) else err
            if isinstance(cause, sqlite3.Error):
                raise StoreError(f"{self.path}: cannot open the state database: {cause}") from cause
            raise

    def close(self) -> None:
        self.db.close()

    # --- schema ---------------------------------------------------------------------------

    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _refuse_newer(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this lmrunner "
                f"({SCHEMA_VERSION}); refusing to touch it"
            )

    def _migrate(self) -> None:
        with self.write():
            self._refuse_newer()  # again: another lmrunner may have migrated it meanwhile
            version = self.schema_version()
            for step in MIGRATIONS[version:]:
                step(self.db)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            if self.meta("factory_id") is None:
                self.set_meta("factory_id", str(uuid_mod.uuid4()))

    @contextmanager
    def write(self) -> Iterator[None]:
        """One write transaction (BEGIN IMMEDIATE: no other writer can interleave).

        All of it is stored or none: a failed COMMIT (disk full) is rolled back too.
        """
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:  # SQLite may have rolled back by itself already
                with contextlib.suppress(StoreError):
                    self.db.execute("ROLLBACK")
            raise

    # --- meta -----------------------------------------------------------------------------

    def data_version(self) -> int:
        """A number that changes when another connection commits (SQLite's data_version): a
        reader's cache of what it read stays good while this stays the same."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self.db.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    @property
    def factory_id(self) -> str:
        value = self.meta("factory_id")
        assert value is not None, "migrations set factory_id"
        return value

    # --- LMs ------------------------------------------------------------------------------

    def insert(self, record: LmRecord) -> LmRecord:
        self.insert_many([record])
        return record

    def insert_many(self, records: Iterable[LmRecord]) -> None:
        """Insert LMs in one transaction (all or none)."""
        with self.write():
            for record in records:
                row = _to_row(record)
                row["updated"] = time.time()
                names = ", ".join(row)
                marks = ", ".join("?" for _ in row)
                try:
                    self.db.execute(
                        f"INSERT INTO lms ({names}) VALUES ({marks})", tuple(row.values())
                    )
                except StoreError as err:
                    if not isinstance(err.__cause__, sqlite3.IntegrityError):
                        raise
                    what = f"slot {record.slot} is already held by an active LM"
                    if "lms.uuid" in str(err.__cause__):
                        what = f"an LM with uuid {record.uuid} already exists"
                    raise StoreError(f"cannot insert {record.name}: {what}") from err

    def get(self, uuid: str) -> LmRecord | None:
        row = self.db.execute("SELECT * FROM lms WHERE uuid = ?", (uuid,)).fetchone()
        return None if row is None else _from_row(row)

    def by_name(self, name: str) -> LmRecord | None:
        """The newest LM with this name (names are reused slot by slot)."""
        row = self.db.execute(
            "SELECT * FROM lms WHERE name = ? ORDER BY created DESC LIMIT 1", (name,)
        ).fetchone()
        return None if row is None else _from_row(row)

    def active(self) -> list[LmRecord]:
        """Active LMs by slot. Decoded records are cached by revision: the daemon reads this
        after every exit, and decoding thousands of unchanged rows each time would dominate."""
        marks = ", ".join("?" for _ in ACTIVE)
        rows = self.db.execute(
            f"SELECT * FROM lms WHERE state IN ({marks}) ORDER BY slot",
            tuple(s.value for s in ACTIVE),
        )
        cache: dict[str, tuple[int, LmRecord]] = {}
        out = []
        for row in rows:
            hit = self._cache.get(row["uuid"])
            record = hit[1] if hit is not None and hit[0] == row["rev"] else _from_row(row)
            cache[record.uuid] = (row["rev"], record)
            out.append(record)
        self._cache = cache
        return out

    def recent(self, limit: int | None = None) -> list[LmRecord]:
        """Every LM, newest first (``limit`` of them)."""
        sql = "SELECT * FROM lms ORDER BY created DESC"
        limited = limit is not None
        rows = self.db.execute(sql + (" LIMIT ?" if limited else ""), (limit,) if limited else ())
        return [_from_row(row) for row in rows]

    def listing(self, *, ended: bool = False) -> list[sqlite3.Row]:
        """Light rows for ``lmrunner ps``: no JSON or path decoding it does not show.

        Active LMs by slot, then (with ``ended``) ended ones, newest first.
        """
        columns = (
            "uuid, name, machinetype, backend, slot, state, processors, created, started, "
            "finished, "
            "shutdown_time, cpu_seconds, memory_peak_bytes, outcome, cgroup, disk_peak_bytes, "
            "json_extract(disk, '$.mount') AS disk_mount, "
            "json_extract(handle, '$.engine') AS engine"  # not the whole handle: ps never needs it
        )
        marks = ", ".join("?" for _ in ACTIVE)
        states = tuple(s.value for s in ACTIVE)
        rows = self.db.execute(
            f"SELECT {columns} FROM lms WHERE state IN ({marks}) ORDER BY slot", states
        ).fetchall()
        if ended:
            rows += self.db.execute(
                f"SELECT {columns} FROM lms WHERE state NOT IN ({marks}) ORDER BY created DESC",
                states,
            ).fetchall()
        return rows

    def prune_lms(self, before: float, limit: int) -> int:
        """Remove up to ``limit`` ended LMs that finished before ``before``, whose directory is
        cleaned, whose disk and cgroup are released and whose accounting record exists, except each
        machinetype's latest (backoff reads it); returns how many. One short transaction."""
        with self.write():
            cursor = self.db.execute(
                "DELETE FROM lms WHERE uuid IN (SELECT l.uuid FROM lms l "
                "WHERE l.finished IS NOT NULL AND l.finished < ? AND l.cleaned = 1 "
                "AND l.disk IS NULL AND l.cgroup IS NULL "
                "AND EXISTS (SELECT 1 FROM accounting a WHERE a.uuid = l.uuid) "
                "AND EXISTS (SELECT 1 FROM lms n WHERE n.machinetype = l.machinetype "
                "AND n.created > l.created AND n.finished IS NOT NULL) "
                "ORDER BY l.finished LIMIT ?)",
                (before, limit),
            )
            return int(cursor.rowcount)

    def prune_accounting(self, before: float, limit: int, *, apel: bool) -> int:
        """Remove up to ``limit`` accounting records of LMs that finished before ``before``
        (with ``apel``, only those whose APEL message is written) and whose LM row is gone."""
        written = "AND a.apel_written = 1 " if apel else ""
        with self.write():
            cursor = self.db.execute(
                "DELETE FROM accounting WHERE uuid IN (SELECT a.uuid FROM accounting a "
                f"WHERE a.finished < ? {written}"
                "AND NOT EXISTS (SELECT 1 FROM lms l WHERE l.uuid = a.uuid) "
                "ORDER BY a.finished LIMIT ?)",
                (before, limit),
            )
            return int(cursor.rowcount)

    def timeline(self, since: float) -> list[sqlite3.Row]:
        """Light rows of the LMs alive at or after ``since`` (created since, ended since, or
        still active): machinetype, processors, created, started, finished, the outcome's
        code. For the status page's plots (indexed: a day of a busy host, not its history)."""
        columns = (
            "machinetype, processors, created, started, finished, "
            "json_extract(outcome, '$.code') AS code"
        )
        marks = ", ".join("?" for _ in ACTIVE)
        states = tuple(s.value for s in ACTIVE)
        return self.db.execute(
            f"SELECT {columns} FROM lms WHERE created >= ? UNION ALL "
            f"SELECT {columns} FROM lms WHERE created < ? AND finished >= ? UNION ALL "
            f"SELECT {columns} FROM lms WHERE created < ? AND finished IS NULL "
            f"AND state IN ({marks})",
            (since, since, since, since, *states),
        ).fetchall()

    def last_ended(self, limit: int) -> list[sqlite3.Row]:
        """Light rows of the ``limit`` LMs that ended last: name, machinetype, backend,
        processors, started, finished, outcome (JSON)."""
        return self.db.execute(
            "SELECT name, machinetype, backend, processors, started, finished, outcome "
            "FROM lms WHERE finished IS NOT NULL ORDER BY finished DESC LIMIT ?",
            (limit,),
        ).fetchall()

    def ended_before(self, moment: float, *, cleaned: bool) -> list[LmRecord]:
        """Ended LMs that finished before ``moment`` and whose directory is (not) cleaned."""
        rows = self.db.execute(
            "SELECT * FROM lms WHERE finished IS NOT NULL AND finished < ? AND cleaned = ? "
            "ORDER BY finished",
            (moment, int(cleaned)),
        )
        return [_from_row(row) for row in rows]

    def finished_since(self, since: float) -> list[LmRecord]:
        rows = self.db.execute(
            "SELECT * FROM lms WHERE finished IS NOT NULL AND finished >= ? ORDER BY finished",
            (since,),
        )
        return [_from_row(row) for row in rows]

    def transition(self, uuid: str, new: LmState, **changes: Any) -> LmRecord:
        """Move an LM to ``new`` (checked against the transition table) and apply ``changes``."""
        with self.write():
            return self._transition(uuid, new, changes)

    def finish(
        self,
        uuid: str,
        new: LmState,
        accounting: Callable[[LmRecord], AccountingRecord],
        **changes: Any,
    ) -> LmRecord:
        """End an LM: its state, outcome and accounting record (``accounting(updated record)``)
        in one transaction, so a daemon killed at any point leaves both or neither."""
        with self.write():
            updated = self._transition(uuid, new, changes)
            self._insert_accounting(accounting(updated))
        return updated

    def _transition(self, uuid: str, new: LmState, changes: dict[str, Any]) -> LmRecord:
        """:meth:`transition` inside a write transaction the caller holds."""
        current = self.get(uuid)
        if current is None:
            raise StoreError(f"no LM with uuid {uuid}")
        check_transition(current.state, new)
        updated = replace(current, state=new, **changes)
        self._update(updated)
        return updated

    def update(self, uuid: str, **changes: Any) -> LmRecord:
        """Change fields of an LM without changing its state."""
        if "state" in changes:
            raise ValueError("use transition() to change an LM's state")
        with self.write():
            current = self.get(uuid)
            if current is None:
                raise StoreError(f"no LM with uuid {uuid}")
            updated = replace(current, **changes)
            self._update(updated)
        return updated

    def _update(self, record: LmRecord) -> None:
        row = _to_row(record)
        row["updated"] = time.time()
        assignments = ", ".join(f"{key} = ?" for key in row if key != "uuid")
        values = [value for key, value in row.items() if key != "uuid"]
        self.db.execute(
            f"UPDATE lms SET {assignments}, rev = rev + 1 WHERE uuid = ?", (*values, record.uuid)
        )

    def last_finished(self, machinetypes: Iterable[str]) -> dict[str, LmRecord]:
        """Per machinetype, its most recently *created* LM that has ended (Vac's finishes/)."""
        out: dict[str, LmRecord] = {}
        for name in machinetypes:
            row = self.db.execute(
                "SELECT * FROM lms WHERE machinetype = ? AND state IN ('finished', 'failed') "
                "ORDER BY created DESC LIMIT 1",
                (name,),
            ).fetchone()
            if row is not None:
                out[name] = _from_row(row)
        return out

    # --- accounting ---------------------------------------------------------------------------

    def add_accounting(self, record: AccountingRecord) -> bool:
        """Store an LM's accounting record unless it has one already; True when stored."""
        with self.write():
            return self._insert_accounting(record)

    def _insert_accounting(self, record: AccountingRecord) -> bool:
        row = {f.name: getattr(record, f.name) for f in fields(AccountingRecord)}
        row["flags"] = ",".join(sorted(record.flags))
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        done = self.db.execute(
            f"INSERT OR IGNORE INTO accounting ({names}) VALUES ({marks})", tuple(row.values())
        )
        return done.rowcount == 1

    def unaccounted(self) -> list[LmRecord]:
        """Ended LMs without an accounting record (ended by an older lmrunner, which wrote the
        record in a transaction of its own after the LM's end)."""
        rows = self.db.execute(
            "SELECT lms.* FROM lms LEFT JOIN accounting USING (uuid) "
            "WHERE lms.state IN ('finished', 'failed') AND accounting.uuid IS NULL"
        )
        return [_from_row(row) for row in rows]

    def accounting(
        self, since: float | None = None, until: float | None = None
    ) -> list[AccountingRecord]:
        """Accounting records of LMs that finished in [since, until), oldest first."""
        rows = self.db.execute(
            "SELECT * FROM accounting WHERE finished >= ? AND finished < ? ORDER BY finished",
            (
                since if since is not None else float("-inf"),
                until if until is not None else float("inf"),
            ),
        )
        return [_accounting_from_row(row) for row in rows]

    def apel_pending(self) -> list[AccountingRecord]:
        """Accounting records whose APEL message has not been written yet."""
        rows = self.db.execute(
            "SELECT * FROM accounting WHERE apel_written = 0 ORDER BY finished"
        ).fetchall()
        return [_accounting_from_row(row) for row in rows]

    def set_apel_written(self, uuid: str) -> None:
        with self.write():
            self.db.execute("UPDATE accounting SET apel_written = 1 WHERE uuid = ?", (uuid,))

    def leftover_cgroups(self) -> list[LmRecord]:
        """Ended LMs whose cgroup could not be removed yet."""
        rows = self.db.execute(
            "SELECT * FROM lms WHERE cgroup IS NOT NULL AND state IN ('finished', 'failed')"
        )
        return [_from_row(row) for row in rows]

    def leftover_disks(self) -> list[LmRecord]:
        """Ended LMs whose filesystem could not be removed yet."""
        rows = self.db.execute(
            "SELECT * FROM lms WHERE disk IS NOT NULL AND state IN ('finished', 'failed')"
        )
        return [_from_row(row) for row in rows]

    # --- requests from the command line to the daemon --------------------------------------

    def add_request(self, uuid: str, action: str, grace: float | None = None) -> None:
        with self.write():
            self.db.execute(
                "INSERT INTO requests (uuid, action, grace, created) VALUES (?, ?, ?, ?)",
                (uuid, action, grace, time.time()),
            )

    def take_requests(self) -> list[tuple[str, str, float | None]]:
        with self.write():
            rows = self.db.execute(
                "SELECT id, uuid, action, grace FROM requests ORDER BY id"
            ).fetchall()
            self.db.execute("DELETE FROM requests")
        return [(row["uuid"], row["action"], row["grace"]) for row in rows]


def _to_row(record: LmRecord) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for name in _COLUMNS:
        value = getattr(record, name)
        if name == "limits":
            value = json.dumps(
                {
                    "processors": value.processors,
                    "memory_bytes": value.memory_bytes,
                    "swap_bytes": value.swap_bytes,
                    "disk_bytes": value.disk_bytes,
                    "hs06": value.hs06,
                    "pids": value.pids,
                }
            )
        elif name in _JSON_FIELDS:
            value = None if value is None else json.dumps(value.to_json())
        elif name == "state":
            value = value.value
        elif name == "directory":
            value = str(value)
        elif name == "cleaned":
            value = int(value)
        row[name] = value
    return row


def _accounting_from_row(row: sqlite3.Row) -> AccountingRecord:
    values = {f.name: row[f.name] for f in fields(AccountingRecord)}
    values["flags"] = frozenset(Flag(f) for f in str(row["flags"]).split(",") if f)
    return AccountingRecord(**values)


def _from_row(row: sqlite3.Row) -> LmRecord:
    values: dict[str, Any] = {}
    for name in _COLUMNS:
        value = row[name]
        if name == "limits":
            value = Limits(**json.loads(value))
        elif name == "handle":
            value = None if value is None else Handle.from_json(json.loads(value))
        elif name in ("outcome", "stop_reason"):
            value = None if value is None else Outcome.from_json(json.loads(value))
        elif name == "state":
            value = LmState(value)
        elif name == "directory":
            value = Path(value)
        elif name == "cleaned":
            value = bool(value)
        values[name] = value
    return LmRecord(**values)
