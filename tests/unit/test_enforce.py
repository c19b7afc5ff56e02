"""lmrunner.enforce without a Factory (an Enforcer on the fake backend and a Store in tmp_path),
and lmrunner.lifecycle.heartbeat_problem on its own."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lmrunner import enforce, lifecycle, payload
from lmrunner.backends.base import Backend, Handle
from lmrunner.config import Config
from lmrunner.enforce import Enforcer
from lmrunner.errors import BackendError
from lmrunner.lifecycle import (
    LmState,
    Outcome,
    heartbeat_outcome,
    heartbeat_problem,
    operator_outcome,
    wallclock_outcome,
)
from lmrunner.state import LmRecord
from tests.unit.test_factory import HEARTBEAT, T0, Env, QuietFake, bare_record

LOGGER = "lmrunner.factory"
UUID = "aaaaaaaa-enforce"
SHUTDOWN = T0 + 86400  # bare_record's shutdown_time


class Signalled(QuietFake):
    """The quiet fake engine remembering each stop with what the store said at that moment."""

    def __init__(self, env: Env) -> None:
        super().__init__(env.state_dir / "fake-engine", clock=env.clock)
        self.env = env
        self.stops: list[tuple[str, bool, LmState, Outcome | None]] = []
        self.fail: BackendError | None = None

    def stop(self, uuid: str, handle: Handle, *, force: bool = False) -> None:
        record = self.env.get(uuid)
        self.stops.append((uuid, force, record.state, record.stop_reason))
        if self.fail is not None:
            raise self.fail
        super().stop(uuid, handle, force=force)


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.env = Env(tmp_path)
        self.engine = Signalled(self.env)
        self.env.backend = self.engine
        self.backends: dict[str, Backend] = {"fake": self.engine}
        self.enforcer = Enforcer(self.env.store, self.env.clock, T0 - 3600.0)

    def config(self, **alpha: Any) -> Config:
        return self.env.config(**alpha)

    def running(self, *, started: float = T0, uuid: str = UUID) -> LmRecord:
        record = self.env.store.insert(bare_record(self.env, 0, uuid))
        self.env.store.transition(uuid, LmState.STARTING)
        handle = self.engine.start(
            self.env.spec(uuid, record.name, record.directory, self.env.store.factory_id)
        )
        for folder, name in (
            ("machinefeatures", "shutdowntime"),
            ("jobfeatures", "shutdowntime_job"),
        ):
            (record.directory / folder).mkdir()
            (record.directory / folder / name).write_text(str(SHUTDOWN))
        return self.env.store.transition(uuid, LmState.RUNNING, handle=handle, started=started)

    def enforce_at(
        self, config: Config, offset: float, record: LmRecord | None = None
    ) -> tuple[LmRecord, bool]:
        self.env.clock.now = T0 + offset
        record = record or self.env.get(UUID)
        return self.enforcer.enforce(config, self.backends, record, T0 + offset)

    def shutdowntime_files(self, record: LmRecord) -> tuple[str, str]:
        return (
            (record.directory / "machinefeatures" / "shutdowntime").read_text(),
            (record.directory / "jobfeatures" / "shutdowntime_job").read_text(),
        )


@pytest.fixture
def s(tmp_path: Path) -> Iterator[Setup]:
    made = Setup(tmp_path)
    yield made
    made.env.close()


# --- stop ----------------------------------------------------------------------------------------


def test_stop_records_the_reason_before_it_signals(s: Setup) -> None:
    lm = s.running()
    s.env.clock.now = T0 + 10
    reason = operator_outcome(False)
    stopping = s.enforcer.stop(s.config(), s.engine, lm, reason)
    assert stopping == s.env.get(UUID)
    assert stopping.state is LmState.STOPPING
    assert (stopping.stop_reason, stopping.stop_deadline) == (reason, T0 + 10 + 30)
    # The engine was asked only once the reason was in the store: a SIGTERM, not a kill.
    assert s.engine.stops == [(UUID, False, LmState.STOPPING, reason)]
    assert s.env.engine()[UUID]["stop_at"] == T0 + 10


@pytest.mark.parametrize(
    ("grace", "deadline", "force"),
    [(0, 0.0, True), (-1, -1.0, True), (5, 5.0, False), (None, 30.0, False)],
)
def test_the_grace_is_the_stops_or_the_machinetypes_and_zero_kills(
    s: Setup, grace: float | None, deadline: float, force: bool
) -> None:
    lm = s.running()
    s.env.clock.now = T0 + 10
    stopping = s.enforcer.stop(s.config(), s.engine, lm, operator_outcome(force), grace=grace)
    assert stopping.stop_deadline == T0 + 10 + deadline
    assert [force for _, force, _, _ in s.engine.stops] == [force]


def test_an_lm_of_a_machinetype_gone_gets_60_seconds(s: Setup) -> None:
    lm = s.running()
    config = s.env.config(machinetypes={"beta": {"backend": "fake", "image": "fake:"}})
    stopping = s.enforcer.stop(config, s.engine, lm, wallclock_outcome())
    assert stopping.stop_deadline == T0 + 60


def test_an_lm_without_a_handle_is_not_stopped(s: Setup) -> None:
    record = s.env.store.insert(bare_record(s.env, 0, UUID))
    assert s.enforcer.stop(s.config(), s.engine, record, wallclock_outcome()) is record
    assert s.env.get(UUID).state is LmState.CREATING
    assert s.engine.stops == []


def test_a_second_stop_keeps_the_first_reason_and_deadline_and_signals_again(s: Setup) -> None:
    lm = s.running()
    first = s.enforcer.stop(s.config(), s.engine, lm, wallclock_outcome())
    s.env.clock.now = T0 + 5
    again = s.enforcer.stop(s.config(), s.engine, first, operator_outcome(True), grace=0)
    assert again == s.env.get(UUID) == first
    assert (again.stop_reason, again.stop_deadline) == (wallclock_outcome(), T0 + 30)
    assert [(force, state) for _, force, state, _ in s.engine.stops] == [
        (False, LmState.STOPPING),
        (True, LmState.STOPPING),
    ]


def test_a_signal_that_fails_is_logged_and_the_stop_stays_recorded(
    s: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    lm = s.running()
    s.engine.fail = BackendError("fake", "engine busy")
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        stopping = s.enforcer.stop(s.config(), s.engine, lm, wallclock_outcome())
    assert stopping.state is LmState.STOPPING and s.env.get(UUID).state is LmState.STOPPING
    assert f"lm={lm.name}: cannot signal it now: fake: engine busy" in caplog.text


# --- enforce: what is left alone -----------------------------------------------------------------


def test_enforce_leaves_alone_what_it_cannot_act_on(s: Setup) -> None:
    config = s.config(max_wallclock_seconds=10)
    creating = s.env.store.insert(replace(bare_record(s.env, 0, UUID), shutdown_time=T0))
    assert s.enforce_at(config, 100) == (creating, False)  # no handle
    starting = s.env.store.transition(UUID, LmState.STARTING, handle=Handle(1, {"uuid": UUID}))
    assert s.enforce_at(config, 100) == (starting, False)  # not running yet
    running = s.env.store.transition(UUID, LmState.RUNNING, started=float(T0))
    assert s.enforcer.enforce(config, {}, running, T0 + 100.0) == (running, False)  # no backend
    assert s.engine.stops == []
    assert s.env.get(UUID).state is LmState.RUNNING


# --- enforce: the shutdown time ------------------------------------------------------------------


def test_the_lms_shutdown_time_stops_it(s: Setup) -> None:
    lm = s.running()
    config = s.config()
    assert s.enforce_at(config, SHUTDOWN - T0 - 0.5) == (lm, False)
    record, stopping = s.enforce_at(config, SHUTDOWN - T0)
    assert stopping is True
    assert (record.state, record.stop_reason) == (LmState.STOPPING, wallclock_outcome())
    assert record.stop_deadline == SHUTDOWN + 30
    assert s.engine.stops == [(UUID, False, LmState.STOPPING, wallclock_outcome())]


def test_a_stopping_lm_is_killed_when_its_grace_is_over(s: Setup) -> None:
    lm = s.running()
    s.enforcer.stop(s.config(), s.engine, lm, operator_outcome(False), grace=20)
    s.engine.stops.clear()
    assert s.enforce_at(s.config(), 19.5)[1] is False
    assert s.engine.stops == []
    record, stopping = s.enforce_at(s.config(), 20)
    assert stopping is False  # being stopped already: not news
    assert record.state is LmState.STOPPING
    assert [force for _, force, _, _ in s.engine.stops] == [True]
    assert s.env.engine()[UUID]["killed_at"] == T0 + 20


def test_a_kill_that_fails_is_the_callers_to_handle(s: Setup) -> None:
    lm = s.running()
    s.enforcer.stop(s.config(), s.engine, lm, operator_outcome(False), grace=20)
    s.engine.fail = BackendError("fake", "cannot kill")
    with pytest.raises(BackendError, match="cannot kill"):
        s.enforce_at(s.config(), 25)


def test_a_later_factory_shutdown_time_changes_nothing(s: Setup) -> None:
    lm = s.running()
    config = s.config(factory={"shutdown_time": SHUTDOWN + 100})
    assert s.enforce_at(config, 10) == (lm, False)
    assert s.shutdowntime_files(lm) == (str(SHUTDOWN), str(SHUTDOWN))


def test_an_earlier_factory_shutdown_time_lowers_the_lms_files_and_record(s: Setup) -> None:
    lm = s.running()
    config = s.config(factory={"shutdown_time": T0 + 1000})
    record, stopping = s.enforce_at(config, 10)
    assert stopping is False
    assert record.shutdown_time == T0 + 1000 == s.env.get(UUID).shutdown_time
    assert record.state is LmState.RUNNING
    assert s.shutdowntime_files(lm) == (str(T0 + 1000), str(T0 + 1000))

    record, stopping = s.enforce_at(config, 1000)
    assert stopping is True and record.stop_reason == wallclock_outcome()


def test_a_factory_shutdown_time_already_past_stops_the_lm_at_once(s: Setup) -> None:
    s.running()
    record, stopping = s.enforce_at(s.config(factory={"shutdown_time": T0 + 5}), 10)
    assert stopping is True
    assert (record.shutdown_time, record.stop_reason) == (T0 + 5, wallclock_outcome())


def test_a_lowered_shutdown_time_reaches_the_record_when_the_files_cannot_be_written(
    s: Setup, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s.running()

    def vanished(lm_dir: Path, shutdown_time: int) -> bool:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(payload, "update_shutdowntime", vanished)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        record, _ = s.enforce_at(s.config(factory={"shutdown_time": T0 + 1000}), 10)
    assert record.shutdown_time == T0 + 1000 == s.env.get(UUID).shutdown_time
    assert "cannot lower its shutdowntime files" in caplog.text


# --- enforce: the heartbeat ----------------------------------------------------------------------


class Spy:
    """heartbeat_problem as enforce calls it, still doing its job."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> Outcome | None:
        self.calls.append(kwargs)
        return heartbeat_problem(**kwargs)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    made = Spy()
    monkeypatch.setattr(enforce, "heartbeat_problem", made)
    return made


