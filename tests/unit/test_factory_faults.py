"""The factory's fault containment: one LM's trouble (an engine's surprise, a bug, a payload's
planted file) stays that LM's and is retried; the store records an end whole or not at all; a
full or read-only state directory stops starts, not supervision.

Driven pass by pass on the fake backend with a fake clock, as tests/unit/test_factory.py.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, SimpleNamespace
from typing import Any

import docker.errors
import pytest

from lmrunner.accounting import AccountingRecord
from lmrunner.backends.base import Handle, Status
from lmrunner.config import Config
from lmrunner.ending import UNRECORDED_OUTCOME, accounting_record
from lmrunner.errors import BackendError
from lmrunner.factory import Factory
from lmrunner.lifecycle import (
    IllegalTransition,
    LmState,
    Outcome,
    OutcomeSource,
    heartbeat_outcome,
)
from lmrunner.state import LmRecord, StoreError, StoreUnwritable
from tests.unit.test_factory import (
    HEARTBEAT,
    LM0,
    LONG,
    T0,
    Env,
    QuietFake,
    bare_record,
    message_file,
    outcome_of,
    start_one,
)

TEN = "fake:seconds=10"  # ends by itself 10 s after its start, without a message
EXITED_0 = (200, "Exited with status 0 without a shutdown_message", OutcomeSource.EXIT_STATUS)
LM1 = "factory-01.example.com"


class FaultyFake(QuietFake):
    """The quiet fake engine, whose calls for chosen LMs raise chosen exceptions."""

    def __init__(self, engine_dir: Path, clock: Callable[[], float]) -> None:
        super().__init__(engine_dir, clock=clock)
        self.faults: dict[tuple[str, str], Exception] = {}  # (method, uuid) -> what it raises
        self.calls: list[tuple[str, str]] = []

    def _call(self, method: str, uuid: str) -> None:
        self.calls.append((method, uuid))
        fault = self.faults.get((method, uuid))
        if fault is not None:
            raise fault

    def inspect(self, uuid: str, handle: Handle) -> Status:
        self._call("inspect", uuid)
        return super().inspect(uuid, handle)

    def destroy(self, uuid: str, handle: Handle) -> None:
        self._call("destroy", uuid)
        super().destroy(uuid, handle)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = Env(tmp_path)
    made.backend = FaultyFake(made.state_dir / "fake-engine", clock=made.clock)
    yield made
    made.close()


@pytest.fixture
def engine(env: Env) -> FaultyFake:
    assert isinstance(env.backend, FaultyFake)
    return env.backend


@contextmanager
def deadline(seconds: float = 5.0) -> Iterator[None]:
    """Fail (instead of hanging for ever) when the body blocks longer than ``seconds``. A signal,
    not a thread: the store's SQLite connection belongs to this thread."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def rows_of(env: Env, uuid: str) -> list[AccountingRecord]:
    return [row for row in env.store.accounting() if row.uuid == uuid]