def beat(lm: LmRecord, mtime: float) -> Path:
    path = lm.directory / "joboutputs" / "heartbeat"
    path.write_text("alive\n")
    os.utime(path, (mtime, mtime))
    return path


def test_enforce_asks_heartbeat_problem_with_the_lms_facts(s: Setup, spy: Spy) -> None:
    lm = s.running(started=T0 + 3)
    beat(lm, T0 + 150)
    assert s.enforce_at(s.config(**HEARTBEAT), 200) == (lm, False)
    [call] = spy.calls
    beat_mtime = call.pop("beat_mtime")
    assert call == {
        "now": T0 + 200,
        "started": T0 + 3,
        "daemon_started": T0 - 3600.0,
        "fizzle_seconds": 100,
        "heartbeat_seconds": 60,
    }
    assert beat_mtime() == T0 + 150


@pytest.mark.parametrize("stale", [False, True], ids=["missing", "stale"])
def test_a_missing_or_stale_heartbeat_stops_the_lm(s: Setup, spy: Spy, stale: bool) -> None:
    lm = s.running()
    if stale:
        beat(lm, T0 + 40)  # 61 s old at T0 + 101
    record, stopping = s.enforce_at(s.config(**HEARTBEAT), 101)
    assert stopping is True
    assert record.stop_reason == heartbeat_outcome(created=stale)
    assert s.engine.stops == [(UUID, False, LmState.STOPPING, heartbeat_outcome(created=stale))]


@pytest.mark.parametrize("kind", ["symlink", "folder", "missing"])
def test_only_a_regular_heartbeat_file_counts(
    s: Setup, spy: Spy, tmp_path: Path, kind: str
) -> None:
    lm = s.running()
    path = lm.directory / "joboutputs" / "heartbeat"
    fresh = tmp_path / "host-file"
    fresh.write_text("fresh")
    if kind == "symlink":
        path.symlink_to(fresh)
    elif kind == "folder":
        path.mkdir()
    record, stopping = s.enforce_at(s.config(**HEARTBEAT), 101)
    assert stopping is True
    assert record.stop_reason == heartbeat_outcome(created=False)
    assert spy.calls[0]["beat_mtime"]() is None


def test_no_heartbeat_check_without_a_heartbeat_file_or_a_start(s: Setup, spy: Spy) -> None:
    lm = s.running()
    assert s.enforce_at(s.config(fizzle_seconds=100), 500) == (lm, False)
    unstarted = s.env.store.update(UUID, started=None)
    assert s.enforce_at(s.config(**HEARTBEAT), 500) == (unstarted, False)
    assert spy.calls == []


def test_the_shutdown_time_wins_over_the_heartbeat(s: Setup, spy: Spy) -> None:
    s.running()
    record, stopping = s.enforce_at(s.config(**HEARTBEAT), SHUTDOWN - T0)
    assert stopping is True and record.stop_reason == wallclock_outcome()
    assert spy.calls == []