def messages(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


def once_raising(real: Callable[..., Any], error: Exception) -> Callable[..., Any]:
    """``real``, except that its first call raises ``error``."""
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise error
        return real(*args, **kwargs)

    return wrapper


def problem(factory: Factory) -> str | None:
    """The factory's ``store_problem`` (read through a call: it changes behind mypy's back)."""
    return factory.store_problem


def break_once(monkeypatch: pytest.MonkeyPatch, env: Env, method: str, error: Exception) -> None:
    """Make the store's ``method`` raise ``error`` at its next call only."""
    monkeypatch.setattr(env.store, method, once_raising(getattr(env.store, method), error))


# --- a) an engine's surprise in inspect() ----------------------------------------------------

INSPECT_FAULTS = {
    "bug": RuntimeError("a bug in the backend"),
    "docker": docker.errors.APIError("500 Server Error: Internal Server Error"),
    "oserror": ConnectionResetError(104, "Connection reset by peer"),
}


@pytest.mark.parametrize("kind", sorted(INSPECT_FAULTS))
def test_an_inspect_fault_stays_with_its_lm_and_is_retried(
    env: Env, engine: FaultyFake, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    factory = env.factory(env.config(cpus=2, image=TEN))
    assert sorted(env.pass_at(factory, 0).started) == [LM0, LM1]
    bad, good = env.store.active()
    engine.faults[("inspect", bad.uuid)] = INSPECT_FAULTS[kind]

    with caplog.at_level(logging.ERROR, logger="lmrunner.factory"):
        report = env.pass_at(factory, 10)  # does not raise
    assert report.finished == [good.name]
    assert outcome_of(env.get(good.uuid)) == EXITED_0
    assert len(rows_of(env, good.uuid)) == 1
    assert report.started == [good.name]  # its slot is reused at once
    still = env.get(bad.uuid)
    assert still.state is LmState.RUNNING
    assert still.outcome is None and still.finished is None
    assert rows_of(env, bad.uuid) == []
    assert messages(caplog, logging.ERROR, f"lm={bad.name}: unexpected error (retried later)")

    env.pass_at(factory, 11)  # still failing: retried, still running
    assert engine.calls.count(("inspect", bad.uuid)) >= 2
    assert env.get(bad.uuid).state is LmState.RUNNING

    del engine.faults[("inspect", bad.uuid)]  # the engine behaves again
    report = env.pass_at(factory, 12)
    assert bad.name in report.finished
    done = env.get(bad.uuid)
    assert done.state is LmState.FINISHED
    assert outcome_of(done) == EXITED_0
    assert done.finished == T0 + 10  # the engine's end time, not when it was noticed
    assert len(rows_of(env, bad.uuid)) == 1
    assert bad.uuid not in env.engine()


def test_a_bug_outside_any_lm_fails_the_pass_not_the_loop(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    factory = env.factory(env.config())
    break_once(monkeypatch, env, "take_requests", RuntimeError("a bug"))
    with caplog.at_level(logging.ERROR, logger="lmrunner.factory"):
        factory.run(once=True)  # does not raise
    assert messages(caplog, logging.ERROR, "pass failed; the next pass tries again")
    factory.run(once=True)
    assert env.only_active().name == LM0


# --- b) destroy() fails after the end is recorded ------------------------------------------------

DESTROY_FAULTS = {
    "backend_error": BackendError("fake", "engine busy"),
    "bug": RuntimeError("a bug in destroy"),
}


@pytest.mark.parametrize("kind", sorted(DESTROY_FAULTS))
def test_a_destroy_fault_leaves_the_end_recorded_once_and_a_reconcile_removes_the_object(
    env: Env, engine: FaultyFake, kind: str
) -> None:
    factory = env.factory(env.config(image=TEN))
    lm = start_one(env, factory)
    engine.faults[("destroy", lm.uuid)] = DESTROY_FAULTS[kind]

    env.pass_at(factory, 10)  # does not raise
    done = env.get(lm.uuid)
    assert done.state is LmState.FINISHED
    assert outcome_of(done) == EXITED_0
    assert done.finished == T0 + 10
    assert len(rows_of(env, lm.uuid)) == 1
    assert message_file(done).read_text() == "200 Exited with status 0 without a shutdown_message\n"
    assert lm.uuid in env.engine()  # the leftover

    env.pass_at(factory, 11)  # the reconcile's destroy fails too: nothing else changes
    assert env.get(lm.uuid) == done
    assert len(rows_of(env, lm.uuid)) == 1
    assert lm.uuid in env.engine()

    del engine.faults[("destroy", lm.uuid)]
    env.pass_at(factory, 12)
    assert lm.uuid not in env.engine()
    assert env.get(lm.uuid) == done
    assert len(rows_of(env, lm.uuid)) == 1
    assert env.store.apel_pending() == []  # published, if not right after the end then later


# --- c) one transaction per end -----------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [RuntimeError("accounting insert bug"), StoreUnwritable("disk full")],
    ids=["bug", "unwritable"],
)
def test_a_failed_accounting_insert_leaves_the_lm_active_and_the_next_pass_finalises_it(
    env: Env, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    factory = env.factory(env.config(image=TEN))
    lm = start_one(env, factory)

    def broken(record: AccountingRecord) -> bool:
        raise error

    monkeypatch.setattr(env.store, "_insert_accounting", broken)
    env.clock.now = T0 + 10
    factory.run(once=True)  # does not raise
    still = env.get(lm.uuid)
    assert still.state is LmState.RUNNING
    assert still.outcome is None and still.finished is None
    assert env.store.accounting() == []
    assert env.store.unaccounted() == []
    assert not message_file(lm).exists()  # nothing written after a failed finish
    assert lm.uuid in env.engine()  # nor its engine object removed
    assert (problem(factory) is not None) is isinstance(error, StoreUnwritable)

    monkeypatch.undo()
    env.clock.now = T0 + 11
    factory.run(once=True)
    assert problem(factory) is None
    done = env.get(lm.uuid)
    assert done.state is LmState.FINISHED
    assert outcome_of(done) == EXITED_0
    assert done.finished == T0 + 10
    assert len(rows_of(env, lm.uuid)) == 1
    assert lm.uuid not in env.engine()


def running_record(env: Env, uuid: str = "aaaaaaaa-finish") -> LmRecord:
    env.store.insert(bare_record(env, 0, uuid))
    env.store.transition(uuid, LmState.STARTING)
    return env.store.transition(uuid, LmState.RUNNING, started=float(T0))


END = Outcome(300, "No more work", OutcomeSource.PAYLOAD)


def finish(env: Env, uuid: str, make: Callable[[LmRecord], AccountingRecord] | None = None) -> None:
    env.store.finish(
        uuid,
        LmState.FINISHED,
        make or (lambda done: accounting_record(done, None, None)),
        outcome=END,
        finished=T0 + 5.0,
    )


def test_store_finish_writes_state_and_accounting_both_or_neither(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = running_record(env)

    def explode(done: LmRecord) -> AccountingRecord:
        raise RuntimeError("cannot make the record")

    with pytest.raises(RuntimeError):
        finish(env, record.uuid, explode)
    assert env.get(record.uuid) == record
    assert env.store.accounting() == []

    def unwritable(row: AccountingRecord) -> bool:
        raise StoreUnwritable("disk full")

    monkeypatch.setattr(env.store, "_insert_accounting", unwritable)
    with pytest.raises(StoreUnwritable):
        finish(env, record.uuid)
    monkeypatch.undo()
    assert env.get(record.uuid) == record
    assert env.store.accounting() == []

    # A real SQLite failure of the insert, after the state's UPDATE in the same transaction.
    env.store.db.execute(
        "CREATE TRIGGER no_accounting BEFORE INSERT ON accounting "
        "BEGIN SELECT RAISE(ABORT, 'simulated failure'); END"
    )
    with pytest.raises(StoreError, match="simulated failure"):
        finish(env, record.uuid)
    env.store.db.execute("DROP TRIGGER no_accounting")
    assert env.get(record.uuid) == record
    assert env.store.accounting() == []
    assert not env.store.db.in_transaction

    with pytest.raises(IllegalTransition):  # RUNNING -> FAILED is no transition
        env.store.finish(record.uuid, LmState.FAILED, lambda d: accounting_record(d, None, None))
    assert env.get(record.uuid) == record

    finish(env, record.uuid)
    done = env.get(record.uuid)
    assert done.state is LmState.FINISHED and done.outcome == END
    [row] = env.store.accounting()
    assert (row.uuid, row.outcome_code, row.outcome_text, row.finished) == (
        record.uuid,
        300,
        "No more work",
        T0 + 5.0,
    )
    with pytest.raises(IllegalTransition):  # ended once: never again
        finish(env, record.uuid)
    assert len(env.store.accounting()) == 1
    assert env.store.unaccounted() == []


# --- d) backfill of accounting rows -------------------------------------------------------------


def test_adopt_backfills_a_missing_accounting_row_once(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    record = running_record(env, "bbbbbbbb-unaccounted")
    ended = env.store.transition(  # as an older lmrunner ended it: no accounting in the same step
        record.uuid, LmState.FINISHED, outcome=END, finished=T0 + 50.0
    )
    assert env.store.unaccounted() == [ended]
    factory = env.factory(env.config(cpus=2))
    with caplog.at_level(logging.WARNING, logger="lmrunner.factory"):
        factory.adopt()
        factory.adopt()
    [row] = env.store.accounting()
    assert row.uuid == record.uuid
    assert (row.outcome_code, row.outcome_source) == (300, "payload")
    assert (row.started, row.finished, row.wall_seconds) == (T0, T0 + 50.0, 50.0)
    assert env.store.unaccounted() == []
    assert len(messages(caplog, logging.WARNING, "accounting record backfilled")) == 1


# --- e) a shutdown_message the payload planted --------------------------------------------------


def test_a_symlinked_shutdown_message_is_neither_read_nor_written_through(
    env: Env, tmp_path: Path
) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("200 secret\n")
    factory = env.factory(env.config(image=TEN))
    lm = start_one(env, factory)
    message_file(lm).symlink_to(secret)

    assert env.pass_at(factory, 10).finished == [LM0]
    done = env.get(lm.uuid)
    assert done.state is LmState.FINISHED
    assert done.outcome is not None
    assert done.outcome.source is not OutcomeSource.PAYLOAD
    assert outcome_of(done) == EXITED_0
    assert secret.read_text() == "200 secret\n"
    assert message_file(lm).is_symlink()
    assert len(rows_of(env, lm.uuid)) == 1


def test_a_dangling_shutdown_message_symlink_creates_nothing(env: Env, tmp_path: Path) -> None:
    target = tmp_path / "host" / "created-by-root"
    target.parent.mkdir()
    factory = env.factory(env.config(image=TEN))
    lm = start_one(env, factory)
    message_file(lm).symlink_to(target)

    assert env.pass_at(factory, 10).finished == [LM0]
    assert outcome_of(env.get(lm.uuid)) == EXITED_0
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def plant_fifo(path: Path) -> None:
    os.mkfifo(path)


def plant_zero_device(path: Path) -> None:
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: never ends


@pytest.mark.parametrize("plant", [plant_fifo, plant_zero_device], ids=["fifo", "device"])
def test_a_shutdown_message_that_is_no_file_does_not_hang_the_pass(
    env: Env, plant: Callable[[Path], None]
) -> None:
    if plant is plant_zero_device and os.geteuid() != 0:
        pytest.skip("mknod of a device needs root")
    factory = env.factory(env.config(image=TEN))
    lm = start_one(env, factory)
    plant(message_file(lm))
    with deadline():
        report = env.pass_at(factory, 10)
    assert report.finished == [LM0]
    done = env.get(lm.uuid)
    assert outcome_of(done) == EXITED_0
    assert len(rows_of(env, lm.uuid)) == 1
    assert not stat.S_ISREG(message_file(lm).lstat().st_mode)  # left as the payload made it


# --- f) heartbeat -----------------------------------------------------------------------------


def test_a_symlinked_heartbeat_to_a_fresh_file_counts_as_missing(env: Env, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh-host-file"
    fresh.write_text("alive\n")
    factory = env.factory(env.config(**HEARTBEAT))
    lm = start_one(env, factory)
    (lm.directory / "joboutputs" / "heartbeat").symlink_to(fresh)
    os.utime(fresh, (T0 + 100, T0 + 100))  # as fresh as can be

    report = env.pass_at(factory, 100.5)
    assert report.stopping == [LM0]
    assert env.get(lm.uuid).stop_reason == heartbeat_outcome(created=False)
    env.pass_at(factory, 100.75)
    assert outcome_of(env.get(lm.uuid)) == (
        700,
        "Heartbeat file not created",
        OutcomeSource.HEARTBEAT,
    )
    assert fresh.read_text() == "alive\n"


# --- g) reload ----------------------------------------------------------------------------------


def test_a_reload_runs_before_the_pass_not_inside_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory = env.factory(env.config())
    order: list[str] = []
    in_pass = [False]
    real_pass = factory.run_pass

    def run_pass() -> Any:
        order.append("pass")
        in_pass[0] = True
        try:
            return real_pass()
        finally:
            in_pass[0] = False

    def reload() -> None:
        assert not in_pass[0]
        order.append("reload")

    monkeypatch.setattr(factory, "run_pass", run_pass)
    factory.run(once=True, reload=reload)
    assert order == ["pass"]  # nothing asked for one

    factory.request_reload()
    factory.run(once=True, reload=reload)
    assert order == ["pass", "reload", "pass"]
    assert not factory.reload_requested.is_set()

    factory.run(once=True, reload=reload)  # asked once, done once
    assert order == ["pass", "reload", "pass", "pass"]


STORM = """
import queue, signal, time
from lmrunner.factory import Flag
flag, events, signals = Flag(), queue.SimpleQueue(), [0]
def hangup(signum, frame):  # what Factory.request_reload does
    signals[0] += 1
    flag.set()
    events.put("")
signal.signal(signal.SIGALRM, hangup)
signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
end = time.monotonic() + 1.5
while time.monotonic() < end:  # what Factory.run does between two passes
    if flag.is_set():
        flag.clear()
    flag.clear()  # the narrow window, widened: most of the time is spent inside clear()
    try:
        events.get_nowait()
    except queue.Empty:
        pass
signal.setitimer(signal.ITIMER_REAL, 0)
print(signals[0])
"""


@pytest.mark.allow_subprocess
def test_a_signal_storm_on_the_request_flags_never_deadlocks_the_loop() -> None:
    # A threading.Event here hung the daemon: set() in the handler waited for the lock that the
    # interrupted clear() held (CI's SIGHUP storm). A storm every millisecond for 1.5 s finds it.
    done = subprocess.run(
        [sys.executable, "-c", STORM], capture_output=True, text=True, timeout=20, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) > 10  # the storm did happen


def test_a_failing_reload_does_not_stop_the_pass(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    factory = env.factory(env.config())

    def reload() -> None:
        raise RuntimeError("bad reload")

    factory.request_reload()
    with caplog.at_level(logging.ERROR, logger="lmrunner.factory"):
        factory.run(once=True, reload=reload)
    assert messages(caplog, logging.ERROR, "lm=reload: unexpected error")
    assert env.only_active().name == LM0


class Maker:
    """``make`` for :meth:`Factory.reconfigure`: records what it was asked for."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.asked: list[str] = []
        self.made: list[FaultyFake] = []

    def __call__(self, name: str) -> FaultyFake | None:
        self.asked.append(name)
        if name != "fake":
            return None
        fresh = FaultyFake(self.env.state_dir / "fake-engine", clock=self.env.clock)
        self.made.append(fresh)
        return fresh


def beta_only(env: Env, **factory: Any) -> Config:
    return env.config(
        factory=factory or None,
        machinetypes={"beta": {"backend": "fake", "image": LONG, "target_share": 1}},
    )


def test_reconfigure_without_the_running_lms_machinetype_lets_it_run_and_finish(
    env: Env,
) -> None:
    factory = env.factory(env.config(image="fake:seconds=100", fizzle_seconds=600))
    lm = start_one(env, factory)
    maker = Maker(env)
    factory.request_reload()
    env.clock.now = T0 + 5
    factory.run(once=True, reload=lambda: factory.reconfigure(beta_only(env), maker))
    assert set(factory.config.machinetypes) == {"beta"}
    assert maker.asked == []  # same factory settings, fake present: nothing made anew
    assert env.get(lm.uuid).state is LmState.RUNNING

    report = env.pass_at(factory, 50)
    assert report.finished == [] and report.started == []
    assert env.get(lm.uuid).state is LmState.RUNNING

    report = env.pass_at(factory, 100)
    assert report.finished == [LM0]
    done = env.get(lm.uuid)
    assert done.state is LmState.FINISHED
    # Its machinetype is gone: no fizzle_seconds to judge it by (mt None), so no fizzle.
    assert outcome_of(done) == EXITED_0
    [row] = rows_of(env, lm.uuid)
    assert (row.machinetype, row.fqan, row.outcome_code) == ("alpha", None, 200)
    assert report.started == [LM0]
    assert env.only_active().machinetype == "beta"


def test_reconfigure_with_the_same_factory_settings_makes_no_backend(env: Env) -> None:
    factory = env.factory(env.config())
    start_one(env, factory)
    before = factory.backends["fake"]
    maker = Maker(env)
    factory.reconfigure(env.config(target_share=5), maker)
    assert maker.asked == []
    assert factory.backends["fake"] is before
    assert factory.config.machinetypes["alpha"].target_share == 5


def test_reconfigure_with_changed_factory_settings_makes_the_backends_anew(
    env: Env, engine: FaultyFake
) -> None:
    factory = env.factory(env.config(image="fake:seconds=100"))
    lm = start_one(env, factory)
    maker = Maker(env)
    changed = env.config(image="fake:seconds=100", factory={"hs06_per_processor": 10.0})
    factory.reconfigure(changed, maker)
    assert maker.asked == ["fake"]
    old_calls = len(engine.calls)
    [fresh] = maker.made
    assert factory.backends["fake"] is fresh
    assert fresh.notify is not None  # watched
    assert factory.config.factory.hs06_per_processor == 10.0

    report = env.pass_at(factory, 100)  # the new backend supervises the running LM
    assert report.finished == [LM0]
    assert ("inspect", lm.uuid) in fresh.calls
    assert engine.calls[old_calls:] == []  # the old one is closed and asked nothing more
    assert outcome_of(env.get(lm.uuid)) == EXITED_0
    assert len(rows_of(env, lm.uuid)) == 1


def test_reconfigure_keeps_the_state_dir(env: Env, tmp_path: Path) -> None:
    factory = env.factory(env.config())
    maker = Maker(env)
    factory.reconfigure(env.config(factory={"state_dir": str(tmp_path / "elsewhere")}), maker)
    assert factory.config.factory.state_dir == env.state_dir
    assert maker.asked == []  # the state_dir is put back: the factory settings are unchanged


# --- h) a full or read-only state directory ----------------------------------------------------

REAL_STATVFS = os.statvfs
STATVFS_PROBLEMS: dict[str, tuple[dict[str, Any], str]] = {
    "readonly": ({"readonly": True}, "its filesystem is read-only"),
    "full": ({"free": 4096}, "its filesystem is full (0 MiB free)"),
    "unreadable": ({"error": OSError(5, "Input/output error")}, "cannot look at it: "),
}


def broken_statvfs(
    *, readonly: bool = False, free: int | None = None, error: OSError | None = None
) -> Callable[[Any], Any]:
    def statvfs(path: Any) -> Any:
        if error is not None:
            raise error
        real = REAL_STATVFS(path)
        return SimpleNamespace(
            f_flag=real.f_flag | (os.ST_RDONLY if readonly else 0),
            f_bavail=real.f_bavail if free is None else free // 4096,
            f_frsize=real.f_frsize if free is None else 4096,
        )

    return statvfs


@pytest.mark.parametrize("kind", sorted(STATVFS_PROBLEMS))
def test_a_state_dir_that_cannot_take_more_blocks_starts_with_one_log_line(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    factory = env.factory(env.config(cpus=2, image=TEN))
    options, why = STATVFS_PROBLEMS[kind]
    monkeypatch.setattr("lmrunner.factory.os.statvfs", broken_statvfs(**options))
    with caplog.at_level(logging.INFO, logger="lmrunner.factory"):
        for offset in (0, 1, 2):
            report = env.pass_at(factory, offset)
            assert report.started == []
            assert report.blocked is not None and report.blocked.startswith(why)
        assert env.store.recent() == []
        assert problem(factory) is not None
        assert len(messages(caplog, logging.ERROR, "no LM starts until it can take more")) == 1
        assert messages(caplog, logging.WARNING, "writable again") == []

        monkeypatch.undo()
        report = env.pass_at(factory, 3)
        assert sorted(report.started) == [LM0, LM1]
        assert report.blocked is None
        assert problem(factory) is None
        env.pass_at(factory, 4)
    assert len(messages(caplog, logging.WARNING, "writable again")) == 1
    assert len(messages(caplog, logging.ERROR, "state directory")) == 1


def test_ends_are_recorded_while_starts_are_blocked(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory = env.factory(env.config(image=TEN))
    lm = start_one(env, factory)
    monkeypatch.setattr("lmrunner.factory.os.statvfs", broken_statvfs(readonly=True))
    report = env.pass_at(factory, 10)
    assert report.finished == [LM0] and report.started == []
    assert outcome_of(env.get(lm.uuid)) == EXITED_0
    assert len(rows_of(env, lm.uuid)) == 1
    assert env.store.active() == []


def test_a_store_unwritable_at_an_end_blocks_until_the_probe_write_works(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    factory = env.factory(env.config(image=TEN))
    lm = start_one(env, factory)
    break_once(monkeypatch, env, "finish", StoreUnwritable("disk full"))
    env.clock.now = T0 + 10
    with caplog.at_level(logging.INFO, logger="lmrunner.factory"):
        factory.run(once=True)  # does not raise
        assert "disk full" in (problem(factory) or "")
        assert env.get(lm.uuid).state is LmState.RUNNING

        # The probe write fails too for a while: still blocked, no second ERROR line.
        still_full = [True]
        real_set_meta = env.store.set_meta

        def set_meta(key: str, value: str | None) -> None:
            if still_full[0]:
                raise StoreUnwritable("still full")
            real_set_meta(key, value)

        monkeypatch.setattr(env.store, "set_meta", set_meta)
        report = factory.run_pass()
        assert report.blocked == "still full" and report.started == []
        assert problem(factory) == "still full"
        still_full[0] = False

        env.clock.now = T0 + 11
        factory.run(once=True)
        assert problem(factory) is None
    assert len(messages(caplog, logging.ERROR, "no LM starts until it can take more")) == 1
    assert len(messages(caplog, logging.WARNING, "writable again")) == 1
    assert env.store.meta("writable_at") == str(T0 + 11)
    done = env.get(lm.uuid)
    assert outcome_of(done) == EXITED_0
    assert len(rows_of(env, lm.uuid)) == 1


def test_a_store_unwritable_at_a_start_does_not_end_the_loop(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory = env.factory(env.config())
    break_once(monkeypatch, env, "transition", StoreUnwritable("disk full"))
    factory.run(once=True)  # does not raise
    assert "disk full" in (problem(factory) or "")
    assert env.engine() == {}  # the engine was never asked
    factory.run_pass()  # writes work again: the probe write clears the problem
    assert problem(factory) is None


def test_a_start_interrupted_by_an_unwritable_store_is_settled_by_a_later_pass(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory = env.factory(env.config())
    break_once(monkeypatch, env, "transition", StoreUnwritable("disk full"))
    factory.run(once=True)
    [stuck] = env.store.recent()
    assert stuck.state is LmState.CREATING
    for offset in (1, 2, 3, 60, 3600):  # the daemon runs on; no restart
        env.pass_at(factory, offset)
    assert env.get(stuck.uuid).state is LmState.FAILED
    assert env.only_active().name == LM0


def test_an_lm_started_when_the_store_became_unwritable_is_supervised(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory = env.factory(env.config(image=TEN))
    real = env.store.transition

    def transition(uuid: str, new: LmState, **changes: Any) -> LmRecord:
        if new is LmState.RUNNING and not calls:
            calls.append(uuid)
            raise StoreUnwritable("disk full")
        return real(uuid, new, **changes)

    calls: list[str] = []
    monkeypatch.setattr(env.store, "transition", transition)
    factory.run(once=True)
    [uuid] = calls
    # Unrecorded, it must not run unsupervised: removed at once, settled by the next reconcile.
    assert uuid not in env.engine()
    env.pass_at(factory, 1)
    ended = env.get(uuid)
    assert not ended.active
    assert ended.outcome == UNRECORDED_OUTCOME
    assert [r.uuid for r in env.store.accounting()].count(uuid) == 1


# --- i) a broken store ends the loop ------------------------------------------------------------


@pytest.mark.parametrize("where", ["take_requests", "finish"])
def test_a_store_error_propagates_out_of_run(
    env: Env, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    factory = env.factory(env.config(image=TEN))
    start_one(env, factory)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("database disk image is malformed")

    monkeypatch.setattr(env.store, where, broken)
    env.clock.now = T0 + 10  # the LM has ended: finish is called inside its guard
    with pytest.raises(StoreError, match="malformed") as caught:
        factory.run(once=True)
    assert caught.type is StoreError
    assert problem(factory) is None


def test_a_real_sqlite_corruption_error_is_a_store_error_not_unwritable(tmp_path: Path) -> None:
    from lmrunner.state import translate

    err = sqlite3.DatabaseError("database disk image is malformed")
    err.sqlite_errorcode = 11  # SQLITE_CORRUPT
    assert type(translate(err, tmp_path / "db")) is StoreError
    err.sqlite_errorcode = 13  # SQLITE_FULL
    assert type(translate(err, tmp_path / "db")) is StoreUnwritable