def test_the_heartbeat_waits_fizzle_seconds_after_the_daemons_start(s: Setup, spy: Spy) -> None:
    s.enforcer = Enforcer(s.env.store, s.env.clock, T0 + 500.0)
    lm = s.running()
    assert s.enforce_at(s.config(**HEARTBEAT), 600) == (lm, False)
    record, stopping = s.enforce_at(s.config(**HEARTBEAT), 600.5)
    assert stopping is True and record.stop_reason == heartbeat_outcome(created=False)


# --- lifecycle.heartbeat_problem -----------------------------------------------------------------


class Beat:
    """beat_mtime: counts its calls."""

    def __init__(self, mtime: float | None) -> None:
        self.mtime = mtime
        self.calls = 0

    def __call__(self) -> float | None:
        self.calls += 1
        return self.mtime


def problem(
    beat_mtime: Callable[[], float | None],
    *,
    now: float = 1000.0,
    started: float = 0.0,
    daemon_started: float = 0.0,
    fizzle_seconds: int = 100,
    heartbeat_seconds: int = 60,
) -> Outcome | None:
    return lifecycle.heartbeat_problem(
        now=now,
        started=started,
        daemon_started=daemon_started,
        fizzle_seconds=fizzle_seconds,
        heartbeat_seconds=heartbeat_seconds,
        beat_mtime=beat_mtime,
    )


@pytest.mark.parametrize(
    "when",
    [
        {"fizzle_seconds": 0},
        {"started": 950.0},
        {"started": 900.0},  # exactly fizzle_seconds: "more than" is Vac's rule
        {"daemon_started": 950.0},
        {"daemon_started": 900.0},
        {"started": 2000.0},  # a clock that went back
    ],
    ids=["no-fizzle", "lm-young", "lm-exactly", "daemon-young", "daemon-exactly", "future"],
)
def test_no_look_at_the_file_within_the_grace(when: dict[str, Any]) -> None:
    beat_mtime = Beat(None)
    assert problem(beat_mtime, **when) is None
    assert beat_mtime.calls == 0


def test_a_missing_file_after_the_grace() -> None:
    beat_mtime = Beat(None)
    assert problem(beat_mtime, started=899.5, daemon_started=899.5) == heartbeat_outcome(False)
    assert beat_mtime.calls == 1
    assert heartbeat_outcome(False).message == "700 Heartbeat file not created"


@pytest.mark.parametrize(
    ("mtime", "heartbeat_seconds", "expected"),
    [
        (1000.0, 60, None),
        (940.0, 60, None),  # exactly heartbeat_seconds old: still fresh
        (939.5, 60, heartbeat_outcome(True)),
        (1.0, 0, None),  # 0: any age will do
        (5000.0, 60, None),  # from the future: fresh
    ],
)
def test_the_files_age(mtime: float, heartbeat_seconds: int, expected: Outcome | None) -> None:
    beat_mtime = Beat(mtime)
    assert problem(beat_mtime, heartbeat_seconds=heartbeat_seconds) == expected
    assert beat_mtime.calls == 1
    assert heartbeat_outcome(True).message == "700 Heartbeat file not updated"
